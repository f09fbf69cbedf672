"""Gated DeltaNet 2 (GDN-2) and its Kaczmarz-normalised variant: fla on CUDA, chunked PyTorch elsewhere.

Recurrence per head (state S is K x V), with per-channel log-decay g <= 0 [K],
erase gate b [K] and write gate w [V]:

    S_t = (I - k_t (b_t * k_t)^T) diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T,      o_t = scale * S_t^T q_t

This is the shared recurrence of ``titan_hybrid.ops.common`` as is. fla's
GDN-2 backward runs its own fused kernels (``chunk_gdn2_bwd``), not the
``chunk_bwd_dqkwg`` kernel behind fla issue #640, so it needs no Hopper guard.
Decoding one token from a prefilled state: ``fused_recurrent_gdn2`` (fla's kernel
of that name on CUDA, writing the state in place as fla's serving path does;
``recurrent_step_torch`` elsewhere).
"""

from __future__ import annotations

import torch

from titan_hybrid.ops.common import (
    FLA_DELTA_CHUNK,
    call_fla,
    chunk_recurrence_torch,
    fla_layout,
    fla_qk_l2norm,
    fla_qk_l2norm_bwd,
    fla_qk_l2norm_fake,
    l2norm,
    recurrent_step_torch,
    unpack_rows,
)

# The largest key head dim of fla's GDN-2 kernels (its public function asserts it).
FLA_GDN2_MAX_K = 256


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
    if q.is_cuda:
        if output_final_state:
            from titan_hybrid.ops import fla_kernels

            return call_fla(
                fla_kernels.chunk_gdn2, q, k, v, g, b, w,
                resets=resets, scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm, output_final_state=True,
            )  # fmt: skip
        scale = k.shape[-1] ** -0.5 if scale is None else scale
        return fla_chunk_gdn2(q, k, v, g, b, w, scale, resets, use_qk_l2norm)[0]
    return chunk_gdn2_torch(
        q, k, v, g, b, w, scale=scale, resets=resets, use_qk_l2norm=use_qk_l2norm, output_final_state=output_final_state
    )


# fla's GDN-2 kernels as torch.library custom ops (see ``titan_hybrid.ops.gla``): the forward /
# backward split of fla's ChunkGDN2Function with its defaults (chunk length 64, no in-kernel gate,
# no safe gate, intermediates recomputed in the backward) and what it then saves: the (in-kernel
# l2-normalised) q, k and their rstd, g's chunk cumsum (fp32, log2), and the intra-chunk matrices
# Aqk and Akk (the inverted WY matrix).


@torch.library.custom_op("titan_hybrid::fla_chunk_gdn2", mutates_args=(), device_types="cuda")
def fla_chunk_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    resets: torch.Tensor | None,
    use_qk_l2norm: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """fla's chunk GDN-2 forward: ``(o, q, k, q_rstd, k_rstd, g_cumsum, Aqk, Akk)``; all but ``o`` are
    saved for the backward (the first four from ``fla_qk_l2norm``)."""
    if k.shape[-1] > FLA_GDN2_MAX_K:
        raise ValueError(f"fla's GDN-2 kernels take key head dims <= {FLA_GDN2_MAX_K}, got {k.shape[-1]}")
    from titan_hybrid.ops import fla_kernels

    rows = v
    with fla_kernels.custom_device_ctx(q.device.index):
        q, k, qk_norm = fla_qk_l2norm(q, k, use_qk_l2norm)
        (q, k, v, g, b, w), cu_seqlens, chunk_indices = fla_layout(resets, FLA_DELTA_CHUNK, q, k, v, g, b, w)
        o, _, g_cumsum, Aqk, Akk, *_ = fla_kernels.chunk_gdn2_fwd(
            q=q, k=k, v=v, g=g, b=b, w_gate=w, scale=scale, initial_state=None, output_final_state=False,
            cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=FLA_DELTA_CHUNK,
        )  # fmt: skip
    o, g_cumsum, Aqk, Akk = unpack_rows(rows, o.type_as(q), g_cumsum.float(), Aqk, Akk)
    return o, *qk_norm, g_cumsum, Aqk, Akk


