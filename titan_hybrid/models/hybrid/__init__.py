"""The hybrid LM as a TorchTitan train spec (registered as ``hybrid``)."""

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

from .args import HybridModelArgs, ModelConfigError
from .model import HybridLM
from .parallelize import parallelize_hybrid

__all__ = ["HybridLM", "HybridModelArgs", "ModelConfigError", "hybrid_flavors", "register"]

TRAIN_SPEC_NAME = "hybrid"
_registered: set[str] = set()

hybrid_flavors = {
    # A few million parameters (most of them the 49k-token embedding): CPU runs and CI.
    "debug": HybridModelArgs(
        dim=128, n_layers=4, pattern="gggA", n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=1024
    ),
    # The FLATest reference design: GLA with full attention every fourth layer.
    "308M": HybridModelArgs(
        dim=1024,
        n_layers=24,
        pattern="gggA" * 6,
        n_heads=16,
        n_kv_heads=4,
        ffn_dim=2048,
        max_seq_len=4096,
    ),
}


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
            build_dataloader_fn=build_text_dataloader,
            build_tokenizer_fn=build_hf_tokenizer,
            build_loss_fn=build_cross_entropy_loss,
        ),
    )
