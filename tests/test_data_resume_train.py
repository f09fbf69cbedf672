"""Through run_train.sh (2 gloo ranks): resuming from a checkpoint continues the data stream exactly.

The per-step losses, bit-exact on CPU with ``debug.deterministic``, stand in for the
batches: a loader restarted from the beginning or from a wrong position changes them.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, INTERVAL = 6, 3
LOSS = re.compile(r"(?<!validate )step:\s*(\d+)\s+loss:\s*([0-9.]+)")


def train(dump_folder: Path) -> dict[int, str]:
    """Run the debug config on a tiny batch; returns the logged loss per step."""
    cmd = [
        "./run_train.sh",
        "train_configs/debug_cpu.toml",
        f"--job.dump_folder={dump_folder}",
        f"--training.steps={STEPS}",
        "--training.local_batch_size=2",
        "--training.seq_len=64",
        "--hybrid_data.shuffle_buffer=8",
        "--checkpoint.enable",
        f"--checkpoint.interval={INTERVAL}",
        "--metrics.log_freq=1",
    ]
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {int(step): loss for step, loss in LOSS.findall(proc.stdout + proc.stderr)}


@pytest.mark.distributed
def test_resumed_run_sees_the_same_batches_as_an_uninterrupted_one(tmp_path):
    uninterrupted = train(tmp_path / "full")
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))

    # Resume a copy of the run from its step-3 checkpoint (the step-6 one removed).
    checkpoints = tmp_path / "full" / "checkpoint"
    assert (checkpoints / f"step-{INTERVAL}").is_dir()
    shutil.copytree(checkpoints, tmp_path / "resumed" / "checkpoint", ignore=shutil.ignore_patterns(f"step-{STEPS}"))
    resumed = train(tmp_path / "resumed")

    assert sorted(resumed) == list(range(INTERVAL + 1, STEPS + 1))
    assert resumed == {s: uninterrupted[s] for s in resumed}
