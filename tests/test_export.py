"""Export a 2-rank DCP checkpoint to safetensors and back, checked against the live training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.config import ConfigManager

from _train_runs import CONFIG, SMALL, records, reference_run, train
from data_pipelines.dataloader import build_hybrid_dataloader
from titan_hybrid.export import export, load_checkpoint_model, load_exported, to_seed_checkpoint
from titan_hybrid.trainer import row_fingerprints


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory.getbasetemp())


def global_batches(step: int, ranks: int = 2) -> list[tuple[dict, torch.Tensor]]:
    """Each dp rank's batch at ``step`` of a fresh run, rebuilt in this process."""
    config = ConfigManager().parse_args(["--job.config_file", str(CONFIG), *SMALL])
    tokenizer = build_hf_tokenizer(config)
    batches = []
    for rank in range(ranks):
        loader = iter(build_hybrid_dataloader(ranks, rank, tokenizer, config))
        for _ in range(step):
            batch = next(loader)
        batches.append(batch)
    return batches


def global_loss(model: torch.nn.Module, batches: list[tuple[dict, torch.Tensor]]) -> float:
    """The trainer's loss: every rank's token-summed CE over the global count of supervised tokens, summed."""
    n_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
    with torch.no_grad():
        shares = [cross_entropy_loss(model(**inputs_of(x)), y) / n_tokens for x, y in batches]
    return torch.stack(shares).sum().item()


def inputs_of(input_dict: dict) -> dict:
    return {"tokens": input_dict["input"], **{k: v for k, v in input_dict.items() if k != "input"}}


@pytest.mark.distributed
def test_export_load_matches_the_live_model(reference, tmp_path):
    out = tmp_path / "exported"
    export(str(reference), str(out), step=10)
    exported = load_exported(str(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    # Same logits as the checkpointed (FSDP-sharded) model ...
    tokens = torch.randint(0, exported.model_args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(tokens), load_checkpoint_model(str(reference / "checkpoint" / "step-10"))(tokens))
    # ... and the loss the live 2-rank run logged at step 11, with the step-10 weights, on step 11's data.
    step_11 = records(reference)[11]
    batches = global_batches(11)
    assert sorted(r for x, _ in batches for r in row_fingerprints(x["input"])) == step_11["rows"]
    assert global_loss(exported, batches) == pytest.approx(step_11["loss"], rel=1e-6)


@pytest.mark.distributed
def test_run_starts_from_an_exported_model(reference, tmp_path):
    exported, seed = tmp_path / "exported", tmp_path / "seed"
    export(str(reference), str(exported), step=10)
    to_seed_checkpoint(str(exported), str(seed))
    dump = tmp_path / "run"

    log = train(dump, "--training.steps", "1", "--checkpoint.initial_load_path", str(seed)).stdout

    assert f"Loading the checkpoint from {seed}." in log
    loss = global_loss(load_exported(str(exported)), global_batches(1))
    assert records(dump)[1]["loss"] == pytest.approx(loss, rel=1e-6)