@torch.library.custom_op("titan_hybrid::fla_chunk_gdn2_bwd", mutates_args=(), device_types="cuda")
def fla_chunk_gdn2_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cumsum: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    Aqk: torch.Tensor,
    Akk: torch.Tensor,
    q_rstd: torch.Tensor,
    k_rstd: torch.Tensor,
    do: torch.Tensor,
    scale: float,
    resets: torch.Tensor | None,
    use_qk_l2norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dg, db, dw)`` of ``fla_chunk_gdn2``'s ``o``, dg in fp32; q, k as it saved them
    (normalised with ``use_qk_l2norm``), dq, dk for the raw ones."""
    from titan_hybrid.ops import fla_kernels

    inputs = (q, k, v, g_cumsum, b, w)
    (q, k, v, g_cumsum, b, w, Aqk, Akk, do), cu_seqlens, chunk_indices = fla_layout(
        resets, FLA_DELTA_CHUNK, q, k, v, g_cumsum, b, w, Aqk, Akk, do
    )
    with fla_kernels.custom_device_ctx(q.device.index):
        dq, dk, dv, db, dw, dg, _, _, _ = fla_kernels.chunk_gdn2_bwd(
            q=q, k=k, v=v, b=b, w_gate=w, Aqk=Aqk, Akk=Akk, scale=scale, initial_state=None, do=do, dht=None,
            g=g_cumsum, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=FLA_DELTA_CHUNK,
        )  # fmt: skip
        dq, dk = fla_qk_l2norm_bwd(q, k, q_rstd, k_rstd, dq, dk, use_qk_l2norm)
    grads = [d.to(x.dtype) for d, x in zip((dq, dk, dv, dg, db, dw), inputs)]
    return tuple(unpack_rows(inputs[0], *grads))


@fla_chunk_gdn2.register_fake
def _(q, k, v, g, b, w, scale, resets, use_qk_l2norm):
    o = v.new_empty(v.shape, dtype=q.dtype)
    Aqk, Akk = (k.new_empty(*k.shape[:3], FLA_DELTA_CHUNK) for _ in range(2))
    return o, *fla_qk_l2norm_fake(q, k, use_qk_l2norm), g.new_empty(g.shape, dtype=torch.float), Aqk, Akk


@fla_chunk_gdn2_bwd.register_fake
def _(q, k, v, g_cumsum, b, w, Aqk, Akk, q_rstd, k_rstd, do, scale, resets, use_qk_l2norm):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, g_cumsum, b, w))


def _setup_context(ctx, inputs, output):
    q, k, v, g, b, w, scale, resets, use_qk_l2norm = inputs
    _, q_norm, k_norm, q_rstd, k_rstd, g_cumsum, Aqk, Akk = output
    if use_qk_l2norm:
        q, k = q_norm, k_norm
    ctx.save_for_backward(q, k, v, g_cumsum, b, w, Aqk, Akk, q_rstd, k_rstd, resets)
    ctx.scale, ctx.use_qk_l2norm, ctx.g_dtype = scale, use_qk_l2norm, g.dtype
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, do, *_):
    q, k, v, g_cumsum, b, w, Aqk, Akk, q_rstd, k_rstd, resets = ctx.saved_tensors
    dq, dk, dv, dg, db, dw = fla_chunk_gdn2_bwd(
        q, k, v, g_cumsum, b, w, Aqk, Akk, q_rstd, k_rstd, do, ctx.scale, resets, ctx.use_qk_l2norm
    )
    return dq, dk, dv, dg.to(ctx.g_dtype), db, dw, None, None, None


fla_chunk_gdn2.register_autograd(_backward, setup_context=_setup_context)


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
    """Decode one token of GDN-2: inputs ``[B, 1, H, K|V]``, fp32 ``state [B, H, K, V]`` updated in place
    (fla's kernel on CUDA, ``recurrent_step_torch`` elsewhere: ``gdn2_step``)."""
    return gdn2_step(q, k, v, g, b, w, state, q.shape[-1] ** -0.5 if scale is None else scale, use_qk_l2norm)


@torch.library.custom_op("titan_hybrid::gdn2_step", mutates_args=("state",))
def gdn2_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
    state: torch.Tensor, scale: float, use_qk_l2norm: bool,
) -> torch.Tensor:  # fmt: skip
    """``fused_recurrent_gdn2`` as a custom op mutating ``state`` (see ``ops.gla.gla_step``)."""
    if q.is_cuda:
        from titan_hybrid.ops import fla_kernels

        # fla's in-place final state (its serving path): no fresh state to copy back into ours.
        q, k, v, g, b, w = (t.contiguous() for t in (q, k, v, g, b, w))
        with fla_kernels.custom_device_ctx(q.device.index):
            o, _ = fla_kernels.fused_recurrent_gdn2_fwd(
                q, k, v, g, b, w, initial_state=state, scale=scale, inplace_final_state=True,
                use_qk_l2norm_in_kernel=use_qk_l2norm, out=torch.empty_like(v),
            )  # fmt: skip
        return o
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return recurrent_step_torch(q, k, v, g, state, b=b, w=w, scale=scale).contiguous()


@gdn2_step.register_fake
def _(q, k, v, g, b, w, state, scale, use_qk_l2norm):
    return v.new_empty(v.shape)


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
