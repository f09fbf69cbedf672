"""Causal softmax attention with grouped-query heads and rotary positions, through SDPA.

Options (``HybridModelArgs``): partial RoPE (``rope_dims``), a learned attention sink
(``attn_sink``) and a sliding window (``attn_window``), each combined with document masking;
``attn_type = "flex"`` runs documents and windows through FlexAttention on CUDA (TorchTitan's
wrapper), which skips fully masked blocks instead of masking a dense score matrix. A score
soft-cap (``attn_softcap``) and exclusive self attention (``xsa``) apply on either path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, and_masks
from torchtitan.models.attention import (
    FlexAttentionWrapper,
    create_attention_mask,
    get_causal_mask_mod,
    get_sliding_window_mask_mod,
)

from titan_hybrid.ops.decode_linear import PreNormed

from .args import HybridModelArgs
from .decode_state import KVCache, Prompt
from .fused import LinearGroup, apply, project


# The one-token decode step's cache write and attention as custom ops: torch.compile keeps them as
# they run eagerly. Traced, the in-place scatter into the cache (a graph input) is functionalised into
# a fresh cache-sized buffer copied back at the end of the graph: two more passes over every layer's
# whole cache per token (seen in Inductor's output code).


@torch.library.custom_op("titan_hybrid::kv_cache_write", mutates_args=("cache",))
def kv_cache_write(cache: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> None:
    """Write each row's new key and value ``new [2, B, KV, 1, D]`` into ``KVCache.kv`` at the
    slots ``index`` (same shape): one scatter kernel for both."""
    cache.scatter_(3, index, new)


@kv_cache_write.register_fake
def _(cache, index, new):
    return None


@torch.library.custom_op("titan_hybrid::decode_sdpa", mutates_args=())
def decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
    """One query per head over the cache through eager SDPA's kernel choice (the fastest measured,
    ``Attention.step``), whatever Inductor would lower it to."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa).contiguous()


