"""Depth recurrence in training: the parameter-golf-shaped config on 2 CPU ranks (FSDP2) switches
recurrence on at its step, counts its FLOPs, logs the step time before and after, and a kill -9 +
resume across the switch (or after it) continues bit-exactly. See tests/_train_runs.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from _train_runs import ROOT, STEPS, records, train, train_until_killed
from titan_hybrid.checkpoint import COMPLETE_MARKER
from titan_hybrid.export import load_checkpoint_model

pytestmark = pytest.mark.distributed

CONFIG = ROOT / "train_configs" / "pgolf_gdn_attn.toml"
SWITCH = 11  # recur_start 0.5 of 20 steps: steps 1-10 without, 11-20 with the second pass
ARGS = [
    "--training.steps", str(STEPS),
    "--checkpoint.interval", "5",
    "--hybrid_model.recur_start", "0.5",
    "--hybrid_model.dim", "64",
    "--hybrid_model.ffn_dim", "128",
    "--hybrid_model.rope_dims", "4",  # of 8 head dims
    "--training.mixed_precision_param", "float32",
    "--compile.no-enable",
    "--metrics.no-enable-tensorboard",
    "--metrics.log_freq", "1",
    "--lr_scheduler.warmup_steps", "2",
    "--hybrid_data.streams", "2",
    "--hybrid_data.shuffle_buffer", "100",
    "--hybrid_data.web.path", "./data_pipelines/fixtures/fineweb-edu",
    "--hybrid_data.code.path", "./data_pipelines/fixtures/starcoderdata",
    "--hybrid_data.reasoning.path", "./data_pipelines/fixtures/openr1",
]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, str]:
    dump = tmp_path_factory.mktemp("pgolf") / "reference"
    return dump, train(dump, *ARGS, config=CONFIG).stdout


def test_pgolf_config_trains_and_switches_recurrence_on_at_its_step(reference):
    dump, log = reference
    switch = re.search(r"depth recurrence on from step (\d+): blocks 4\.\.5 run twice, depth 13, "
                       r"FLOPs per token ([\d,]+) -> ([\d,]+)", log)  # fmt: skip
    assert switch, log[-4000:]
    assert int(switch[1]) == SWITCH
    before, after = (int(switch[i].replace(",", "")) for i in (2, 3))
    assert after > before
    assert re.search(r"depth recurrence: step time [\d.]+ s before the switch \(mean of \d+ steps\), "
                     r"[\d.]+ s after \(mean of 5\)", log)  # fmt: skip
    losses = [records(dump)[s]["loss"] for s in range(1, STEPS + 1)]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses


def test_kill_9_before_the_switch_then_resume_is_bit_exact(reference, tmp_path):
    want = records(reference[0])
    dump = tmp_path / "run"
    train_until_killed(dump, dump / "checkpoint" / "step-10" / COMPLETE_MARKER, *ARGS, config=CONFIG)
    assert max(records(dump)) < STEPS, "the kill came too late to test anything"

    log = train(dump, *ARGS, config=CONFIG).stdout

    assert f"Loading the checkpoint from {dump}/checkpoint/step-10." in log
    assert f"depth recurrence on from step {SWITCH}:" in log
    got = records(dump)
    for step in range(11, STEPS + 1):
        assert got[step]["loss"] == want[step]["loss"], f"step {step}"
        assert got[step]["rows"] == want[step]["rows"], f"step {step}: different samples"


def test_a_run_resumed_after_the_switch_resumes_with_it_on(reference, tmp_path):
    want = records(reference[0])
    dump = tmp_path / "run"
    shutil.copytree(reference[0] / "checkpoint" / "step-15", dump / "checkpoint" / "step-15")

    log = train(dump, *ARGS, config=CONFIG).stdout

    assert "depth recurrence on from step 16:" in log
    got = records(dump)
    assert [got[s]["loss"] for s in range(16, STEPS + 1)] == [want[s]["loss"] for s in range(16, STEPS + 1)]


def test_its_checkpoints_load_for_inference_as_they_ran(reference):
    """Export, generate and evaluate load a checkpoint with recurrence on exactly when training had it."""
    folder = reference[0] / "checkpoint"
    assert not load_checkpoint_model(str(folder / "step-10")).recurrence_on
    assert load_checkpoint_model(str(folder / "step-15")).recurrence_on
