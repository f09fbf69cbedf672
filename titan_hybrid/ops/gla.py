"""Gated linear attention: fla's Triton kernel on CUDA, a chunked PyTorch path elsewhere.

Recurrence per head (state S is K x V, log-decay g <= 0 per key channel):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = scale * q_t^T S_t

Document boundaries are given as ``resets`` (True where a token starts a new
document); see ``titan_hybrid.ops.common``.
"""

from __future__ import annotations

import torch

from titan_hybrid.ops.common import call_fla, chunk_recurrence_torch

try:  # fla imports Triton; both are optional on CPU-only installs.
    from fla.ops.gla import chunk_gla as _fla_chunk_gla
except ImportError:  # pragma: no cover - exercised only without fla installed
    _fla_chunk_gla = None


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    resets: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> torch.Tensor:
    """Chunked GLA in PyTorch (fp32); inputs ``[B, T, H, K|V]``, output ``[B, T, H, V]``.

    The shared recurrence without the delta-rule erase term.
    """
    return chunk_recurrence_torch(q, k, v, g, scale=scale, resets=resets, chunk_size=chunk_size)


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    resets: torch.Tensor | None = None,
) -> torch.Tensor:
    """GLA forward on the best backend for the tensors' device."""
    if q.is_cuda and _fla_chunk_gla is not None:
        return call_fla(_fla_chunk_gla, q, k, v, g, resets=resets, scale=scale)
    return chunk_gla_torch(q, k, v, g, scale=scale, resets=resets)
