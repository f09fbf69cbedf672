"""Launch short CPU training runs through run_train.sh and read their step records."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train_configs" / "debug_cpu.toml"
# Small and exact: tiny batches, every step recorded, checkpoints on.
SMALL = [
    "--training.seq_len", "64",
    "--training.local_batch_size", "2",
    "--training.global_batch_size", "4",
    "--resilience.step_record",
    "--checkpoint.enable",
    "--checkpoint.keep_latest_k", "0",  # every checkpoint stays: the tests compare them
    "--hybrid_data.loader", "thread",  # starts seconds faster per rank; the data does not depend on it
]  # fmt: skip
STEPS = 20
INTERVAL = 5


def _command(dump: Path, args: list[str], config: Path = CONFIG) -> list[str]:
    return [str(ROOT / "run_train.sh"), str(config), *SMALL, "--job.dump_folder", str(dump), *args]


def _env(ranks: int) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "NGPU": str(ranks), "OMP_NUM_THREADS": "1", "LOG_RANK": "0"}


def train(
    dump: Path, *args: str, ranks: int = 2, check: bool = True, config: Path = CONFIG
) -> subprocess.CompletedProcess:
    """Run to completion; the combined output is in ``.stdout``."""
    proc = subprocess.run(
        _command(dump, list(args), config), env=_env(ranks), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    dump.mkdir(parents=True, exist_ok=True)
    (dump / f"run_{time.monotonic_ns()}.log").write_text(proc.stdout)  # for post-mortems
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def train_until_killed(
    dump: Path, kill_when: Path, *args: str, ranks: int = 2, timeout: float = 300, config: Path = CONFIG
) -> None:
    """Start a run and ``kill -9`` every process of it as soon as ``kill_when`` exists."""
    proc = subprocess.Popen(
        _command(dump, list(args), config), env=_env(ranks), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout
    try:
        while not kill_when.exists():
            assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {kill_when} appeared"
            assert time.monotonic() < deadline, f"{kill_when} did not appear in {timeout} s"
            time.sleep(0.05)
    finally:
        # torchrun starts each worker in its own session: kill the whole tree, pid by pid.
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def _descendants(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return [d for k in kids for d in (k, *_descendants(k))]


def records(dump: Path) -> dict[int, dict]:
    """Per step: the exact global loss, whether it was skipped, every rank's batch rows and RNG fingerprint.

    A resumed run appends to the same files; the last line for a step wins.
    """
    per_rank: dict[int, dict[int, dict]] = {}
    for path in sorted((dump / "step_record").glob("rank_*.jsonl")):
        rank = int(path.stem.split("_")[1])
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            per_rank.setdefault(rec["step"], {})[rank] = rec
    out = {}
    for step, ranks in per_rank.items():
        losses = {r["loss"] for r in ranks.values()}
        assert len(losses) == 1 or all(l != l for l in losses), f"ranks disagree on step {step}: {losses}"
        rows = sorted(row for r in ranks.values() for mb in r["rows"] for row in mb)
        first = ranks[min(ranks)]
        rng = [ranks[r].get("rng") for r in sorted(ranks)]
        out[step] = {"loss": first["loss"], "skipped": first["skipped"], "rows": rows, "rng": rng}
    return out


@functools.cache
def reference_run(base: Path) -> Path:
    """2 ranks, 20 uninterrupted steps, full checkpoints every 5 steps (step-20 is model-only)."""
    dump = base / "reference"
    train(dump, "--training.steps", str(STEPS), "--checkpoint.interval", str(INTERVAL))
    return dump