@decode_sdpa.register_fake
def _(q, k, v, mask, enable_gqa):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def rope_cache(rotary_dims: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """``[max_seq_len, rotary_dims // 2, 2]`` cos/sin table, kept in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dims, 2, device=device, dtype=torch.float32) / rotary_dims)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` pairwise (interleaved halves) by ``positions [B, T]``.

    Only the first ``2 * rope.shape[1]`` dims rotate (partial RoPE); the rest pass through.
    """
    n = 2 * rope.shape[1]
    cos_sin = rope[positions]  # [B, T, n/2, 2]
    cos, sin = cos_sin[..., 0].unsqueeze(2), cos_sin[..., 1].unsqueeze(2)
    x1, x2 = x[..., :n].float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return torch.cat([rotated.type_as(x), x[..., n:]], dim=-1)


def flex_block_mask(doc_ids: torch.Tensor | None, window: int, T: int) -> BlockMask:
    """FlexAttention's block mask for causal attention within documents (``doc_ids [B, T]``) and
    the window; one per micro-batch, shared by every attention layer."""
    mask_mods = [get_causal_mask_mod()]
    if window:
        mask_mods.append(get_sliding_window_mask_mod(window))
    if doc_ids is not None:

        def same_document(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return doc_ids[b, q] == doc_ids[b, kv]

        mask_mods.append(same_document)
    batch = doc_ids.shape[0] if doc_ids is not None else 1
    return create_attention_mask(and_masks(*mask_mods), batch, None, T, T)


class SoftcappedFlexAttention(FlexAttentionWrapper):
    """FlexAttention with ``cap * tanh(score / cap)`` as its score_mod.

    TorchTitan 0.2.2's ``FlexAttentionWrapper.forward`` takes a ``score_mod`` but does not pass it
    on to ``flex_attention`` (the scores stay uncapped), so this calls the wrapper's one compiled
    ``flex_attention`` itself, with the score_mod."""

    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def softcap(self, score: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
        return self.cap * torch.tanh(score / self.cap)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_mask: BlockMask, enable_gqa: bool = False
    ) -> torch.Tensor:
        return FlexAttentionWrapper._compiled_flex_attn(
            q, k, v, score_mod=self.softcap, block_mask=block_mask, enable_gqa=enable_gqa
        )


def exclusive_self_attention(o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: remove from each head's output ``o [B, H, T, D]`` its component along the token's own
    value ``v [B, KV, T, D]`` (head ``h`` reads KV head ``h // (H / KV)``, as GQA does), so the
    layer passes on only what it gathered from other tokens."""
    B, H, T, D = o.shape
    groups = o.view(B, v.shape[1], H // v.shape[1], T, D)
    unit = F.normalize(v.float(), dim=-1).unsqueeze(2).type_as(o)
    return (groups - (groups * unit).sum(-1, keepdim=True) * unit).view(B, H, T, D)


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, cap: float
) -> torch.Tensor:
    """Attention with ``cap * tanh(scores / cap)`` on the scores, computed explicitly (SDPA takes no
    score function): ``q [B, H, Tq, D]``, ``k, v [B, KV, Tk, D]``; ``mask`` boolean (True = attend),
    None = causal with the queries at the end of the keys."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    groups = H // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q.float() @ k.float().transpose(-1, -2)) * D**-0.5
    scores = cap * torch.tanh(scores / cap)
    if mask is None:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).type_as(q)


def attention_mask(
    T: int, doc_ids: torch.Tensor | None, window: int, sink: bool, device: torch.device
) -> torch.Tensor | None:
    """Boolean ``[B|1, 1, T, T (+1 sink column first)]`` mask, or None when plain causal suffices."""
    if doc_ids is None and not window and not sink:
        return None
    i = torch.arange(T, device=device)
    lag = i.unsqueeze(1) - i.unsqueeze(0)  # query minus key position
    allowed = lag >= 0
    if window:
        allowed = allowed & (lag < window)
    allowed = allowed.expand(1, 1, T, T)
    if doc_ids is not None:
        allowed = allowed & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)).unsqueeze(1)
    if sink:
        allowed = F.pad(allowed, (1, 0), value=True)
    return allowed


class Attention(nn.Module):
    def __init__(self, args: HybridModelArgs, xsa: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.attn_window
        self.softcap = args.attn_softcap
        self.xsa = xsa
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # One learned key per KV head, no position; its value is 0, so it only absorbs softmax mass.
        self.sink_k = nn.Parameter(torch.zeros(args.n_kv_heads, self.head_dim)) if args.attn_sink else None
        self.flex = SoftcappedFlexAttention(self.softcap) if self.softcap else FlexAttentionWrapper()
        self.qkv_group: LinearGroup | None = None  # fuse_projections()
        self.output_group: LinearGroup | None = None

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, std=std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std)
        if self.sink_k is not None:
            nn.init.zeros_(self.sink_k)  # sink logit 0 at init: softmax with a "+1" in the denominator

    def fuse_projections(self) -> None:
        """Inference: q, k and v as one GEMM; all three GEMMs the decode ones."""
        self.qkv_group = LinearGroup([self.wq, self.wk, self.wv])
        self.output_group = LinearGroup([self.wo])

    def _qkv(self, x: torch.Tensor | PreNormed, rope: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated queries ``[B, H, T, D]``, rotated keys and values ``[B, KV, T, D]``."""
        B, T, _ = x.shape
        q, k, v = project(x, [self.wq, self.wk, self.wv], self.qkv_group)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), rope, positions)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), rope, positions)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        return tuple(t.transpose(1, 2) for t in (q, k, v))

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        positions: torch.Tensor,
        doc_ids: torch.Tensor | None,
        block_mask: BlockMask | None = None,
    ) -> torch.Tensor:
        """``block_mask`` (``attn_type = "flex"`` on CUDA) replaces the SDPA mask built from ``doc_ids``."""
        return self._attend(*self._qkv(x, rope, positions), doc_ids, block_mask)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None, block_mask: BlockMask | None
    ) -> torch.Tensor:
        B, _, T, _ = q.shape
        keys, values = k, v
        if self.sink_k is not None:
            keys = torch.cat([self._sink_keys(B, k.dtype), k], dim=2)
            values = F.pad(v, (0, 0, 1, 0))
        gqa = self.n_heads != self.n_kv_heads
        if block_mask is not None:
            o = self.flex(q, keys, values, block_mask=block_mask, enable_gqa=gqa)
        else:
            mask = attention_mask(T, doc_ids, self.window, self.sink_k is not None, q.device)
            o = self._sdpa(q, keys, values, mask)
        return self._output(o, v)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA (None = causal), or the explicit soft-capped path."""
        if self.softcap:
            return softcapped_attention(q, k, v, mask, self.softcap)
        gqa = self.n_heads != self.n_kv_heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)

    def _output(self, o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Heads ``o [B, H, T, D]`` (XSA against the tokens' own values ``v``) to ``[B, T, dim]``."""
        return apply(self._heads(o, v), self.wo, self.output_group)

    def _heads(self, o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The output projection's input ``[B, T, H * D]``."""
        if self.xsa:
            o = exclusive_self_attention(o, v)
        B, _, T, _ = o.shape
        return o.transpose(1, 2).reshape(B, T, -1)

    # Inference: prefill a prompt into the KV cache, then decode one token at a time.

    def prefill(self, x: torch.Tensor, prompt: Prompt) -> tuple[torch.Tensor, KVCache]:
        """The training forward over left-padded prompts, and a cache holding each prompt's keys
        and values (the last ``attn_window`` of them with a window); see ``KVCache``."""
        q, k, v = self._qkv(x, prompt.rope, prompt.positions)
        out = self._attend(q, k, v, prompt.doc_ids, None)
        B, _, T, _ = k.shape
        slots = self.cache_slots(prompt.capacity)
        # Slot s holds the prompt's newest position p = s (mod slots), if the prompt reaches it.
        s = torch.arange(slots, device=x.device)
        last = (prompt.lengths - 1).unsqueeze(1)  # [B, 1]
        filled = s <= last
        p = s + slots * torch.div(last - s, slots, rounding_mode="floor").clamp(min=0)
        src = torch.where(filled, p + (T - prompt.lengths).unsqueeze(1), 0)  # index into the padded row
        index = src[:, None, :, None].expand(B, self.n_kv_heads, slots, self.head_dim)
        keep = filled[:, None, :, None]
        k, v = k.gather(2, index) * keep, v.gather(2, index) * keep
        if self.sink_k is not None:
            k, v = torch.cat([self._sink_keys(B, k.dtype), k], 2), F.pad(v, (0, 0, 1, 0))
        return out, KVCache(kv=torch.stack([k, v]))

    def _sink_keys(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.sink_k.to(dtype).expand(batch, -1, -1).unsqueeze(2)  # [B, KV, 1, D]

    def cache_slots(self, capacity: int) -> int:
        """Token slots of the cache: a window's ring, otherwise the capacity."""
        return min(self.window, capacity) if self.window else capacity

    def empty_state(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        slots = self.cache_slots(capacity) + (self.sink_k is not None)
        shape = (batch, self.n_kv_heads, slots, self.head_dim)
        cache = KVCache(kv=torch.zeros(2, *shape, dtype=dtype, device=device))
        if self.sink_k is not None:
            cache.k[:, :, :1] = self._sink_keys(batch, dtype)
        return cache

    def step(self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """One token per row ``x [B, 1, dim]``; see ``step_heads``."""
        return apply(self.step_heads(x, cache, positions, rope), self.wo, self.output_group)

    def step_heads(
        self, x: torch.Tensor | PreNormed, cache: KVCache, positions: torch.Tensor, rope: torch.Tensor
    ) -> torch.Tensor:
        """``step`` up to the output projection: one token per row ``x [B, 1, dim]`` at ``positions
        [B]``: write its key and value into the cache, attend over the filled slots (and the sink).
        No host sync: CUDA-graph safe.

        One query per head against the whole cache is memory-bound; SDPA with ``enable_gqa``
        and a mask reads the cache at ~90 % of the H200's bandwidth (bench.decode_attention, boolean
        mask: 4.3 TB/s at batch 16, 64k keys), 1.8x an explicit split-K matmul formulation.
        """
        B = x.shape[0]
        q, k, v = self._qkv(x, rope, positions.unsqueeze(1))  # [B, H|KV, 1, D]
        sink = int(self.sink_k is not None)
        slots = cache.k.shape[2] - sink
        index = (sink + positions % slots)[None, :, None, None, None].expand(2, B, self.n_kv_heads, 1, self.head_dim)
        kv_cache_write(cache.kv, index, torch.stack([k, v]))
        valid = torch.arange(slots + sink, device=q.device) <= (positions + sink).unsqueeze(1)  # [B, sink + slots]
        mask = valid[:, None, None, :]
        if self.softcap:
            o = softcapped_attention(q, cache.k, cache.v, mask, self.softcap)
        else:
            # The additive form SDPA would convert a boolean mask to inside each layer's call; made
            # here, a compiled step computes it once for all layers of the same cache shape.
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            o = decode_sdpa(q, cache.k, cache.v, bias, self.n_heads != self.n_kv_heads)
        return self._heads(o, v)
