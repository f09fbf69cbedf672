import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"(?<!validate )step:\s*(\d+)\s+loss:\s*([0-9.]+)")  # training steps, not validation


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, share the cores between the workers: in-process training on every core
    in each worker at once oversubscribes them (one such test took 7x its serial time)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def run_cmd(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def logged_losses(output: str) -> dict[int, float]:
    """Rank-0 step -> loss from TorchTitan's metric lines."""
    return {int(s): float(l) for s, l in STEP_LINE.findall(output)}


@pytest.fixture
def run_train(tmp_path):
    """Launch ./run_train.sh with a dump folder under tmp_path."""

    def launch(config: str, *overrides: str, nproc: int = 2, timeout: int = 900):
        cmd = ["./run_train.sh", config, "--job.dump_folder", str(tmp_path / "run"), *overrides]
        return run_cmd(cmd, timeout=timeout, env={"NGPU": str(nproc)})

    return launch
