"""Fault-tolerant checkpoints: kill -9 + resume, fewer ranks, damaged checkpoints, non-finite loss.

Each test launches CPU runs (gloo, FSDP2) through run_train.sh; see tests/_train_runs.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from _train_runs import INTERVAL, STEPS, records, reference_run, train, train_until_killed
from titan_hybrid.checkpoint import COMPLETE_MARKER, RNGState, newest_resumable_step, purge_superseded
from titan_hybrid.export import load_checkpoint_model

REFERENCE_ARGS = ["--training.steps", str(STEPS), "--checkpoint.interval", str(INTERVAL)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory.getbasetemp())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in folder.iterdir() if p.is_file()}


@pytest.mark.distributed
def test_kill_9_after_step_10_then_resume_is_bit_exact(reference, tmp_path):
    dump = tmp_path / "run"
    train_until_killed(dump, dump / "checkpoint" / "step-10" / COMPLETE_MARKER, *REFERENCE_ARGS)
    assert max(records(dump)) < STEPS, "the kill came too late to test anything"

    log = train(dump, *REFERENCE_ARGS).stdout

    assert f"Loading the checkpoint from {dump}/checkpoint/step-10." in log
    want, got = records(reference), records(dump)
    for step in range(11, STEPS + 1):
        assert got[step]["loss"] == want[step]["loss"], f"step {step}"
        assert got[step]["rows"] == want[step]["rows"], f"step {step}: different samples"
        assert got[step]["rng"] == want[step]["rng"], f"step {step}: Python / NumPy / torch RNG state differs"


@pytest.mark.distributed
def test_resume_on_one_rank_continues_loss_and_data(reference, tmp_path):
    """Saved with 2 ranks, resumed with 1 (same global batch through gradient accumulation)."""
    dump = tmp_path / "run"
    shutil.copytree(reference / "checkpoint" / "step-10", dump / "checkpoint" / "step-10")
    want = records(reference)

    log = train(dump, *REFERENCE_ARGS, ranks=1).stdout

    assert f"Loading the checkpoint from {dump}/checkpoint/step-10." in log
    got = records(dump)
    assert sorted(got) == list(range(11, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert got[step]["rows"] == want[step]["rows"], f"step {step}: samples repeated or skipped"
    # Step 11 runs the saved weights on the same rows: the same loss. Later steps differ only by
    # the order of the gradient sums (one rank instead of a 2-rank reduce-scatter), which Adam
    # amplifies to ~1e-4..7e-4 relative by step 20; a wrong batch moves the loss by ~1e-2..1e-1.
    assert got[11]["loss"] == pytest.approx(want[11]["loss"], rel=1e-6)
    for step in range(12, STEPS + 1):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=2e-3), f"step {step}"


@pytest.mark.distributed
def test_resume_with_other_data_streams_says_how(reference, tmp_path):
    dump = tmp_path / "run"
    shutil.copytree(reference / "checkpoint" / "step-10", dump / "checkpoint" / "step-10")

    proc = train(dump, *REFERENCE_ARGS, "--hybrid_data.streams", "4", "--training.local_batch_size", "4",
                 "--training.global_batch_size", "8", check=False)  # fmt: skip

    assert proc.returncode != 0
    assert "its [hybrid_data] streams differ" in proc.stdout and "--hybrid_data.streams" in proc.stdout


def overwrite_middle(path: Path) -> None:
    """Same-size damage: 64 bytes in the middle of the file replaced by their complement."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        block = f.read(64)
        f.seek(-len(block), 1)
        f.write(bytes(255 - b for b in block))


