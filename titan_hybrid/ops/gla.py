"""Gated linear attention: fla's Triton kernel on CUDA, a chunked PyTorch path elsewhere.

Recurrence per head (state S is K x V, log-decay g <= 0 per key channel):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = scale * q_t^T S_t

Document boundaries are given as ``resets`` (True where a token starts a new
document); see ``titan_hybrid.ops.common``. As in fla: ``chunk_gla`` (training, and
the prompt's prefill with ``output_final_state``), ``fused_recurrent_gla`` (decoding
one token from that state) and the PyTorch references beside them.
"""

from __future__ import annotations

import torch

from titan_hybrid.ops.common import (
    FLA_PACKED_CHUNK,
    call_fla,
    call_fla_step,
    chunk_recurrence_torch,
    fla_layout,
    recurrent_step_torch,
)


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    resets: torch.Tensor | None = None,
    chunk_size: int = 16,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked GLA in PyTorch (fp32); inputs ``[B, T, H, K|V]``, output ``[B, T, H, V]``
    (and each row's final state ``[B, H, K, V]``).

    The shared recurrence without the delta-rule erase term.
    """
    return chunk_recurrence_torch(
        q, k, v, g, scale=scale, resets=resets, chunk_size=chunk_size, output_final_state=output_final_state
    )


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    resets: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GLA forward on the best backend for the tensors' device; with ``output_final_state``
    (inference, no gradients) also each row's final fp32 state ``[B, H, K, V]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.is_cuda:
        if output_final_state:
            from titan_hybrid.ops import fla_kernels

            return call_fla(fla_kernels.chunk_gla, q, k, v, g, resets=resets, scale=scale, output_final_state=True)
        return fla_chunk_gla(q, k, v, g, scale, resets)[0]
    return chunk_gla_torch(q, k, v, g, scale=scale, resets=resets, output_final_state=output_final_state)


def fused_recurrent_gla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Decode one token: inputs ``[B, 1, H, K|V]``, fp32 ``state [B, H, K, V]`` updated in place;
    fla's ``fused_recurrent_gla`` kernel on CUDA (``fla_gla_step_in_place``), ``recurrent_step_torch``
    elsewhere (``gla_step``)."""
    return gla_step(q, k, v, g, state, q.shape[-1] ** -0.5 if scale is None else scale)


# (K, V, dtypes, device) of the step shapes whose kernel config fla's autotuner has chosen.
_TUNED_STEPS: set[tuple] = set()

# Widest state tile (value columns) a program of fla's step kernel takes. fla picks 64 (one
# program per head and row for head size 64: 256 at batch 16 and 16 heads); 32 doubles the
# programs, so more of the state's loads are in flight: the compiled all-GLA step at batch 16 and
# 64k took 0.762 -> 0.747 ms and 0.758 -> 0.743 ms on an H100 in two sessions (BENCHMARKS.md).
# Every program still reduces over the whole key dim (no partial outputs to sum); the GPU parity
# of the narrower tiles against the fp32 CPU path is in BENCHMARKS.md.
STEP_BLOCK_V = 32


def step_tiling(K: int, V: int) -> tuple[int, int, int, int]:
    """fla's ``(BK, BV, NK, NV)`` for its fused-recurrent kernel, state tiles at most
    ``STEP_BLOCK_V`` columns wide."""
    from titan_hybrid.ops import fla_kernels

    BK, BV, NK, _ = fla_kernels.fused_recurrent_tiling(K, V)
    BV = min(BV, STEP_BLOCK_V)
    return BK, BV, NK, -(-V // BV)


def fla_gla_step_in_place(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, state: torch.Tensor, scale: float
) -> torch.Tensor:
    """The kernel behind fla's ``fused_recurrent_gla``, launched with the new state written over
    ``state`` and the output in ``v``'s dtype.

    fla's wrapper returns a fresh fp32 state and an fp32 output, which a decode step then copies
    back and casts: two more kernels a layer (a compiled all-GLA step on an H200: 1.090 -> 1.018 ms
    without them). Each program of the kernel loads its state tile before its loop and stores the
    same tile after it, so the alias is safe; fla's autotuner is not (it times each config by
    running it over and over), so a shape's first call tunes with a scratch final state. Key dims
    above 64 (several key blocks, whose partial outputs fla sums) take fla's wrapper. The state
    tiles are ``step_tiling``'s, narrower than fla's.
    """
    from titan_hybrid.ops import fla_kernels

    B, T, H, K = k.shape
    V = v.shape[-1]
    BK, BV, NK, NV = step_tiling(K, V)
    if NK > 1:
        return call_fla_step(fla_kernels.fused_recurrent_gla, q, k, v, state=state, gk=gk, scale=scale).to(v.dtype)
    q, k, v, gk = (t.contiguous() for t in (q, k, v, gk))
    o = torch.empty_like(v)

    def launch(final_state: torch.Tensor) -> None:
        fla_kernels.fused_recurrent_fwd_kernel[(NV * NK * B * H,)](
            q=q, k=k, v=v, g=None, g_gamma=None, gk=gk, gv=None, o=o, h0=state, ht=final_state,
            cu_seqlens=None, scale=scale, T=T, B=B, H=H, K=K, V=V, BK=BK, BV=BV,
            USE_G=False, USE_G_GAMMA=False, USE_GK=True, USE_GV=False, REVERSE=False, STATE_V_FIRST=False,
        )  # fmt: skip

    with torch.cuda.device(q.device):
        key = (K, V, BK, BV, q.dtype, gk.dtype, q.device)
        if key not in _TUNED_STEPS:
            launch(torch.empty_like(state))
            _TUNED_STEPS.add(key)
        launch(state)
    return o


@torch.library.custom_op("titan_hybrid::gla_step", mutates_args=("state",))
def gla_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor,
             scale: float) -> torch.Tensor:  # fmt: skip
    """``fused_recurrent_gla`` as a custom op that mutates ``state``: a compiled decode step is one
    graph (fullgraph) with fla's autotuned kernel as an opaque node and the state write declared."""
    if q.is_cuda:
        return fla_gla_step_in_place(q, k, v, g, state, scale)
    return recurrent_step_torch(q, k, v, g, state, scale=scale).contiguous()


@gla_step.register_fake
def _(q, k, v, g, state, scale):
    return v.new_empty(v.shape)


# fla's GLA kernels as torch.library custom ops: torch.compile keeps them as opaque
# nodes inside the block's graph, instead of splitting the block at a graph break
# around fla's (compiler-disabled) autograd Function. Same kernels and the same
# forward / backward split as fla's ChunkGLAFunction; g's chunk cumsum (fp32) and
# the intra-chunk scores A are kept for the backward, the states h are recomputed.


def _chunk_size(T: int) -> int:
    """fla ChunkGLAFunction's choice: the next power of two of T, within [16, 64 = FLA_PACKED_CHUNK]."""
    return min(FLA_PACKED_CHUNK, max(16, 1 << (T - 1).bit_length()))


def _fla_layout(resets: torch.Tensor | None, *tensors: torch.Tensor):
    """``fla_layout`` with ChunkGLAFunction's chunk size for the packed length, and that size."""
    B, T = tensors[0].shape[:2]
    chunk_size = _chunk_size(T if resets is None else B * T)
    return *fla_layout(resets, chunk_size, *tensors), chunk_size


@torch.library.custom_op("titan_hybrid::fla_chunk_gla", mutates_args=(), device_types="cuda")
def fla_chunk_gla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float, resets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fla's chunk GLA forward: ``(o, g_cumsum, A)``; the last two are saved for the backward."""
    from titan_hybrid.ops import fla_kernels

    shape = v.shape
    (q, k, v, g), cu_seqlens, chunk_indices, chunk_size = _fla_layout(resets, q, k, v, g)
    with torch.cuda.device(q.device):
        # chunk_gla_fwd's own g cumsum, given the chunk indices it would prepare on the device (a sync)
        g_cumsum = fla_kernels.chunk_local_cumsum(
            g, chunk_size, scale=fla_kernels.RCP_LN2, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices
        )
        g_cumsum, A, _, _, o = fla_kernels.chunk_gla_fwd(
            q, k, v, g, g_cumsum, scale, None, False,
            cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices,
        )  # fmt: skip
    return o.reshape(shape), g_cumsum.float(), A  # fp32 whatever g's dtype, as the fake declares


@torch.library.custom_op("titan_hybrid::fla_chunk_gla_bwd", mutates_args=(), device_types="cuda")
def fla_chunk_gla_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cumsum: torch.Tensor,
    A: torch.Tensor,
    do: torch.Tensor,
    scale: float,
    resets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dg)`` of ``fla_chunk_gla``'s output ``o``."""
    from titan_hybrid.ops import fla_kernels

    shapes = [t.shape for t in (q, k, v)]
    (q, k, v, do), cu_seqlens, chunk_indices, chunk_size = _fla_layout(resets, q, k, v, do)
    with torch.cuda.device(q.device):
        dq, dk, dv, dg, _ = fla_kernels.chunk_gla_bwd(
            q, k, v, None, g_cumsum, scale, None, None, A, do, None,
            cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices,
        )  # fmt: skip
    dq, dk, dv = (d.to(x.dtype).reshape(shape) for d, x, shape in zip((dq, dk, dv), (q, k, v), shapes))
    return dq, dk, dv, dg.to(g_cumsum.dtype).reshape(shapes[0])


