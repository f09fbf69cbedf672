"""The hybrid LM registered as a TorchTitan train spec named ``hybrid``."""

import torch
from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.config import JobConfig
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

from data_pipelines.dataloader import build_hybrid_dataloader
from titan_hybrid.metrics import build_hybrid_metrics_processor
from titan_hybrid.optim import build_lr_schedulers, build_optimizers
from titan_hybrid.validate import build_hybrid_validator

from . import hybrid_flavors
from .model import HybridLM
from .parallelize import parallelize_hybrid

TRAIN_SPEC_NAME = "hybrid"


def build_hybrid_loss(job_config: JobConfig, **kwargs):
    """TorchTitan's summed cross-entropy, or the model's own output when it already is that loss.

    With ``loss_chunk_tokens`` the trainer hands the labels to the model, which returns the
    summed loss of its fused output projection (``HybridTrainer.post_dataloading_process``).
    """
    cross_entropy = build_cross_entropy_loss(job_config, **kwargs)

    def loss_fn(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return pred if pred.ndim == 0 else cross_entropy(pred, labels)

    return loss_fn


_registered: set[str] = set()


def register() -> None:
    """Register the ``hybrid`` train spec with TorchTitan (idempotent)."""
    if TRAIN_SPEC_NAME in _registered:
        return
    _registered.add(TRAIN_SPEC_NAME)
    register_train_spec(
        TRAIN_SPEC_NAME,
        TrainSpec(
            model_cls=HybridLM,
            model_args=hybrid_flavors,
            parallelize_fn=parallelize_hybrid,
            pipelining_fn=None,
            build_optimizers_fn=build_optimizers,
            build_lr_schedulers_fn=build_lr_schedulers,
            build_dataloader_fn=build_hybrid_dataloader,
            build_tokenizer_fn=build_hf_tokenizer,
            build_loss_fn=build_hybrid_loss,
            build_validator_fn=build_hybrid_validator,
            build_metrics_processor_fn=build_hybrid_metrics_processor,
        ),
    )
