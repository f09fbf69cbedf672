"""Hyper-parameters of the hybrid decoder, validated where they are set."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from torch import nn
from torchtitan.config import JobConfig
from torchtitan.protocols.model import BaseModelArgs

# Pattern letters and the mixer each one builds.
MIXERS = {
    "g": "gated linear attention (fla chunk_gla)",
    "A": "softmax attention (GQA + RoPE)",
    "d": "Gated DeltaNet",
    "2": "Gated DeltaNet-2 (channel-wise erase and write gates)",
    "k": "Gated DeltaNet-2 with Kaczmarz key-norm step (KLA)",
}
# Letters of the delta-rule mixers, which share delta_head_dim, delta_expand_v and conv_size.
DELTA_MIXERS = "d2k"
# fla's chunk length for the delta-rule kernels (FLOP count only).
DELTA_CHUNK_SIZE = 64
# MLP names accepted by ``mlp``.
MLPS = {"swiglu": "SiLU(W1 x) * W3 x", "relu2": "LeakyReLU(W1 x, 0.5)^2"}


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
    mlp: str = "swiglu"
    """MLP of every block, see ``MLPS``."""
    ffn_dim: int = 1024
    """Hidden width of the MLP."""
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_dims: int = 0
    """Rotate only the first ``rope_dims`` dims of each attention head (partial RoPE); 0 = all."""
    attn_sink: bool = False
    """A learned key per KV head that every query attends to, with a zero value (an attention sink)."""
    attn_window: int = 0
    """Sliding window: a query sees itself and the ``attn_window - 1`` tokens before it; 0 = full causal."""
    attn_type: str = "sdpa"
    """``sdpa`` (a boolean mask for documents / windows) or ``flex``: on CUDA, documents and windows go
    through FlexAttention with a block mask that skips the masked blocks, built once per micro-batch
    by TorchTitan's trainer (``get_attention_masks``); plain causal attention and the CPU keep the
    SDPA path (the same function). ``flex`` has no attention sink."""
    output_softcap: float = 0.0
    """Soft-cap the output logits to ``cap * tanh(logits / cap)``; 0 = off."""
    attn_softcap: float = 0.0
    """Soft-cap the attention scores to ``cap * tanh(scores / cap)`` before the softmax; 0 = off.
    FlexAttention applies it as a score_mod; the SDPA path then computes the scores explicitly
    (no flash kernel: slower and O(T^2) memory)."""
    xsa: bool | list[int] = False
    """Exclusive self attention: each head's output minus its projection onto the token's own
    value, ``o - (o . v / |v|^2) v``. True = every ``A`` layer, or a list of layer indices."""
    ln_scale: bool = False
    """Multiply the pre-norm outputs of the block at unrolled depth ``l`` (0-based) by ``1 / sqrt(l + 1)``."""
    recur_layers: list[int] = field(default_factory=list)
    """Depth recurrence: ``[i, j]``, the blocks ``i..j`` (inclusive) run twice in a row with the
    same weights once it is on; [] = off."""
    recur_start: float = 0.0
    """Training: recurrence is off for the first ``floor(recur_start * training.steps)`` steps, on
    after (0 = from the start)."""
    loss_chunk_tokens: int = 0
    """Training: fuse the output projection into the loss, ``loss_chunk_tokens`` tokens at a time, so the
    full logits never exist (``ops/linear_cross_entropy.py``); 0 = logits, then TorchTitan's loss."""
    max_seq_len: int = 4096
    gla_expand_k: float = 1.0
    """GLA key width = dim * gla_expand_k (split over n_heads)."""
    gla_expand_v: float = 1.0
    gla_gate_low_rank_dim: int = 16
    gla_gate_logit_normalizer: float = 16.0
    gla_chunk_size: int = 64
    """Chunk length used for the FLOP count of the GLA kernel."""
    delta_head_dim: int = 0
    """Key dim per head of the delta-rule mixers (``d``, ``2``, ``k``; n_heads heads); 0 = dim // n_heads."""
    delta_expand_v: float = 1.0
    """Value dim per head of the delta-rule mixers = delta_head_dim * delta_expand_v."""
    conv_size: int = 4
    """Kernel of the short causal convolutions on q, k, v of the delta-rule mixers."""
    kla_eps: float = 1e-6
    """Kaczmarz step of ``k``: eta / (||k||^2 + kla_eps)."""
    document_masking: bool = True
    """Keep attention and the linear-attention state inside each packed document."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ModelConfigError(f"hybrid model: field '{name}' {why}")

        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "conv_size", "kla_eps"):
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)}")
        off_by_zero = ("rope_dims", "attn_window", "output_softcap", "attn_softcap", "delta_head_dim", "loss_chunk_tokens")
        for name in off_by_zero:
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0 (0 = off / default), got {getattr(self, name)}")
        if self.attn_type not in ("sdpa", "flex"):
            fail("attn_type", f"is {self.attn_type!r}; known: 'sdpa', 'flex'")
        if self.attn_type == "flex" and self.attn_sink:
            fail("attn_type", "= 'flex' cannot have attn_sink (a key outside the sequence); use 'sdpa'")
        if self.mlp not in MLPS:
            fail("mlp", f"is {self.mlp!r}; known: {MLPS}")
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
        if self.rope_dims > self.head_dim or self.rope_dims % 2:
            fail("rope_dims", f"= {self.rope_dims} must be even and <= head dim {self.head_dim}")
        if self.rotary_dims % 2:
            fail("n_heads", f"gives odd head dim {self.head_dim}; RoPE needs it even (or set rope_dims)")
        for name in ("gla_expand_k", "gla_expand_v"):
            width = self.dim * getattr(self, name)
            if width != int(width) or int(width) % self.n_heads:
                fail(name, f"gives width {width}, which must be an integer divisible by n_heads")
        value_head = self.delta_key_head_dim * self.delta_expand_v
        if value_head != int(value_head) or value_head <= 0:
            fail("delta_expand_v", f"gives value head dim {value_head}, which must be a positive integer")
        if not isinstance(self.xsa, bool):
            not_attention = [i for i in self.xsa if not 0 <= i < self.n_layers or self.pattern[i] != "A"]
            if not_attention:
                fail("xsa", f"lists {not_attention}, not attention ('A') layers of '{self.pattern}'")
        if self.recur_layers:
            if len(self.recur_layers) != 2 or not 0 <= self.recur_layers[0] <= self.recur_layers[1] < self.n_layers:
                fail(
                    "recur_layers",
                    f"= {self.recur_layers}: give [first, last] block indices, 0 <= first <= last < {self.n_layers}",
                )
        if not 0 <= self.recur_start < 1:
            fail("recur_start", f"= {self.recur_start}: a fraction of the run's steps in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rotary_dims(self) -> int:
        return self.rope_dims or self.head_dim

    @property
    def delta_key_head_dim(self) -> int:
        return self.delta_head_dim or self.head_dim

    @property
    def delta_value_head_dim(self) -> int:
        return int(self.delta_key_head_dim * self.delta_expand_v)

    @property
    def gla_key_dim(self) -> int:
        return int(self.dim * self.gla_expand_k)

    @property
    def gla_value_dim(self) -> int:
        return int(self.dim * self.gla_expand_v)

    def xsa_on(self, layer: int) -> bool:
        """Whether attention layer ``layer`` subtracts its self-value component (``xsa``)."""
        return self.xsa if isinstance(self.xsa, bool) else layer in self.xsa

    def depth_order(self, recurrence_on: bool) -> list[int]:
        """Block indices in the order the forward runs them: the ``recur_layers`` segment twice
        when recurrence is on."""
        order = list(range(self.n_layers))
        if not (recurrence_on and self.recur_layers):
            return order
        first, last = self.recur_layers
        return order[: last + 1] + order[first:]

    def recurrence_on_at(self, step: int, total_steps: int) -> bool:
        """Whether training step ``step`` (1-based) of ``total_steps`` runs the segment twice."""
        return bool(self.recur_layers) and step > math.floor(self.recur_start * total_steps)

    def replace(self, **changes) -> HybridModelArgs:
        return dataclasses.replace(self, **changes)

    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Apply the TOML's ``[hybrid_model]`` overrides and the training sequence length."""
        overrides = getattr(job_config, "hybrid_model", None)
        if overrides is not None:
            for f in dataclasses.fields(overrides):
                value = getattr(overrides, f.name)
                if value is not None:
                    setattr(self, f.name, value)
        self.max_seq_len = max(self.max_seq_len, job_config.training.seq_len)
        if job_config.parallelism.tensor_parallel_degree > 1:
            raise ModelConfigError("parallelism.tensor_parallel_degree: the hybrid model supports FSDP only")
        if job_config.parallelism.context_parallel_degree > 1:
            raise ModelConfigError("parallelism.context_parallel_degree: the hybrid model supports FSDP only")
        if job_config.parallelism.pipeline_parallel_degree > 1:
            raise ModelConfigError("parallelism.pipeline_parallel_degree: the hybrid model supports FSDP only")
        self.validate()

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int, recurrence_on: bool = False) -> tuple[int, int]:
        """Unique parameters, and training FLOPs per token (with the ``recur_layers`` segment
        counted twice when ``recurrence_on``: its weights are shared, its work is not).

        6 FLOPs per parameter per token (the tied embedding counts once, as the
        output projection; the lookup is free; the short convolutions apply each
        weight once per token, so they are covered too), plus the sequence
        mixers' activation-activation products, which parameters do not capture.
        Per head, x3 for forward + backward, causal halves counted once:

        - attention (head dim d): QK^T and PV over the mean number n of keys a
          query sees, n = mean_i min(i + 1, window) (+1 with a sink):
          3 * 4 d n, i.e. ~6 d T for full causal attention;
        - GLA, chunk C, head dims K, V: 3 * (4 K V + C (K + V)): state read and
          write, the causal intra-chunk QK^T and AV;
        - delta rule (d, 2, k), fla's chunk C = 64: the GLA terms plus the WY
          form, K K^T in the chunk (C K) and its use on keys and values
          (C (K + V)), and the state correction v - W S (2 K V):
          3 * (6 K V + C (3 K + 2 V)); the triangular solve (~C^2 / 3) and the
          gates (O(K + V)) are left out.
        """
        nparams = sum(p.numel() for p in model.parameters())
        order = self.depth_order(recurrence_on)
        block_params = [sum(p.numel() for p in block.parameters()) for block in model.layers.values()]
        flop_params = nparams - sum(block_params) + sum(block_params[i] for i in order)
        pattern = "".join(self.pattern[i] for i in order)
        window = min(self.attn_window or seq_len, seq_len)
        mean_keys = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len + self.attn_sink
        attn = pattern.count("A") * 12 * self.n_heads * self.head_dim * mean_keys
        hk, hv = self.gla_key_dim // self.n_heads, self.gla_value_dim // self.n_heads
        gla = pattern.count("g") * 3 * self.n_heads * (4 * hk * hv + self.gla_chunk_size * (hk + hv))
        dk, dv = self.delta_key_head_dim, self.delta_value_head_dim
        n_delta = sum(pattern.count(c) for c in DELTA_MIXERS)
        delta = n_delta * 3 * self.n_heads * (6 * dk * dv + DELTA_CHUNK_SIZE * (3 * dk + 2 * dv))
        return nparams, int(6 * flop_params + attn + gla + delta)
