"""Gated DeltaNet (Yang et al., 2025): fla's Triton kernel on CUDA, a chunked PyTorch path elsewhere.

Recurrence per head (state S is K x V, one log-decay g <= 0 and one write
strength beta in (0, 1) per head and token):

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = scale * S_t^T q_t

i.e. the shared recurrence of ``titan_hybrid.ops.common`` with a per-head decay
and b = w = beta. Document boundaries are given as ``resets``. Decoding one token
from a prefilled state: ``fused_recurrent_gated_delta_rule`` (fla's kernel on CUDA).
"""

from __future__ import annotations

import os

import torch

from titan_hybrid.ops.common import (
    FLA_DELTA_CHUNK,
    call_fla,
    call_fla_step,
    chunk_recurrence_torch,
    fla_layout,
    fla_qk_l2norm,
    fla_qk_l2norm_bwd,
    fla_qk_l2norm_fake,
    l2norm,
    recurrent_step_torch,
    unpack_rows,
)


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    resets: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule in PyTorch (fp32); q, k [B,T,H,K], v [B,T,H,V], g, beta [B,T,H].

    The per-head decay makes the pairwise decays C x C instead of GLA's
    C x C x K, so fla's chunk length of 64 is also the fastest here on CPU.
    """
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    beta = beta.unsqueeze(-1)
    return chunk_recurrence_torch(
        q, k, v, g.unsqueeze(-1), b=beta, w=beta, scale=scale, resets=resets, chunk_size=chunk_size,
        output_final_state=output_final_state,
    )  # fmt: skip


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    resets: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule forward on the best backend for the tensors' device (and, with
    ``output_final_state``, each row's final fp32 state ``[B, H, K, V]``).

    On Hopper GPUs call ``require_exact_gated_delta_backward`` before training.
    """
    if q.is_cuda:
        if output_final_state:
            from titan_hybrid.ops import fla_kernels

            return call_fla(
                fla_kernels.chunk_gated_delta_rule, q, k, v, g, beta,
                resets=resets, scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm, output_final_state=True,
            )  # fmt: skip
        scale = k.shape[-1] ** -0.5 if scale is None else scale
        return fla_chunk_gated_delta_rule(q, k, v, g, beta, scale, resets, use_qk_l2norm)[0]
    return chunk_gated_delta_rule_torch(
        q, k, v, g, beta, scale=scale, resets=resets, use_qk_l2norm=use_qk_l2norm, output_final_state=output_final_state
    )


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> torch.Tensor:
    """Decode one token: q, k [B,1,H,K], v [B,1,H,V], g, beta [B,1,H]; fp32 ``state`` updated in place
    (fla's kernel on CUDA, ``recurrent_step_torch`` elsewhere: ``gated_delta_step``)."""
    return gated_delta_step(q, k, v, g, beta, state, q.shape[-1] ** -0.5 if scale is None else scale, use_qk_l2norm)


@torch.library.custom_op("titan_hybrid::gated_delta_step", mutates_args=("state",))
def gated_delta_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
    scale: float, use_qk_l2norm: bool,
) -> torch.Tensor:  # fmt: skip
    """``fused_recurrent_gated_delta_rule`` as a custom op mutating ``state`` (see ``ops.gla.gla_step``)."""
    if q.is_cuda:
        from titan_hybrid.ops import fla_kernels

        return call_fla_step(
            fla_kernels.fused_recurrent_gated_delta_rule, q, k, v, g, state=state, beta=beta, scale=scale,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
        ).to(v.dtype)  # fmt: skip
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    beta = beta.unsqueeze(-1)
    return recurrent_step_torch(q, k, v, g.unsqueeze(-1), state, b=beta, w=beta, scale=scale).contiguous()


@gated_delta_step.register_fake
def _(q, k, v, g, beta, state, scale, use_qk_l2norm):
    return v.new_empty(v.shape)


# fla's gated-delta-rule kernels as torch.library custom ops (see ``titan_hybrid.ops.gla``): the
# forward / backward split of fla's ChunkGatedDeltaRuleFunction, with its chunk length (64), its
# in-kernel q/k l2norm and what it saves: the normalised q, k and their rstd, g's chunk cumsum
# (fp32, log2) and the solved WY matrix A; the states h are recomputed in the backward. This runs
# fla's Triton chain (still dispatching its sub-kernels, e.g. chunk_bwd_dqkwg to TileLang); the
# public function's FlashQLA backend (only with the flash_qla package, K = V = 128, 16-bit) is not used.


