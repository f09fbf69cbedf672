"""TOML sections titan-hybrid adds to TorchTitan's JobConfig.

Selected with ``[job] custom_config_module = "titan_hybrid.config.job_config"``;
TorchTitan merges these dataclasses into its own.
"""

from dataclasses import dataclass, field


@dataclass
class HybridModel:
    """Per-run overrides of the flavor named by ``[model] flavor``; unset keys keep the flavor's value."""

    pattern: str | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    ffn_dim: int | None = None
    gla_expand_k: float | None = None
    gla_expand_v: float | None = None
    rope_theta: float | None = None
    document_masking: bool | None = None


@dataclass
class JobConfig:
    hybrid_model: HybridModel = field(default_factory=HybridModel)
