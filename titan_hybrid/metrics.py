"""TorchTitan's metrics processor (``build_metrics_processor_fn``) with what a hybrid run adds.

On top of TorchTitan's metrics (loss, grad norm, lr, tokens/s, MFU, memory; to TensorBoard with
``[metrics] enable_tensorboard``) it logs the data mix actually served (``data_mix/<source>``:
each source's fraction of the input tokens trained on so far, over all dp ranks), an ETA
(``time_metrics/eta(s)``, also at the end of the step line), and the validation numbers per
source. On CPU it leaves out TFLOPS and MFU: TorchTitan has no peak FLOPS for a CPU and would
divide by an A100's.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
from typing import Any

from torch.distributed._functional_collectives import all_reduce
from torchtitan.components.metrics import BaseLogger, MetricsProcessor
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools import utils
from torchtitan.tools.logging import logger

from data_pipelines.dataloader import SOURCES, HybridDataLoader

FLOPS_KEYS = ("tflops", "mfu(%)")
_FLOPS_IN_LINE = re.compile(r"\s*(\x1b\[[0-9;]*m)?tflops: \S+\s+(\x1b\[[0-9;]*m)?mfu: \S+%")


class _WithoutKeys(BaseLogger):
    """Drops some metrics before TorchTitan's TensorBoard / W&B loggers see them."""

    def __init__(self, inner: BaseLogger, keys: tuple[str, ...]):
        self.inner, self.keys = inner, keys

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.inner.log({k: v for k, v in metrics.items() if k not in self.keys}, step)

    def close(self) -> None:
        self.inner.close()


class _StepLine(logging.Filter):
    """Edits TorchTitan's step line, which has no hook: appends the ETA, drops TFLOPS / MFU on CPU."""

    def __init__(self, processor: HybridMetricsProcessor):
        super().__init__()
        self.processor = processor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if " loss: " in message and "mfu: " in message:
            if not self.processor.show_flops:
                message = _FLOPS_IN_LINE.sub("", message)
            record.msg, record.args = f"{message}  eta: {self.processor.eta}", ()
        return True


class HybridMetricsProcessor(MetricsProcessor):
    dataloader: HybridDataLoader | None = None
    """Set by ``HybridTrainer``: its ``served_tokens`` are the data mix."""

    def __init__(self, job_config: JobConfig, parallel_dims: ParallelDims, tag: str | None = None):
        super().__init__(job_config, parallel_dims, tag)
        self.show_flops = utils.device_type != "cpu"
        if not self.show_flops:
            self.logger = _WithoutKeys(self.logger, FLOPS_KEYS)
        self.eta = "-"
        self._first_log: tuple[int, float] | None = None
        self._step_line = _StepLine(self)
        logger.addFilter(self._step_line)

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        extra = {**(extra_metrics or {}), **self._data_mix()}
        eta = self._eta_seconds(step)
        if eta is not None:
            extra["time_metrics/eta(s)"] = eta
            self.eta = str(datetime.timedelta(seconds=round(eta)))
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)

    def _eta_seconds(self, step: int) -> float | None:
        """Remaining steps at the mean wall time per step since the first logged one (validation included)."""
        now = time.perf_counter()
        if self._first_log is None:
            self._first_log = (step, now)
            return None
        first_step, first_time = self._first_log
        return (self.job_config.training.steps - step) * (now - first_time) / (step - first_step)

    def _data_mix(self) -> dict[str, float]:
        """Each source's fraction of the input tokens served so far, summed over dp ranks (all ranks call ``log``)."""
        if self.dataloader is None:
            return {}
        served = self.dataloader.served_tokens.to(utils.device_type)
        if self.parallel_dims.dp_enabled:
            served = all_reduce(served, "sum", self.parallel_dims.get_mesh("batch"))
        served = served.cpu()
        total = served.sum().item()
        if not total:
            return {}
        weights = {name: getattr(self.job_config.hybrid_data, name).weight for name in SOURCES}
        return {f"data_mix/{name}": n / total for name, n in zip(SOURCES, served.tolist()) if weights[name] > 0}

    def log_validation(self, loss: float, step: int, extra_metrics: dict[str, Any] | None = None) -> None:
        """TorchTitan's validation line and metrics, then bpb / perplexity overall and per source."""
        super().log_validation(loss, step, extra_metrics)
        metrics = extra_metrics or {}
        sources = sorted({k.split("/")[1] for k in metrics if k.count("/") == 2})
        parts = [f"bpb: {metrics['validation_metrics/bpb']:.4f}", f"ppl: {metrics['validation_metrics/perplexity']:.2f}"]
        for name in sources:
            m = {k: metrics[f"validation_metrics/{name}/{k}"] for k in ("loss", "bpb")}
            parts.append(f"{name}: loss {m['loss']:.4f} bpb {m['bpb']:.4f}")
        logger.info(f"validate step: {step:2}  " + "  ".join(parts))

    def close(self) -> None:
        logger.removeFilter(self._step_line)
        super().close()


def build_hybrid_metrics_processor(
    job_config: JobConfig, parallel_dims: ParallelDims, model_args: Any = None, tag: str | None = None
) -> HybridMetricsProcessor:
    """TorchTitan ``build_metrics_processor_fn``."""
    return HybridMetricsProcessor(job_config, parallel_dims, tag)
