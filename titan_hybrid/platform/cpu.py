"""Run TorchTitan's trainer on machines without an accelerator.

TorchTitan 0.2.2 assumes a CUDA-like device module. On a CPU-only host it
(1) picks "cuda" as the device type, (2) asks ``torch.cpu`` for memory
statistics it does not have, and (3) passes ``current_device()`` (a string
on CPU) as a barrier ``device_ids`` entry. ``use_cpu_device`` fixes all three
in one place by pointing TorchTitan at ``CPUDeviceModule``. The fourth
obstacle, FSDP2's PREMUL_SUM reduce-scatter missing in gloo, belongs to
sharding and is handled in ``models/hybrid/parallelize.py``.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

# Modules that copied ``device_type`` / ``device_module`` at import time.
_TORCHTITAN_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.components.metrics",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.distributed.utils",
    "torchtitan.tools.profiling",
)


@dataclass(frozen=True)
class _CPUProperties:
    total_memory: int
    name: str = "CPU"


class CPUDeviceModule:
    """``torch.cpu`` plus the CUDA-style calls TorchTitan makes on its device module.

    Peak memory is the process's maximum resident set size, the closest CPU
    analogue of CUDA's peak reserved bytes.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    def current_device(self) -> int:
        return 0

    def set_device(self, device: torch.device | str | int) -> None:
        """CPU ranks share one device; nothing to select."""

    def get_device_name(self, device: Any = None) -> str:
        return "CPU"

    def get_device_properties(self, device: Any = None) -> _CPUProperties:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return _CPUProperties(total_memory=pages * page_size)

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "active_bytes.all.peak": peak_rss,
            "reserved_bytes.all.peak": peak_rss,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        """RSS peaks cannot be reset; the reported peak is since process start."""

    def empty_cache(self) -> None:
        """The CPU allocator has no cache to release."""

    def synchronize(self, device: Any = None) -> None:
        """CPU work is synchronous."""


def accelerator_available() -> bool:
    return torch.cuda.is_available()


def use_cpu_device() -> None:
    """Point every TorchTitan module at the CPU device module (idempotent)."""
    import torchtitan.tools.utils  # noqa: F401  (defines the originals)

    cpu_module = CPUDeviceModule()
    for name in _TORCHTITAN_MODULES:
        module = sys.modules.get(name)
        if module is None:
            module = __import__(name, fromlist=["_"])
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = cpu_module


def configure_platform() -> str:
    """Select the device TorchTitan trains on and return its type."""
    if accelerator_available():
        return "cuda"
    use_cpu_device()
    return "cpu"
