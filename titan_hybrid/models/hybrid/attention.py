"""Causal softmax attention with grouped-query heads and rotary positions, through SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import HybridModelArgs


def rope_cache(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """``[max_seq_len, head_dim // 2, 2]`` cos/sin table, kept in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` pairwise (interleaved halves) by ``positions [B, T]``."""
    cos_sin = rope[positions]  # [B, T, D/2, 2]
    cos, sin = cos_sin[..., 0].unsqueeze(2), cos_sin[..., 1].unsqueeze(2)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` boolean mask: causal and within the same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    return (same_doc & causal).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, args: HybridModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, std=std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        positions: torch.Tensor,
        doc_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope, positions)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rope, positions)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = self.n_heads != self.n_kv_heads
        if doc_ids is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            mask = document_causal_mask(doc_ids)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))
