"""Depth recurrence during training: the switch at its step, the FLOP count, the step-time log.

With ``[hybrid_model] recur_layers = [i, j]`` and ``recur_start = f`` the blocks ``i..j`` run a
second time (same weights) from step ``floor(f * training.steps) + 1`` on. The switch is a
function of the step alone, so a run resumed from any checkpoint, before or after it, runs
exactly as the uninterrupted one. TorchTitan's FLOP count per token (and so its MFU) is
recomputed when it flips, and the mean step time before and after is logged.
"""

from __future__ import annotations

import statistics
import time

from torch import nn
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger

from titan_hybrid.models.hybrid import HybridModelArgs

# Steps after the switch whose time is compared with the steps before it (the first step after
# the switch is left out: it may still compile or tune for the longer graph).
STEPS_COMPARED = 5


class DepthRecurrence:
    def __init__(
        self,
        model_args: HybridModelArgs,
        model_parts: list[nn.Module],
        metrics: MetricsProcessor,
        seq_len: int,
        total_steps: int,
    ):
        self.model_args, self.model_parts, self.metrics = model_args, model_parts, metrics
        self.seq_len, self.total_steps = seq_len, total_steps
        self.step_times: dict[bool, list[float]] = {False: [], True: []}
        self._started = 0.0

    @property
    def on(self) -> bool:
        return self.model_parts[0].recurrence_on

    def before_step(self, step: int) -> None:
        on = self.model_args.recurrence_on_at(step, self.total_steps)
        if on != self.on:
            self._switch(on, step)
        self._started = time.perf_counter()

    def after_step(self) -> None:
        times = self.step_times[self.on]
        times.append(time.perf_counter() - self._started)
        before, after = self.step_times[False][1:], self.step_times[True][1:]  # first step: warm-up
        if self.on and len(after) == STEPS_COMPARED and before:
            without, with_ = statistics.mean(before), statistics.mean(after)
            logger.info(
                f"depth recurrence: step time {without:.4f} s before the switch (mean of {len(before)} steps), "
                f"{with_:.4f} s after (mean of {len(after)}): {with_ / without:.2f}x"
            )

    def _switch(self, on: bool, step: int) -> None:
        old = self.metrics.num_flops_per_token
        for model in self.model_parts:
            model.recurrence_on = on
        _, self.metrics.num_flops_per_token = self.model_args.get_nparams_and_flops(
            self.model_parts[0], self.seq_len, recurrence_on=on
        )
        first, last = self.model_args.recur_layers
        depth = len(self.model_args.depth_order(on))
        logger.info(
            f"depth recurrence {'on' if on else 'off'} from step {step}: blocks {first}..{last} "
            f"{'run twice' if on else 'once'}, depth {depth}, FLOPs per token {old:,} -> "
            f"{self.metrics.num_flops_per_token:,}"
        )
