"""LR at chosen steps for warmup+cosine-to-floor and warmup-stable-decay, configured by TOML."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchtitan.config import ConfigManager

from titan_hybrid.optim import build_lr_schedulers, build_optimizers

CONFIG = str(Path(__file__).parents[1] / "train_configs" / "debug_cpu.toml")
LR = 1e-3

# The schedulers are stepped without training, as the LR is all these tests read.
pytestmark = pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")


def lrs_at(overrides: list[str], steps: list[int], training_steps: int = 100) -> list[float]:
    """The optimizer's LR after ``k`` scheduler steps, for each ``k`` in ``steps``."""
    cfg = ConfigManager().parse_args(
        ["--job.config_file", CONFIG, "--optimizer.name", "GrokAdamW", "--optimizer.lr", str(LR),
         *overrides]
    )
    model = nn.Linear(2, 2)
    optimizers = build_optimizers([model], cfg.optimizer, parallel_dims=None)
    schedulers = build_lr_schedulers(optimizers, cfg.lr_scheduler, training_steps)
    out = {}
    for k in range(max(steps) + 1):
        if k in steps:
            lrs = {g["lr"] for g in optimizers.optimizers[0].param_groups}
            assert len(lrs) == 1  # decay and no-decay groups follow the same schedule
            out[k] = lrs.pop()
        schedulers.step()
    return [out[k] for k in steps]


def test_warmup_fraction_then_cosine_to_absolute_floor() -> None:
    # 10% of 100 steps = 10 warmup steps; floor 1e-4 = 0.1 * lr; cosine over the last 90.
    steps = [0, 4, 9, 10, 55, 100]
    got = lrs_at(["--lr_scheduler.warmup_fraction", "0.1", "--lr_scheduler.min_lr", "1e-4",
                  "--lr_scheduler.decay_type", "cosine", "--lr_scheduler.decay_ratio", "None"],
                 steps)
    halfway = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    expected = [0.1 * LR, 0.5 * LR, LR, LR, halfway * LR, 0.1 * LR]
    assert got == pytest.approx(expected, rel=1e-9)


def test_warmup_stable_decay_with_warmdown_fraction() -> None:
    # 5 warmup steps, flat until the last 20% (20 steps), then linear to 0.
    steps = [0, 4, 50, 80, 81, 90, 100]
    got = lrs_at(["--lr_scheduler.warmup_steps", "5", "--lr_scheduler.decay_ratio", "0.2",
                  "--lr_scheduler.decay_type", "linear", "--lr_scheduler.min_lr_factor", "0"],
                 steps)
    expected = [0.2 * LR, LR, LR, LR, 0.95 * LR, 0.5 * LR, 0.0]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_warmup_fraction_counts_total_steps_not_training_steps() -> None:
    # total_steps decouples the schedule from the run: 25% of 40 = 10 warmup steps.
    got = lrs_at(["--lr_scheduler.warmup_fraction", "0.25", "--lr_scheduler.total_steps", "40"],
                 [0, 9], training_steps=5)
    assert got == pytest.approx([0.1 * LR, LR], rel=1e-9)


@pytest.mark.parametrize("bad", [["--lr_scheduler.warmup_fraction", "1.5"],
                                 ["--lr_scheduler.min_lr", "0.01"]])
def test_out_of_range_values_are_rejected(bad: list[str]) -> None:
    with pytest.raises(ValueError):
        lrs_at(bad, [0])


def test_toml_selects_grok_adamw_with_its_options() -> None:
    cfg = ConfigManager().parse_args(
        ["--job.config_file", CONFIG, "--optimizer.name", "GrokAdamW", "--optimizer.grokfast",
         "--optimizer.no-cautious", "--optimizer.no-decay_embeddings"]
    )
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2))
    (opt,) = build_optimizers([model], cfg.optimizer, parallel_dims=None).optimizers
    decay, no_decay = opt.param_groups
    assert type(opt).__name__ == "GrokAdamW"
    assert decay["grokfast"] and not decay["cautious"]
    assert decay["betas"] == (cfg.optimizer.beta1, cfg.optimizer.beta2)
    assert [p.shape for p in decay["params"]] == [torch.Size([2, 3])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 2
