"""run_train.sh's process count: the GPUs CUDA would see, counted without importing torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/bin:/bin"
CUDA_BUILD = "from typing import Optional\n__version__ = '2.11.0+cu130'\ncuda: Optional[str] = '13.0'\n"
CPU_BUILD = "from typing import Optional\n__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n"


def launched_ranks(tmp_path: Path, nvidia_smi: str | None, torch_version: str, **env: str) -> tuple[str, str | None]:
    """``--nproc_per_node`` that run_train.sh gives torchrun, and the OMP_NUM_THREADS the ranks get.

    ``PYTHON`` is a stand-in that runs the GPU count with this interpreter (over a stand-in torch
    package whose ``version.py`` is ``torch_version``) and prints what the launch would run;
    ``nvidia_smi`` is what a stand-in nvidia-smi prints for ``--list-gpus`` (None: there is none)."""
    bin_dir, fake_torch = tmp_path / "bin", tmp_path / "site" / "torch"
    bin_dir.mkdir()
    fake_torch.mkdir(parents=True)
    (fake_torch / "__init__.py").write_text("")
    (fake_torch / "version.py").write_text(torch_version)
    fake_python = bin_dir / "fake_python"
    fake_python.write_text(
        "#!/bin/sh\n"
        f'if [ "$2" = titan_hybrid.platform.gpu_count ]; then exec {sys.executable} "$@"; fi\n'
        'echo "args: $*"\necho "omp: ${OMP_NUM_THREADS-unset}"\n'
    )
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{nvidia_smi}'\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    config = tmp_path / "run.toml"
    config.write_text("")
    base = {k: v for k, v in os.environ.items() if k not in ("NGPU", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    base.update(PATH=f"{bin_dir}:{SYSTEM_PATH}", PYTHON=str(fake_python), PYTHONPATH=f"{fake_torch.parent}:{ROOT}",
                TITAN_HYBRID_CACHE_DIR=str(tmp_path / "cache"))  # fmt: skip
    out = subprocess.run([str(ROOT / "run_train.sh"), str(config)], env={**base, **env}, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    args = out.split("args: ")[1].split("\n")[0].split()
    omp = out.split("omp: ")[1].strip()
    return args[args.index("--nproc_per_node") + 1], None if omp == "unset" else omp


TWO_GPUS = "GPU 0: NVIDIA H200 (UUID: GPU-a)\\nGPU 1: NVIDIA H200 (UUID: GPU-b)\\n"
MIG = "GPU 0: NVIDIA H100 (UUID: GPU-a)\\n  MIG 1g.10gb Device 0: (UUID: MIG-x)\\n"
CPU_RANKS = ("2", "1")  # two gloo ranks, one thread each


@pytest.mark.parametrize(
    ("nvidia_smi", "torch_version", "env", "expected"),
    [
        (TWO_GPUS, CUDA_BUILD, {}, ("2", None)),  # every GPU nvidia-smi lists
        (MIG, CUDA_BUILD, {}, ("1", None)),  # GPUs, not their MIG instances
        (TWO_GPUS, CUDA_BUILD, {"CUDA_VISIBLE_DEVICES": "1"}, ("1", None)),  # what CUDA may use wins
        (TWO_GPUS, CUDA_BUILD, {"CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b"}, ("2", None)),
        (TWO_GPUS, CUDA_BUILD, {"CUDA_VISIBLE_DEVICES": ""}, CPU_RANKS),  # no GPU visible
        (TWO_GPUS, CPU_BUILD, {}, CPU_RANKS),  # torch cannot use them
        (None, CUDA_BUILD, {}, CPU_RANKS),  # no driver
        ("", CUDA_BUILD, {}, CPU_RANKS),  # a driver without GPUs
        (TWO_GPUS, CUDA_BUILD, {"NGPU": "1"}, ("1", None)),  # given: no count
    ],
)
def test_process_count_follows_the_gpus_torch_could_use(tmp_path, nvidia_smi, torch_version, env, expected):
    if nvidia_smi is None and shutil.which("nvidia-smi", path=SYSTEM_PATH):
        pytest.skip("this machine's nvidia-smi is on the system PATH")
    assert launched_ranks(tmp_path, nvidia_smi, torch_version, **env) == expected


def test_the_count_agrees_with_torch_here():
    """On this machine (whatever it has), the count is what torch itself says."""
    import torch

    from titan_hybrid.platform.gpu_count import gpu_count

    assert gpu_count() == torch.cuda.device_count()
