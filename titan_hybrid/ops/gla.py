"""Gated linear attention: fla's Triton kernel on CUDA, a chunked PyTorch path elsewhere.

Recurrence per head (state S is K x V, log-decay g <= 0 per key channel):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = scale * q_t^T S_t

Document boundaries are given as ``resets`` (True where a token starts a new
document): the state is zeroed before such a token, exactly as fla's
``cu_seqlens`` varlen mode does on GPU.
"""

from __future__ import annotations

import torch

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
    """Chunked GLA in PyTorch; inputs ``[B, T, H, K|V]``, output ``[B, T, H, V]``.

    Within a chunk, pairwise decays ``exp(G_i - G_j)`` (j <= i) are formed
    explicitly instead of factorising them as ``exp(G_i) * exp(-G_j)``: the
    factorised form overflows in fp32 once a chunk's cumulative decay passes
    ~88 nats, the explicit one never does. Computation runs in fp32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = v.dtype
    scale = K**-0.5 if scale is None else scale
    C = chunk_size
    pad = (-T) % C
    if resets is None:
        resets = torch.zeros(B, T, dtype=torch.bool, device=q.device)
    if pad:
        q, k, v, g = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
        resets = torch.nn.functional.pad(resets, (0, pad))
    N = (T + pad) // C
    # [B, H, N, C, D]
    q, k, v, g = (x.float().transpose(1, 2).reshape(B, H, N, C, -1) for x in (q, k, v, g))
    q = q * scale
    G = g.cumsum(dim=3)
    # Segment index of each token inside its chunk: tokens interact only within a segment.
    seg = resets.reshape(B, 1, N, C).long().cumsum(dim=3)
    same_seg = seg.unsqueeze(-1) == seg.unsqueeze(-2)  # [B, 1, N, C, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    intra_mask = same_seg & causal
    # Pairwise decay for j <= i; masked entries get a 0 exponent (never inf - inf).
    diff = G.unsqueeze(4) - G.unsqueeze(3)  # [B, H, N, C(i), C(j), K]
    diff = diff.masked_fill(~intra_mask.unsqueeze(-1), 0.0)
    A = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", q, k, diff.exp())
    A = A.masked_fill(~intra_mask, 0.0)
    o_intra = A @ v  # [B, H, N, C, V]

    # A token sees the carried state only if no document starts between the
    # chunk start and itself; the carried state survives a chunk only if no
    # document starts in it, and only the last segment writes the next state.
    sees_state = (seg == 0).unsqueeze(-1).float()  # [B, 1, N, C, 1]
    chunk_keeps_state = (seg[..., -1] == 0).float()  # [B, 1, N]
    in_last_seg = (seg == seg[..., -1:]).unsqueeze(-1).float()
    G_last = G[:, :, :, -1]  # [B, H, N, K]
    k_to_end = k * (G_last.unsqueeze(3) - G).exp() * in_last_seg
    q_from_start = q * G.exp() * sees_state

    S = q.new_zeros(B, H, K, V)
    o_inter = []
    for n in range(N):
        o_inter.append(q_from_start[:, :, n] @ S)
        decay = G_last[:, :, n].exp() * chunk_keeps_state[:, :, n, None]
        S = decay.unsqueeze(-1) * S + k_to_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
    o = o_intra + torch.stack(o_inter, dim=2)
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(dtype)


def resets_to_cu_seqlens(resets: torch.Tensor) -> torch.Tensor:
    """Document starts ``[B, T]`` -> fla's ``cu_seqlens`` over the flattened ``B*T`` tokens."""
    flat = resets.clone()
    flat[:, 0] = True  # every row starts a sequence
    flat = flat.reshape(-1)
    starts = flat.nonzero().squeeze(-1)
    end = torch.tensor([flat.numel()], device=flat.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


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
        return _chunk_gla_fla(q, k, v, g, scale, resets)
    return chunk_gla_torch(q, k, v, g, scale=scale, resets=resets)


@torch.compiler.disable
def _chunk_gla_fla(q, k, v, g, scale, resets):
    # Kept out of torch.compile graphs: Triton autotuned kernels are opaque to Dynamo.
    if resets is None:
        o, _ = _fla_chunk_gla(q, k, v, g, scale=scale)
        return o
    B, T = q.shape[:2]
    cu_seqlens = resets_to_cu_seqlens(resets)
    flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g)]
    o, _ = _fla_chunk_gla(*flat, scale=scale, cu_seqlens=cu_seqlens)
    return o.reshape(B, T, *o.shape[2:])
