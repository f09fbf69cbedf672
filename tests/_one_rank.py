"""A model's loss and gradients on one rank, for tests that compare a transformed model with the plain one."""

from __future__ import annotations

from pathlib import Path

import torch
from torchtitan.distributed import ParallelDims

DEBUG_CONFIG = Path(__file__).resolve().parents[1] / "train_configs" / "debug_cpu.toml"
ONE_RANK = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


def loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token loss on ``tokens`` and every parameter's gradient, by its name in the plain model
    (checkpoint and compile wrappers left out)."""
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    names = {n: n.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "") for n, _ in model.named_parameters()}
    return loss.detach(), {names[n]: p.grad for n, p in model.named_parameters()}
