"""TorchTitan ``build_optimizers_fn`` that adds GrokAdamW with no-decay parameter groups.

``[optimizer] name = "GrokAdamW"`` selects it; any other name goes to TorchTitan's builder.
The GrokAdamW options are fields that ``titan_hybrid.config.job_config`` adds to ``[optimizer]``.
"""

from typing import Any

from torch import nn
from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.optimizer import build_optimizers as build_torchtitan_optimizers
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims

from .grok_adamw import GrokAdamW

__all__ = ["GrokAdamWContainer", "build_optimizers", "param_groups"]

GROK_ADAMW = "GrokAdamW"


def param_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool
) -> list[dict[str, Any]]:
    """Split trainable params into a decayed and a no-decay group.

    Decaying norms' gains and biases (ndim < 2) only pulls them towards 0 without regularising
    anything; embeddings are optionally exempt too (rows of rare tokens would just shrink).
    """
    embeddings = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or (not decay_embeddings and id(p) in embeddings)
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class GrokAdamWContainer(OptimizersContainer):
    """TorchTitan's container (checkpointing, hooks, LR scheduling) over per-group GrokAdamWs."""

    def __init__(
        self,
        model_parts: list[nn.Module],
        optimizer_kwargs: dict[str, Any],
        decay_embeddings: bool,
    ) -> None:
        self.model_parts = model_parts
        self.optimizers = [
            GrokAdamW(
                param_groups(m, optimizer_kwargs["weight_decay"], decay_embeddings),
                **optimizer_kwargs,
            )
            for m in model_parts
        ]
        all_params = [p for m in model_parts for p in m.parameters() if p.requires_grad]
        self._validate_length(len(model_parts))
        self._post_init(all_params, optimizer_kwargs)


def build_optimizers(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None = None,
) -> OptimizersContainer:
    """GrokAdamW for ``name = "GrokAdamW"``, TorchTitan's optimizers otherwise."""
    if optimizer_config.name != GROK_ADAMW:
        return build_torchtitan_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    if not hasattr(optimizer_config, "cautious"):
        raise ValueError(
            'GrokAdamW needs [job] custom_config_module = "titan_hybrid.config.job_config"'
        )
    if optimizer_config.early_step_in_backward or (ft_manager and ft_manager.enabled):
        raise NotImplementedError("GrokAdamW supports neither early_step_in_backward nor TorchFT")
    kwargs = {
        "lr": optimizer_config.lr,
        "betas": (optimizer_config.beta1, optimizer_config.beta2),
        "eps": optimizer_config.eps,
        "weight_decay": optimizer_config.weight_decay,
        "cautious": optimizer_config.cautious,
        "grokfast": optimizer_config.grokfast,
        "grokfast_alpha": optimizer_config.grokfast_alpha,
        "grokfast_lambda": optimizer_config.grokfast_lambda,
    }
    return GrokAdamWContainer(model_parts, kwargs, optimizer_config.decay_embeddings)
