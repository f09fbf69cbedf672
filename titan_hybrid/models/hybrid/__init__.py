"""The hybrid LM: model, arguments and named flavors.

Importing this package needs only torch (and fla on GPU); the TorchTitan train
spec, which pulls in the data and training stack, lives in ``train_spec.py``.
"""

from .args import HybridModelArgs, ModelConfigError
from .model import HybridLM

__all__ = ["HybridLM", "HybridModelArgs", "ModelConfigError", "hybrid_flavors"]

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