@torch.library.custom_op("titan_hybrid::fla_chunk_gated_delta_rule", mutates_args=(), device_types="cuda")
def fla_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    resets: torch.Tensor | None,
    use_qk_l2norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fla's chunk gated-delta-rule forward: ``(o, q, k, q_rstd, k_rstd, g_cumsum, A)``; all but ``o``
    are saved for the backward (the first four from ``fla_qk_l2norm``)."""
    from titan_hybrid.ops import fla_kernels

    rows = v
    with fla_kernels.custom_device_ctx(q.device.index):
        q, k, qk_norm = fla_qk_l2norm(q, k, use_qk_l2norm)
        (q, k, v, g, beta), cu_seqlens, chunk_indices = fla_layout(resets, FLA_DELTA_CHUNK, q, k, v, g, beta)
        g_cumsum, o, A, _, _, _ = fla_kernels.chunk_gated_delta_rule_fwd(
            q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=None, output_final_state=False,
            cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=FLA_DELTA_CHUNK,
        )  # fmt: skip
    o, g_cumsum, A = unpack_rows(rows, o.to(q.dtype), g_cumsum.float(), A)
    return o, *qk_norm, g_cumsum, A


@torch.library.custom_op("titan_hybrid::fla_chunk_gated_delta_rule_bwd", mutates_args=(), device_types="cuda")
def fla_chunk_gated_delta_rule_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cumsum: torch.Tensor,
    beta: torch.Tensor,
    A: torch.Tensor,
    q_rstd: torch.Tensor,
    k_rstd: torch.Tensor,
    do: torch.Tensor,
    scale: float,
    resets: torch.Tensor | None,
    use_qk_l2norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dg, dbeta)`` of ``fla_chunk_gated_delta_rule``'s ``o``, dg in fp32; q, k as it
    saved them (normalised with ``use_qk_l2norm``), dq, dk for the raw ones."""
    from titan_hybrid.ops import fla_kernels

    inputs = (q, k, v, g_cumsum, beta)
    (q, k, v, g_cumsum, beta, A, do), cu_seqlens, chunk_indices = fla_layout(
        resets, FLA_DELTA_CHUNK, q, k, v, g_cumsum, beta, A, do
    )
    with fla_kernels.custom_device_ctx(q.device.index):
        dq, dk, dv, dbeta, dg, _, _, _ = fla_kernels.chunk_gated_delta_rule_bwd(
            q=q, k=k, v=v, g=g_cumsum, beta=beta, A=A, scale=scale, initial_state=None, do=do, dht=None,
            cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=FLA_DELTA_CHUNK,
        )  # fmt: skip
        dq, dk = fla_qk_l2norm_bwd(q, k, q_rstd, k_rstd, dq, dk, use_qk_l2norm)
    grads = [d.to(x.dtype) for d, x in zip((dq, dk, dv, dg, dbeta), inputs)]
    return tuple(unpack_rows(inputs[0], *grads))


@fla_chunk_gated_delta_rule.register_fake
def _(q, k, v, g, beta, scale, resets, use_qk_l2norm):
    o = v.new_empty(v.shape, dtype=q.dtype)
    A = k.new_empty(*beta.shape, FLA_DELTA_CHUNK)
    return o, *fla_qk_l2norm_fake(q, k, use_qk_l2norm), g.new_empty(g.shape, dtype=torch.float), A


@fla_chunk_gated_delta_rule_bwd.register_fake
def _(q, k, v, g_cumsum, beta, A, q_rstd, k_rstd, do, scale, resets, use_qk_l2norm):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, g_cumsum, beta))


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, scale, resets, use_qk_l2norm = inputs
    _, q_norm, k_norm, q_rstd, k_rstd, g_cumsum, A = output
    if use_qk_l2norm:
        q, k = q_norm, k_norm
    ctx.save_for_backward(q, k, v, g_cumsum, beta, A, q_rstd, k_rstd, resets)
    ctx.scale, ctx.use_qk_l2norm, ctx.g_dtype = scale, use_qk_l2norm, g.dtype
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, do, *_):
    q, k, v, g_cumsum, beta, A, q_rstd, k_rstd, resets = ctx.saved_tensors
    dq, dk, dv, dg, dbeta = fla_chunk_gated_delta_rule_bwd(
        q, k, v, g_cumsum, beta, A, q_rstd, k_rstd, do, ctx.scale, resets, ctx.use_qk_l2norm
    )
    return dq, dk, dv, dg.to(ctx.g_dtype), dbeta, None, None, None


fla_chunk_gated_delta_rule.register_autograd(_backward, setup_context=_setup_context)


def require_exact_gated_delta_backward() -> None:
    """Raise now if fla's gated-delta-rule backward would be refused (or wrong) on this machine.

    With Triton >= 3.4 and < 3.7.1 on Hopper, fla's Triton ``chunk_bwd_dqkwg``
    computes wrong gradients (fla issue #640); fla raises only inside the first
    backward (``fla_chunk_gated_delta_rule_bwd`` reaches that kernel through fla's
    own dispatch), after model setup and the forward pass. fla routes that kernel
    to its TileLang backend instead when TileLang is usable (package installed,
    nvcc found, not disabled by ``FLA_TILELANG=0`` or backend dispatch turned
    off). fla's FlashQLA backend belongs to its public function, which training
    no longer calls, so it is no way out here. GDN-2's backward uses its own
    kernels, not ``chunk_bwd_dqkwg``, and needs no such check. It imports fla, so
    ``parallelize_hybrid`` calls it on CUDA only.
    """
    import triton
    from fla import utils as fla_utils
    from fla.ops.common.backends.tilelang import CommonTileLangBackend

    if not (fla_utils.IS_NVIDIA_HOPPER and fla_utils.TRITON_ABOVE_3_4_0 and not fla_utils.TRITON_ABOVE_3_7_1):
        return
    tilelang = CommonTileLangBackend()
    dispatch_on = os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") != "1"
    if dispatch_on and tilelang.is_available() and tilelang.is_enabled():
        return
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "a Hopper GPU"
    raise RuntimeError(
        f"Gated DeltaNet layers cannot train on {gpu} with Triton {triton.__version__}: fla's Triton "
        "backward kernel (chunk_bwd_dqkwg) computes wrong gradients on Hopper with Triton >= 3.4.0 "
        "and < 3.7.1 (fla issue #640), so fla refuses it. Ways out: install triton>=3.7.1 (with a "
        "torch build that accepts it), or `pip install tilelang` (needs nvcc from a CUDA toolkit; "
        "leave FLA_TILELANG unset or 1) so fla dispatches that kernel to its TileLang backend."
    )
