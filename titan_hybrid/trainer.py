"""TorchTitan's Trainer with fault-tolerant checkpoints and a non-finite-step guard.

What it adds (configured under ``[resilience]``, see docs/checkpointing.md):

- ``ResilientCheckpointManager`` (completion markers, validated resume) and the
  RNG state in every checkpoint;
- after the backward of the last microbatch, the global loss and the global
  gradient norm are checked on all ranks alike (a finite loss can still give
  NaN gradients, e.g. at a far too high learning rate); a non-finite one is
  logged with its step and batch (the batch is saved under
  ``<dump_folder>/nonfinite/``) and then either stops the run or skips the
  update (gradients dropped, so the optimizer leaves weights and state
  untouched; the step, the data and the LR schedule still advance), at most
  ``max_consecutive_skips`` times in a row;
- optionally a per-rank JSONL record of the exact loss and batch fingerprints of
  every step, which the resume tests compare bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torchtitan.components.checkpoint import TRAIN_STATE
from torchtitan.config import JobConfig
from torch.distributed.tensor import DTensor
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from titan_hybrid.checkpoint import RNG, ResilientCheckpointManager, RNGState
from titan_hybrid.config.check import check_job_config
from titan_hybrid.depth_recurrence import DepthRecurrence
from titan_hybrid.lifetime import lock_dump_folder
from titan_hybrid.ops.common import HostDocuments

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class NonFiniteStepError(RuntimeError):
    """The loss or gradient norm was NaN/Inf and the run cannot go on (``stop``, or too many skips)."""


def rng_fingerprint() -> str:
    """A short hash of this rank's Python, NumPy and torch RNG states (what a resume must restore)."""
    state = (random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state().numpy().tobytes())
    return hashlib.blake2b(repr(state).encode(), digest_size=8).hexdigest()


def row_fingerprints(tokens: torch.Tensor) -> list[str]:
    """A short hash per sequence, to tell which samples a step consumed."""
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=8).hexdigest() for row in tokens.cpu()]


