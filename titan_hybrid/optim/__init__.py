"""Optimizers and LR schedules: GrokAdamW and TorchTitan builders that select it from the TOML."""

from .builder import GrokAdamWContainer, build_optimizers, param_groups
from .grok_adamw import GrokAdamW
from .lr_schedule import build_lr_schedulers, resolve_lr_scheduler_config

__all__ = [
    "GrokAdamW",
    "GrokAdamWContainer",
    "build_lr_schedulers",
    "build_optimizers",
    "param_groups",
    "resolve_lr_scheduler_config",
]
