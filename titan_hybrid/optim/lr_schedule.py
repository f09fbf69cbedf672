"""TorchTitan ``build_lr_schedulers_fn`` with warmup as a fraction and an absolute LR floor.

TorchTitan 0.2.2 already has both schedules: linear warmup + cosine to a floor
(``decay_type = "cosine"``, ``min_lr_factor``) and warmup-stable-decay (``decay_ratio`` is the
warmdown fraction). What it lacks is warmup given as a fraction of the run (``warmup_fraction``)
and the floor given as a learning rate (``min_lr``), fields that ``titan_hybrid.config.job_config``
adds to ``[lr_scheduler]``. They are resolved to TorchTitan's own fields here, so the schedule
and its checkpointed state are TorchTitan's.
"""

import dataclasses

from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.lr_scheduler import build_lr_schedulers as build_torchtitan_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import LRScheduler as LRSchedulerConfig

__all__ = ["build_lr_schedulers", "resolve_lr_scheduler_config"]


def resolve_lr_scheduler_config(
    config: LRSchedulerConfig, training_steps: int, peak_lr: float
) -> LRSchedulerConfig:
    """A copy of ``config`` with ``warmup_fraction``/``min_lr`` turned into steps/a factor."""
    changes = {}
    warmup_fraction = getattr(config, "warmup_fraction", None)
    if warmup_fraction is not None:
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1], got {warmup_fraction}")
        total = config.total_steps if config.total_steps is not None else training_steps
        changes["warmup_steps"] = round(warmup_fraction * total)
    min_lr = getattr(config, "min_lr", None)
    if min_lr is not None:
        if not 0.0 <= min_lr <= peak_lr:
            raise ValueError(f"min_lr must lie in [0, optimizer.lr = {peak_lr}], got {min_lr}")
        changes["min_lr_factor"] = min_lr / peak_lr if peak_lr > 0 else 0.0
    return dataclasses.replace(config, **changes)


def build_lr_schedulers(
    optimizers: OptimizersContainer,
    lr_scheduler_config: LRSchedulerConfig,
    training_steps: int,
) -> LRSchedulersContainer:
    """TorchTitan's warmup/stable/decay schedulers after resolving the fractional fields."""
    peak_lr = optimizers.optimizers[0].param_groups[0]["lr"]
    config = resolve_lr_scheduler_config(lr_scheduler_config, training_steps, peak_lr)
    return build_torchtitan_lr_schedulers(optimizers, config, training_steps)
