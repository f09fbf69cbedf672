"""Attention layer against a plain softmax reference; RoPE against a complex-number reference."""

import math

import torch

from titan_hybrid.models.hybrid import hybrid_flavors
from titan_hybrid.models.hybrid.attention import Attention, apply_rope, rope_cache


def _reference_rope(x, positions, theta):
    D = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    angles = positions[..., None].float() * freqs  # [B, T, D/2]
    rot = torch.polar(torch.ones_like(angles), angles).unsqueeze(2)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], D // 2, 2))
    return torch.view_as_real(xc * rot).flatten(-2)


def _reference_attention(layer, x, positions, doc_ids, theta):
    B, T, _ = x.shape
    H, KV, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = _reference_rope(layer.wq(x).view(B, T, H, D), positions, theta)
    k = _reference_rope(layer.wk(x).view(B, T, KV, D), positions, theta)
    v = layer.wv(x).view(B, T, KV, D)
    k, v = (t.repeat_interleave(H // KV, dim=2) for t in (k, v))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    o = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(B, T, H * D)
    return layer.wo(o)


def test_rope_matches_complex_reference():
    x = torch.randn(2, 9, 3, 16)
    positions = torch.randint(0, 50, (2, 9))
    ours = apply_rope(x, rope_cache(16, 64, 10000.0), positions)
    torch.testing.assert_close(ours, _reference_rope(x, positions, 10000.0), atol=1e-5, rtol=1e-5)


def test_gqa_attention_matches_softmax_reference():
    torch.manual_seed(0)
    args = hybrid_flavors["debug"].replace(dim=64, n_heads=4, n_kv_heads=2)
    layer = Attention(args)
    x = torch.randn(2, 11, 64)
    positions = torch.arange(11).expand(2, 11)
    rope = rope_cache(args.head_dim, 32, args.rope_theta)
    ours = layer(x, rope, positions, doc_ids=None)
    ref = _reference_attention(layer, x, positions, None, args.rope_theta)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_document_masked_attention_matches_reference():
    torch.manual_seed(1)
    args = hybrid_flavors["debug"].replace(dim=64, n_heads=4, n_kv_heads=1)
    layer = Attention(args)
    x = torch.randn(1, 12, 64)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    doc_ids = (positions == 0).cumsum(1)
    rope = rope_cache(args.head_dim, 32, args.rope_theta)
    ours = layer(x, rope, positions, doc_ids)
    ref = _reference_attention(layer, x, positions, doc_ids, args.rope_theta)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