@fla_chunk_gla.register_fake
def _(q, k, v, g, scale, resets):
    B, T, H, _ = q.shape
    chunk_size = _chunk_size(T if resets is None else B * T)
    lead = (B, T) if resets is None else (1, B * T)
    return v.new_empty(v.shape), g.new_empty(*lead, H, g.shape[-1], dtype=torch.float), q.new_empty(
        *lead, H, chunk_size, dtype=torch.float
    )


@fla_chunk_gla_bwd.register_fake
def _(q, k, v, g_cumsum, A, do, scale, resets):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(q.shape, dtype=g_cumsum.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, g, scale, resets = inputs
    _, g_cumsum, A = output
    ctx.save_for_backward(q, k, v, g_cumsum, A, resets)
    ctx.scale, ctx.g_dtype = scale, g.dtype
    ctx.mark_non_differentiable(g_cumsum, A)


def _backward(ctx, do, _dg_cumsum, _dA):
    q, k, v, g_cumsum, A, resets = ctx.saved_tensors
    dq, dk, dv, dg = fla_chunk_gla_bwd(q, k, v, g_cumsum, A, do, ctx.scale, resets)
    return dq, dk, dv, dg.to(ctx.g_dtype), None, None


fla_chunk_gla.register_autograd(_backward, setup_context=_setup_context)
