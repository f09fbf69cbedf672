"""The GPUs a process here may use, counted as CUDA would, without importing torch.

``run_train.sh`` runs ``python -m titan_hybrid.platform.gpu_count`` for its default number of ranks.
``torch.cuda.device_count()`` gives the same answer, but importing torch and initialising CUDA
for it took 6.5-7.75 s of a fresh H200's / H100's start-up (BENCHMARKS.md); this takes
milliseconds.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path


def torch_has_cuda() -> bool:
    """Whether the installed torch was built with CUDA: its ``torch/version.py`` names a CUDA
    version (``cuda = None`` in a CPU build), read without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    text = (Path(spec.origin).parent / "version.py").read_text()
    return re.search(r"^cuda\b[^=\n]*=\s*['\"]", text, re.MULTILINE) is not None


def visible_gpus() -> int:
    """``CUDA_VISIBLE_DEVICES``' devices when it is set (empty: none), else the GPUs (not MIG
    instances) that ``nvidia-smi --list-gpus`` lists; 0 without a driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    listed = subprocess.run([nvidia_smi, "--list-gpus"], capture_output=True, text=True, timeout=60)
    if listed.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


def gpu_count() -> int:
    return visible_gpus() if torch_has_cuda() else 0


if __name__ == "__main__":
    print(gpu_count())
