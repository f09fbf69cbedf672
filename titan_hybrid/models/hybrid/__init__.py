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
    # Recurrent only: GDN-2 with the Kaczmarz key-norm step in every layer, Llama-2 vocabulary.
    # 1,293,644,608 parameters (16 heads of 128-dim keys and values).
    "gdn2_kla_1.3B": HybridModelArgs(
        dim=2048,
        n_layers=20,
        pattern="k" * 20,
        n_heads=16,
        vocab_size=32000,
        ffn_dim=5120,
        max_seq_len=4096,
    ),
    # Small Gated DeltaNet / attention hybrid: GDN at layers 0, 1 and 10, attention elsewhere.
    # 63,429,360 parameters, 25M of them the 49k-token embedding.
    "gdn_attn_63M": HybridModelArgs(
        dim=512,
        n_layers=12,
        pattern="ddAAAAAAAAdA",
        n_heads=8,
        n_kv_heads=2,
        ffn_dim=1536,
        max_seq_len=4096,
    ),
    # Shaped like the parameter-golf record (PR #1895, 3 GDN + 8 attention layers): GDN-2 at layers
    # 0, 1 and 10 (the record's Gated DeltaNet cannot train on Hopper with Triton < 3.7.1), partial
    # RoPE 16/64, attention sinks, XSA on every attention layer, depth-scaled norms,
    # LeakyReLU(0.5)^2 MLP, output soft-cap 20; blocks 4..5 run twice from 40 % of the run.
    "pgolf_gdn_attn": HybridModelArgs(
        dim=512,
        n_layers=11,
        pattern="22AAAAAAAA2",
        n_heads=8,
        n_kv_heads=4,
        mlp="relu2",
        ffn_dim=1536,
        rope_dims=16,
        attn_sink=True,
        xsa=True,
        ln_scale=True,
        output_softcap=20.0,
        recur_layers=[4, 5],
        recur_start=0.4,
        max_seq_len=4096,
    ),
}