class HybridTrainer(Trainer):
    def __init__(self, job_config: JobConfig):
        check_job_config(job_config)  # before TorchTitan builds anything from it
        if int(os.environ.get("RANK", "0")) == 0:  # held until this process ends, however it ends
            self._folder_lock = lock_dump_folder(job_config.job.dump_folder)
        # TorchTitan's Trainer builds its own CheckpointManager, replaced below by ours: with checkpointing
        # off it is inert (no purge thread, process group or "Checkpointing active" line of its own).
        enable, job_config.checkpoint.enable = job_config.checkpoint.enable, False
        try:
            super().__init__(job_config)
        finally:
            job_config.checkpoint.enable = enable
        if job_config.debug.seed is not None:  # TorchTitan seeds torch only; a resumed run restores all three
            random.seed(job_config.debug.seed)
            np.random.seed(job_config.debug.seed)
        self.metrics_processor.dataloader = self.dataloader  # its served tokens are the logged data mix
        self.resilience = job_config.resilience
        self._step_batches: list[Batch] = []
        self._step_losses: list[torch.Tensor] = []
        self._consecutive_skips = 0
        self.checkpointer = ResilientCheckpointManager(
            dataloader=self.dataloader,
            model_parts=self.model_parts,
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={TRAIN_STATE: self, RNG: RNGState()},
            checkpoint_config=job_config.checkpoint,
            sd_adapter=(
                self.train_spec.state_dict_adapter(self.model_args, job_config.model.hf_assets_path)
                if self.train_spec.state_dict_adapter
                else None
            ),
            base_folder=job_config.job.dump_folder,
            run_info={
                "model": {
                    "name": job_config.model.name,
                    "flavor": job_config.model.flavor,
                    "args": dataclasses.asdict(self.model_args),
                },
                "hf_assets_path": os.path.abspath(job_config.model.hf_assets_path),
                "training_steps": job_config.training.steps,  # when depth recurrence switches on
            },
        )
        self.depth_recurrence = None
        if self.model_args.recur_layers:
            training = job_config.training
            self.depth_recurrence = DepthRecurrence(
                self.model_args, self.model_parts, self.metrics_processor, training.seq_len, training.steps
            )
        self._record_path = None
        if self.resilience.step_record:
            folder = os.path.join(job_config.job.dump_folder, "step_record")
            os.makedirs(folder, exist_ok=True)
            self._record_path = os.path.join(folder, f"rank_{dist.get_rank()}.jsonl")
        if self.resilience.inject_nonfinite_loss_at and dist.get_rank() == 0:
            self.model_parts[0].register_forward_hook(self._inject_nonfinite)

    def _inject_nonfinite(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        """Debug fault: NaN logits on rank 0 at the configured steps (tests the guard)."""
        if self.step in self.resilience.inject_nonfinite_loss_at:
            return output * float("nan")
        return None

    def post_dataloading_process(
        self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """With ``loss_chunk_tokens`` the model gets the labels and returns the loss (fused output projection)."""
        inputs, labels, extra_inputs, extra_kwargs = super().post_dataloading_process(input_dict, labels)
        if self.model_args.loss_chunk_tokens:
            extra_kwargs["labels"] = labels
        return inputs, labels, extra_inputs, extra_kwargs

    def batch_generator(self, data_iterable: Iterable[Batch]) -> Iterator[Batch]:
        """TorchTitan's, with each batch kept as the loader gave it (host tensors only: what the step
        record hashes and a non-finite step saves) and, where the model's fla kernels take packed
        documents, the batch's documents found on the host (``HostDocuments``: a non-tensor input,
        which TorchTitan passes to the model's forward as it is)."""
        find_documents = self.device.type == "cuda" and self.model_args.document_masking
        for batch in super().batch_generator(data_iterable):
            input_dict, labels = batch
            self._step_batches.append((dict(input_dict), labels))  # TorchTitan moves input_dict's tensors
            if find_documents and "positions" in input_dict:
                input_dict["documents"] = HostDocuments.of_positions(input_dict["positions"])
            yield batch

    def train_step(self, data_iterator: Iterator[Batch]) -> None:
        self._step_batches, self._step_losses = [], []
        if self.depth_recurrence:
            self.depth_recurrence.before_step(self.step)
        super().train_step(data_iterator)
        if self.depth_recurrence:
            self.depth_recurrence.after_step()

    def forward_backward_step(self, **kwargs) -> torch.Tensor:
        loss = super().forward_backward_step(**kwargs)
        self._step_losses.append(loss.detach())
        if len(self._step_losses) == self.gradient_accumulation_steps:
            self._check_step()
        return loss

    def _grad_norm(self) -> float:
        """The global L2 norm of the gradients, as TorchTitan's clipping computes it (the same on every rank)."""
        grads = [p.grad for m in self.model_parts for p in m.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()

    def _check_step(self) -> None:
        """Runs after the last backward of a step, before clipping and the optimizer step."""
        local = torch.stack(self._step_losses).sum()
        loss_mesh = self.parallel_dims.get_optional_mesh("loss") if self.parallel_dims.dp_cp_enabled else None
        global_loss = dist_utils.dist_sum(local, loss_mesh)
        grad_norm = self._grad_norm()
        finite = math.isfinite(global_loss) and math.isfinite(grad_norm)
        if finite:
            self._consecutive_skips = 0
        if finite and not self._record_path:
            return  # fingerprints copy every row to the host: only when they are needed
        rows = [row_fingerprints(input_dict["input"]) for input_dict, _ in self._step_batches]
        if self._record_path:
            with open(self._record_path, "a") as f:
                record = {
                    "step": self.step,
                    "loss": global_loss,
                    "skipped": not finite,
                    "rows": rows,
                    "rng": rng_fingerprint(),
                }
                f.write(json.dumps(record) + "\n")
        if finite:
            return
        batch_file = self._save_batch()
        loss_text = f"loss {global_loss} (this rank's share: {local.item()})"
        if math.isfinite(global_loss):
            what = f"{loss_text}, non-finite grad norm"
        else:
            what = f"non-finite {loss_text}, grad norm"
        message = (
            f"step {self.step}: {what} {grad_norm}; rank {dist.get_rank()} batch rows {rows}, saved to {batch_file}"
        )
        if self.resilience.on_nonfinite_loss == "stop":
            raise NonFiniteStepError(
                f"{message}; stopping (resilience.on_nonfinite_loss = 'stop'). {self.checkpointer.resume_hint()}"
            )
        self._consecutive_skips += 1
        cap = self.resilience.max_consecutive_skips
        if cap and self._consecutive_skips > cap:
            raise NonFiniteStepError(
                f"{message}; {self._consecutive_skips} non-finite steps in a row, more than "
                f"resilience.max_consecutive_skips = {cap}: stopping. {self.checkpointer.resume_hint()}"
            )
        logger.warning(
            f"{message}; skipping the update (resilience.on_nonfinite_loss = 'skip', "
            f"{self._consecutive_skips} in a row of at most {cap or 'unlimited'})"
        )
        for model in self.model_parts:
            for p in model.parameters():
                p.grad = None

    def _save_batch(self) -> str:
        folder = os.path.join(self.job_config.job.dump_folder, "nonfinite")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{self.step}_rank_{dist.get_rank()}.pt")
        torch.save(self._step_batches, path)
        return path
