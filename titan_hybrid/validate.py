"""Validation during training: TorchTitan's ``build_validator_fn`` for ``[hybrid_validation]``.

TorchTitan calls ``validate`` after the training steps that ``[validation] freq`` selects (and
step 1). Every dp rank scores its share of each source's held-out rows (``[validation]
local_batch_size`` rows of ``seq_len`` tokens, ``steps`` batches per source; -1 = until the
first rank runs out), the forward exactly as in training (same loss function, fused output
projection, attention masks); the sums of NLL, tokens and bytes are all-reduced and logged per
source and overall as loss, perplexity and bits per byte (``titan_hybrid.bpb``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import all_reduce
from torchtitan.components.loss import LossFunction
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.components.validate import BaseValidator, ValidationContext
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools import utils

from data_pipelines.validation import ValidationSet, build_validation_sets
from titan_hybrid.bpb import Totals, batch_totals, token_byte_lengths

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]
PREFIX = "validation_metrics"


class HybridValidator(BaseValidator):
    def __init__(
        self,
        job_config: JobConfig,
        sets: dict[str, ValidationSet],
        token_bytes: torch.Tensor,
        parallel_dims: ParallelDims,
        loss_fn: LossFunction,
        validation_context: ValidationContext,
        maybe_enable_amp: Any,
        metrics_processor: MetricsProcessor,
        tokenizer: HuggingFaceTokenizer,
    ):
        super().__init__(job_config)
        self.sets, self.loss_fn, self.tokenizer = sets, loss_fn, tokenizer
        self.validation_context, self.maybe_enable_amp = validation_context, maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.device = torch.device(utils.device_type)
        self.token_bytes = token_bytes.to(self.device)
        self.mesh = parallel_dims.get_optional_mesh("loss") if parallel_dims.dp_cp_enabled else None

    @torch.no_grad()
    def validate(self, model_parts: list[nn.Module], step: int) -> None:
        (model,) = model_parts
        if self.job_config.validation.seq_len > model.model_args.max_seq_len:
            raise ValueError(
                f"[validation] seq_len = {self.job_config.validation.seq_len} exceeds the model's "
                f"max_seq_len = {model.model_args.max_seq_len}"
            )
        model.eval()
        totals = {name: self._score(model, batches) for name, batches in self.sets.items()}
        model.train()
        overall = Totals.total(list(totals.values()))
        metrics = {f"{PREFIX}/{k}": v for k, v in overall.metrics().items() if k != "loss"}
        for name, t in totals.items():
            metrics.update({f"{PREFIX}/{name}/{k}": v for k, v in t.metrics().items()})
        self.metrics_processor.log_validation(loss=overall.metrics()["loss"], step=step, extra_metrics=metrics)

    def _score(self, model: nn.Module, batches: Iterable[Batch]) -> Totals:
        """This source's NLL, tokens and bytes, summed over the batches of every dp rank."""
        model_args = model.model_args
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for input_dict, labels in self._in_step(batches):
            self.metrics_processor.ntokens_since_last_log += labels.numel()
            input_dict = {k: v.to(self.device) for k, v in input_dict.items()}
            labels = labels.to(self.device)
            inputs = input_dict.pop("input")
            kwargs: dict[str, Any] = {}
            if model_args.attn_type == "flex":  # as the trainer: masks only for flex attention
                kwargs["attention_masks"] = model.get_attention_masks(inputs, self.tokenizer, input_dict)
            if model_args.loss_chunk_tokens:  # as the trainer: the model returns the summed loss
                kwargs["labels"] = labels
            with self.validation_context(), self.maybe_enable_amp:
                nll = self.loss_fn(model(inputs, **input_dict, **kwargs), labels)
            totals += batch_totals(nll, labels, self.token_bytes)
        if self.mesh is not None:
            totals = all_reduce(totals, "sum", self.mesh)
        return Totals.of(totals)

    def _in_step(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Batches while every rank has one (the sharded forward is collective), up to ``[validation] steps``."""
        steps, it = self.job_config.validation.steps, iter(batches)
        n = 0
        while steps == -1 or n < steps:
            batch = next(it, None)
            have = torch.tensor(int(batch is not None), device=self.device)
            if self.mesh is not None:
                have = all_reduce(have, "min", self.mesh)
            if not have.item():
                return
            yield batch
            n += 1


def build_hybrid_validator(
    job_config: JobConfig,
    dp_world_size: int,
    dp_rank: int,
    tokenizer: HuggingFaceTokenizer,
    parallel_dims: ParallelDims,
    loss_fn: LossFunction,
    validation_context: ValidationContext,
    maybe_enable_amp: Any,
    metrics_processor: MetricsProcessor | None = None,
    **pipeline_parallel: Any,
) -> HybridValidator:
    """TorchTitan ``build_validator_fn``; the hybrid spec has no pipeline parallelism."""
    if parallel_dims.cp_enabled:
        raise ValueError("[validation] does not support context parallelism (parallelism.context_parallel_degree > 1)")
    assert metrics_processor is not None
    sets = build_validation_sets(job_config, tokenizer.tokenizer, tokenizer.eos_id, dp_rank, dp_world_size)
    return HybridValidator(
        job_config,
        sets,
        token_byte_lengths(tokenizer.tokenizer, tokenizer.eos_id),
        parallel_dims,
        loss_fn,
        validation_context,
        maybe_enable_amp,
        metrics_processor,
        tokenizer,
    )