@pytest.mark.distributed
def test_damaged_latest_checkpoint_falls_back_and_keeps_everything(reference, tmp_path):
    """Same-size garbage in ``.metadata`` (unpicklable) is caught by its checksum before DCP reads it."""
    dump = tmp_path / "run"
    shutil.copytree(reference / "checkpoint", dump / "checkpoint")
    ckpt = dump / "checkpoint"
    overwrite_middle(ckpt / "step-15" / ".metadata")
    before = {step: snapshot(ckpt / step) for step in ("step-5", "step-10", "step-15")}

    log = train(dump, *REFERENCE_ARGS).stdout

    assert "Checkpoint step-15: file .metadata has xxh3_64 " in log and "(same size, altered content)" in log
    assert "Falling back to step-10. Nothing in" in log
    assert f"Loading the checkpoint from {ckpt}/step-10." in log
    assert log.count("Checkpointing active") == 1, "one checkpoint manager, built once"
    want, got = records(reference), records(dump)
    assert [got[s]["loss"] for s in range(11, STEPS + 1)] == [want[s]["loss"] for s in range(11, STEPS + 1)]
    # Nothing was deleted or rewritten: the damaged step-15 was set aside when step 15 was saved again.
    assert snapshot(ckpt / "step-5") == before["step-5"] and snapshot(ckpt / "step-10") == before["step-10"]
    (aside,) = (ckpt / "superseded").glob("step-15.*")
    assert snapshot(aside) == before["step-15"]


@pytest.mark.distributed
def test_fallback_is_fatal_with_on_fallback_stop(reference, tmp_path):
    dump = tmp_path / "run"
    shutil.copytree(reference / "checkpoint", dump / "checkpoint")
    overwrite_middle(dump / "checkpoint" / "step-15" / "__1_0.distcp")

    proc = train(dump, *REFERENCE_ARGS, "--checkpoint.on_fallback", "stop", check=False)

    assert proc.returncode != 0
    assert f"{dump}/checkpoint/step-15: file __1_0.distcp has xxh3_64" in proc.stdout
    assert "not falling back to step-10 ([checkpoint] on_fallback = 'stop')" in proc.stdout
    assert not records(dump), "it trained"


@pytest.mark.distributed
def test_incomplete_or_damaged_checkpoints_are_never_chosen(reference, tmp_path):
    folder = tmp_path / "checkpoint"
    for step in (5, 10, 15, 20, 25, 30, 35):
        shutil.copytree(reference / "checkpoint" / "step-10", folder / f"step-{step}")
    (folder / "step-10" / ".metadata").unlink()  # died before DCP's final write
    (folder / "step-15" / COMPLETE_MARKER).unlink()  # died before the save was confirmed
    with open(folder / "step-20" / "__0_0.distcp", "ab") as f:  # altered after the fact
        f.write(b"x")
    marker = folder / "step-25" / COMPLETE_MARKER  # a last save with last_save_model_only
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "model_only": True}))
    overwrite_middle(folder / "step-30" / "__1_0.distcp")  # same size, a weight altered
    overwrite_middle(folder / "step-35" / ".metadata")  # same size, unpicklable

    step, reasons = newest_resumable_step(str(folder))

    assert step == 5
    assert [r.split(":")[0] for r in reasons] == ["step-35", "step-30", "step-25", "step-20", "step-15", "step-10"]
    assert "file .metadata has xxh3_64" in reasons[0] and "file __1_0.distcp has xxh3_64" in reasons[1]
    assert "model-only" in reasons[2] and "bytes" in reasons[3] and COMPLETE_MARKER in reasons[4]
    assert "missing .metadata" in reasons[5]


@pytest.mark.distributed
def test_resume_step_on_a_model_only_checkpoint_says_so(reference, tmp_path):
    dump = tmp_path / "run"
    shutil.copytree(reference / "checkpoint", dump / "checkpoint")

    proc = train(dump, *REFERENCE_ARGS, "--checkpoint.load_step", "20", check=False)

    assert proc.returncode != 0
    assert proc.stdout.rstrip().splitlines()[-1].endswith(
        f"checkpoint.load_step=20: {dump}/checkpoint/step-20 cannot be loaded: it is model-only "
        "(last_save_model_only), it cannot restore optimizer and data state: resume from step-15 (the newest "
        f"full one), or start a new run from its weights with --checkpoint.initial_load_path "
        f"{dump}/checkpoint/step-20 --checkpoint.initial_load_model_only"
    )
    assert "streams differ" not in proc.stdout


