"""run_train.sh's process count: the GPUs CUDA would see, counted without importing torch."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/bin:/bin"


def launched_ranks(tmp_path: Path, nvidia_smi: str | None, **env: str) -> tuple[str, str | None]:
    """``--nproc_per_node`` run_train.sh passes to torchrun, and the OMP_NUM_THREADS the ranks get.

    ``PYTHON`` is a stand-in that prints what it was given; ``nvidia_smi`` is what a stand-in
    nvidia-smi prints for ``--list-gpus`` (None: there is no nvidia-smi on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_python = bin_dir / "fake_python"
    fake_python.write_text('#!/bin/sh\necho "args: $*"\necho "omp: ${OMP_NUM_THREADS-unset}"\n')
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{nvidia_smi}'\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    config = tmp_path / "run.toml"
    config.write_text("")
    base = {k: v for k, v in os.environ.items() if k not in ("NGPU", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    base.update(PATH=f"{bin_dir}:{SYSTEM_PATH}", PYTHON=str(fake_python), TITAN_HYBRID_CACHE_DIR=str(tmp_path / "c"))
    out = subprocess.run([str(ROOT / "run_train.sh"), str(config)], env={**base, **env}, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    args = out.split("args: ")[1].split("\n")[0].split()
    omp = out.split("omp: ")[1].strip()
    return args[args.index("--nproc_per_node") + 1], None if omp == "unset" else omp


TWO_GPUS = "GPU 0: NVIDIA H200 (UUID: GPU-a)\\nGPU 1: NVIDIA H200 (UUID: GPU-b)\\n"
MIG = "GPU 0: NVIDIA H100 (UUID: GPU-a)\\n  MIG 1g.10gb Device 0: (UUID: MIG-x)\\n"


@pytest.mark.parametrize(
    ("nvidia_smi", "env", "expected"),
    [
        (TWO_GPUS, {}, ("2", None)),  # every GPU nvidia-smi lists
        (MIG, {}, ("1", None)),  # GPUs, not their MIG instances
        (TWO_GPUS, {"CUDA_VISIBLE_DEVICES": "1"}, ("1", None)),  # what CUDA may use wins
        (TWO_GPUS, {"CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b"}, ("2", None)),
        (TWO_GPUS, {"CUDA_VISIBLE_DEVICES": ""}, ("2", "1")),  # no GPU visible: 2 CPU ranks
        (None, {}, ("2", "1")),  # no driver
        ("", {}, ("2", "1")),  # a driver without GPUs
        (TWO_GPUS, {"NGPU": "1"}, ("1", None)),  # given: no count
    ],
)
def test_process_count_follows_the_visible_gpus(tmp_path, nvidia_smi, env, expected):
    if nvidia_smi is None and shutil.which("nvidia-smi", path=SYSTEM_PATH):
        pytest.skip("this machine's nvidia-smi is on the system PATH")
    assert launched_ranks(tmp_path, nvidia_smi, **env) == expected
