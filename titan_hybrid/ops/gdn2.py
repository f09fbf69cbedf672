"""Gated DeltaNet 2 (GDN-2) and its Kaczmarz-normalised variant: fla on CUDA, chunked PyTorch elsewhere.

Recurrence per head (state S is K x V), with per-channel log-decay g <= 0 [K],
erase gate b [K] and write gate w [V]:

    S_t = (I - k_t (b_t * k_t)^T) diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T,      o_t = scale * S_t^T q_t

This is the shared recurrence of ``titan_hybrid.ops.common`` as is. fla's
GDN-2 backward runs its own fused kernels (``chunk_gdn2_bwd``), not the
``chunk_bwd_dqkwg`` kernel behind fla issue #640, so it needs no Hopper guard.
Decoding one token from a prefilled state: ``fused_recurrent_gdn2`` (fla's kernel
of that name on CUDA, ``recurrent_step_torch`` elsewhere).
"""

from __future__ import annotations

import torch

from titan_hybrid.ops.common import call_fla, call_fla_step, chunk_recurrence_torch, l2norm, recurrent_step_torch

try:  # fla imports Triton; both are optional on CPU-only installs.
    from fla.ops.gdn2 import chunk_gdn2 as _fla_chunk_gdn2
    from fla.ops.gdn2 import fused_recurrent_gdn2 as _fla_fused_recurrent_gdn2
except ImportError:  # pragma: no cover - exercised only without fla installed
    _fla_chunk_gdn2 = None


def chunk_gdn2_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    resets: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 16,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked GDN-2 in PyTorch (fp32); q, k, g, b [B,T,H,K], v, w [B,T,H,V]."""
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return chunk_recurrence_torch(
        q, k, v, g, b=b, w=w, scale=scale, resets=resets, chunk_size=chunk_size, output_final_state=output_final_state
    )


def chunk_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    resets: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GDN-2 forward on the best backend for the tensors' device (and, with
    ``output_final_state``, each row's final fp32 state ``[B, H, K, V]``)."""
    if q.is_cuda and _fla_chunk_gdn2 is not None:
        return call_fla(
            _fla_chunk_gdn2, q, k, v, g, b, w, resets=resets, scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm,
            output_final_state=output_final_state,
        )  # fmt: skip
    return chunk_gdn2_torch(
        q, k, v, g, b, w, scale=scale, resets=resets, use_qk_l2norm=use_qk_l2norm, output_final_state=output_final_state
    )


def fused_recurrent_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> torch.Tensor:
    """Decode one token of GDN-2: inputs ``[B, 1, H, K|V]``, fp32 ``state [B, H, K, V]`` updated in place."""
    if q.is_cuda and _fla_chunk_gdn2 is not None:
        return call_fla_step(
            _fla_fused_recurrent_gdn2, q, k, v, g, b, w, state=state, scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm
        )
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return recurrent_step_torch(q, k, v, g, state, b=b, w=w, scale=scale)


def kaczmarz_gates(
    k: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eta: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda * b, lambda * w) with lambda_t = eta_t / (||k_t||^2 + eps) per head; eta [B, T, H].

    Dividing the step by the key's squared norm makes each write a (relaxed)
    Kaczmarz projection: with b = w = 1 and eta = 1 the updated state maps k_t
    exactly to v_t, whatever the key's scale. Computed in fp32, since 16-bit
    squared norms lose too much, and returned in the gates' dtypes.
    """
    lam = (eta.float() / (k.float().square().sum(-1) + eps)).unsqueeze(-1)
    return (lam * b.float()).to(b.dtype), (lam * w.float()).to(w.dtype)


def chunk_gdn2_kla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    eta: torch.Tensor,
    eps: float = 1e-6,
    scale: float | None = None,
    resets: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GDN-2 with Kaczmarz-normalised gates ("gdn2_kla"); see ``kaczmarz_gates``.

    Meant for un-normalised keys: the norm is taken of the keys the recurrence
    uses, so with unit keys lambda is just eta / (1 + eps) and this is plain
    GDN-2. Hence no ``use_qk_l2norm`` option.
    """
    b, w = kaczmarz_gates(k, b, w, eta, eps)
    return chunk_gdn2(q, k, v, g, b, w, scale=scale, resets=resets, output_final_state=output_final_state)


def fused_recurrent_gdn2_kla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    eta: torch.Tensor,
    state: torch.Tensor,
    eps: float = 1e-6,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode one token of ``chunk_gdn2_kla`` from ``state`` (updated in place)."""
    b, w = kaczmarz_gates(k, b, w, eta, eps)
    return fused_recurrent_gdn2(q, k, v, g, b, w, state, scale=scale)