def test_superseded_folders_are_capped(tmp_path):
    for i in range(5):
        (tmp_path / f"step-{i}.x").mkdir()
        os.utime(tmp_path / f"step-{i}.x", ns=(i * 10**9, i * 10**9))

    purge_superseded(str(tmp_path), keep=2)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3.x", "step-4.x"]
    purge_superseded(str(tmp_path), keep=0)
    assert len(list(tmp_path.iterdir())) == 2


def test_rng_state_round_trip():
    rng = RNGState()
    saved = rng.state_dict()
    first = torch.rand(4), torch.randint(0, 1000, (4,))
    rng.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(first, (torch.rand(4), torch.randint(0, 1000, (4,)))))


NAN_ARGS = ["--training.steps", "4", "--resilience.inject_nonfinite_loss_at", "3"]


@pytest.mark.distributed
def test_nonfinite_loss_stops_the_run_without_a_checkpoint(tmp_path):
    dump = tmp_path / "run"

    proc = train(dump, *NAN_ARGS, "--checkpoint.interval", "2", check=False)

    assert proc.returncode != 0
    assert "step 3: non-finite loss nan" in proc.stdout and "stopping" in proc.stdout
    assert f"The newest good checkpoint is {dump}/checkpoint/step-2: run the same command" in proc.stdout
    assert (dump / "nonfinite" / "step_3_rank_0.pt").is_file()
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == ["step-2"]
    model = load_checkpoint_model(str(dump / "checkpoint" / "step-2"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.distributed
def test_nonfinite_loss_skips_the_update(tmp_path):
    dump = tmp_path / "run"

    log = train(dump, *NAN_ARGS, "--checkpoint.interval", "1", "--resilience.on_nonfinite_loss", "skip").stdout

    assert "step 3: non-finite loss nan" in log and "skipping the update" in log
    rec = records(dump)
    assert [rec[s]["skipped"] for s in (1, 2, 3, 4)] == [False, False, True, False]
    ckpt = dump / "checkpoint"
    at_2, at_3 = (load_checkpoint_model(str(ckpt / f"step-{s}")).state_dict() for s in (2, 3))
    assert all(torch.equal(at_2[k], at_3[k]) for k in at_2), "the skipped step changed the weights"
    assert all(torch.isfinite(p).all() for p in load_checkpoint_model(str(ckpt / "step-4")).parameters())


@pytest.mark.distributed
def test_nonfinite_grad_norm_is_skipped_and_capped(tmp_path):
    """lr 1e6: the loss stays finite, the gradients turn NaN from step 2 on; two skips, then a stop."""
    dump = tmp_path / "run"

    proc = train(dump, "--training.steps", "4", "--optimizer.lr", "1e6", "--checkpoint.interval", "1",
                 "--resilience.on_nonfinite_loss", "skip", "--resilience.max_consecutive_skips", "2",
                 check=False)  # fmt: skip

    assert proc.returncode != 0
    assert "step 2: loss " in proc.stdout and ", non-finite grad norm nan;" in proc.stdout
    assert "skipping the update (resilience.on_nonfinite_loss = 'skip', 2 in a row of at most 2)" in proc.stdout
    assert "3 non-finite steps in a row, more than resilience.max_consecutive_skips = 2: stopping." in proc.stdout
    assert f"The newest good checkpoint is {dump}/checkpoint/step-3: run the same command" in proc.stdout
    rec = records(dump)
    assert all(rec[s]["loss"] == rec[s]["loss"] for s in rec), "the loss itself stayed finite"
    assert [rec[s]["skipped"] for s in (1, 2, 3, 4)] == [False, True, True, True]
    at = {s: load_checkpoint_model(str(dump / "checkpoint" / f"step-{s}")).state_dict() for s in (1, 3)}
    assert all(torch.equal(at[1][k], at[3][k]) for k in at[1]), "a NaN-gradient update was applied"
