"""Hyper-parameters of the hybrid decoder, validated where they are set."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.protocols.model import BaseModelArgs

# Pattern letters and the mixer each one builds.
MIXERS = {"g": "gated linear attention (fla chunk_gla)", "A": "softmax attention (GQA + RoPE)"}


class ModelConfigError(ValueError):
    """A model hyper-parameter is inconsistent; the message names the field."""


@dataclass
class HybridModelArgs(BaseModelArgs):
    dim: int = 256
    n_layers: int = 4
    pattern: str = "gggA"
    """One letter per layer, see ``MIXERS``."""
    n_heads: int = 4
    n_kv_heads: int = 4
    """Key/value heads of the attention layers (GQA when < n_heads)."""
    vocab_size: int = 49280
    ffn_dim: int = 1024
    """Hidden width of the SwiGLU MLP."""
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    gla_expand_k: float = 1.0
    """GLA key width = dim * gla_expand_k (split over n_heads)."""
    gla_expand_v: float = 1.0
    gla_gate_low_rank_dim: int = 16
    gla_gate_logit_normalizer: float = 16.0
    gla_chunk_size: int = 64
    """Chunk length used for the FLOP count of the GLA kernel."""
    document_masking: bool = True
    """Keep attention and the linear-attention state inside each packed document."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ModelConfigError(f"hybrid model: field '{field}' {why}")

        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim"):
            if getattr(self, field) <= 0:
                fail(field, f"must be positive, got {getattr(self, field)}")
        unknown = sorted(set(self.pattern) - set(MIXERS))
        if unknown:
            fail("pattern", f"has unknown letter(s) {unknown} in '{self.pattern}'; known: {MIXERS}")
        if len(self.pattern) != self.n_layers:
            fail(
                "pattern",
                f"has {len(self.pattern)} letters but n_layers = {self.n_layers}; "
                "give one letter per layer",
            )
        if self.dim % self.n_heads:
            fail("n_heads", f"= {self.n_heads} does not divide dim = {self.dim}")
        if self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"= {self.n_kv_heads} does not divide n_heads = {self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            fail("n_heads", f"gives odd head dim {self.dim // self.n_heads}; RoPE needs it even")
        for field in ("gla_expand_k", "gla_expand_v"):
            width = self.dim * getattr(self, field)
            if width != int(width) or int(width) % self.n_heads:
                fail(field, f"gives width {width}, which must be an integer divisible by n_heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def gla_key_dim(self) -> int:
        return int(self.dim * self.gla_expand_k)

    @property
    def gla_value_dim(self) -> int:
        return int(self.dim * self.gla_expand_v)

    def replace(self, **changes) -> HybridModelArgs:
        return dataclasses.replace(self, **changes)

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Apply the TOML's ``[hybrid_model]`` overrides and the training sequence length."""
        overrides = getattr(job_config, "hybrid_model", None)
        if overrides is not None:
            for field in dataclasses.fields(overrides):
                value = getattr(overrides, field.name)
                if value is not None:
                    setattr(self, field.name, value)
        self.max_seq_len = max(self.max_seq_len, job_config.training.seq_len)
        if job_config.parallelism.tensor_parallel_degree > 1:
            raise ModelConfigError("parallelism.tensor_parallel_degree: the hybrid model supports FSDP only")
        if job_config.parallelism.context_parallel_degree > 1:
            raise ModelConfigError("parallelism.context_parallel_degree: the hybrid model supports FSDP only")
        if job_config.parallelism.pipeline_parallel_degree > 1:
            raise ModelConfigError("parallelism.pipeline_parallel_degree: the hybrid model supports FSDP only")
        self.validate()

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """Unique parameters, and training FLOPs per token.

        6 FLOPs per parameter per token (the tied embedding counts once, as the
        output projection; the lookup is free), plus the sequence mixers'
        activation-activation products, which parameters do not capture:
        causal attention costs 6 * H * head_dim * T / 2 * 2 (QK^T and PV, half
        masked), GLA's chunked kernel per head ~ 3 * (4 K V + C (K + V)).
        """
        nparams = sum(p.numel() for p in model.parameters())
        n_attn = self.pattern.count("A")
        n_gla = self.pattern.count("g")
        attn = n_attn * 6 * self.n_heads * self.head_dim * seq_len
        hk, hv = self.gla_key_dim // self.n_heads, self.gla_value_dim // self.n_heads
        gla = n_gla * 3 * self.n_heads * (4 * hk * hv + self.gla_chunk_size * (hk + hv))
        return nparams, 6 * nparams + attn + gla
