"""Decode-time linears: ``x [M, K] @ weight[N, K]^T`` for the few rows of a decode step (M <= 16),
with the work that sits between a block's GEMMs done in their epilogues.

At batch 16 a decode step's GEMMs are latency-bound: cuBLAS takes 4.4-5.9 us for each of the
308M model's 1-10 MB weights on an H200 (10-40 % of HBM bandwidth; BENCHMARKS.md). The kernels
here give every CTA a narrow column block and keep several K tiles in flight: up to 1.3x faster
at 16 rows, 2.3x at one. Every small kernel between them costs ~2-3 us as well, so they also
take over the block's elementwise work where it costs the weight stream nothing:

- the pre-norm: ``RMSNorm(x) @ W^T = rstd * ((x * g) @ W^T)``. The GEMM that *writes* the
  residual stream also writes ``x * g`` (``g``: the next norm's weight) and per-row partial sums
  of ``x^2``; the GEMM that reads it multiplies its product by ``rstd`` (``PreNormed``);
- the residual add (``decode_linear_residual``), SwiGLU's ``silu(a) * b`` (``decode_swiglu``)
  and GLA's log-decay ``logsigmoid(logits + bias) * scale`` in fp32 (``decode_linear``'s
  ``decay`` segment);
- GLA's per-head output norm and gate, in the output projection's K loop (``GatedHeads``).

The residual GEMMs (1024 output columns: 64 column blocks for 132 SMs) split K over several CTAs
and add the partials deterministically (``decode_residual_kernel``). On Hopper every decode GEMM
is launched programmatically dependent: its CTAs start, and load their first weight tile, while
the kernel before it drains.

``decode_linear``'s output can be *segmented*: a fused projection's column blocks (GLA's q, k, v,
gates) are written one after the other, each a contiguous ``[M, width]`` matrix, so the recurrent
kernels that want contiguous heads read them without a copy. Each op has its PyTorch path
(``*_torch``): the reference, and the path off CUDA and for M > 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is optional on CPU-only installs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None

MAX_ROWS = 16  # tl.dot's smallest tile; a decode step has one row per sequence
SUMSQ_BLOCK = 16  # columns per partial sum of squares (the residual kernel's column block)


@dataclass
class PreNormed:
    """A decode step's residual stream on its way into a pre-norm GEMM: ``RMSNorm(x)`` without the
    norm's own kernel. ``scaled = x * norm.weight`` and ``sumsq [P, M]``: partial sums of
    ``x^2`` over column blocks (fp32), which the GEMM adds up for ``rstd``."""

    x: Tensor  # [B, 1, dim]: the residual stream itself
    scaled: Tensor  # like x
    sumsq: Tensor  # [P, B * 1]
    eps: float

    @classmethod
    def of(cls, x: Tensor, norm: torch.nn.RMSNorm) -> PreNormed:
        """From a residual stream that no fused GEMM wrote (the embeddings, an unfused block's output)."""
        return cls(x, x * norm.weight, x.float().square().sum(-1).reshape(1, -1), norm_eps(norm))

    @property
    def shape(self) -> torch.Size:
        """The stream's shape: a mixer reads ``B, T`` from either form of its input."""
        return self.x.shape


@dataclass
class GatedHeads:
    """A GLA step's output on its way into the output projection: ``RMSNorm(o) * silu(gate)`` per
    head without kernels of its own: the projection's decode GEMM normalises and gates each K tile
    as it loads it (``decode_linear_residual``'s prologue)."""

    o: Tensor  # [B, 1, H, D]: the recurrent kernel's output, contiguous heads
    gate: Tensor  # [B, 1, H, D]
    weight: Tensor  # [D]: the head norm's weight
    eps: float


def norm_eps(norm: torch.nn.RMSNorm) -> float:
    """The eps ``nn.RMSNorm`` uses (``None``: the dtype's machine epsilon)."""
    return norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps


def segment_bounds(widths: list[int], device: torch.device) -> Tensor:
    """``decode_linear``'s ``bounds``: 0, then each later segment's first column (int32)."""
    starts = [0]
    for width in widths[:-1]:
        starts.append(starts[-1] + width)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def split_segments(flat: Tensor, rows: int, widths: list[int]) -> list[Tensor]:
    """``decode_linear``'s flat output as its ``[rows, width]`` blocks (views)."""
    return [block.view(rows, width) for block, width in zip(flat.split([rows * w for w in widths]), widths)]


def sumsq_partials(y: Tensor) -> Tensor:
    """``[P, M]`` sums of ``y [M, N]``'s squares over ``SUMSQ_BLOCK``-column blocks, as the residual
    kernel writes them (fp32, from ``y`` as stored)."""
    M, N = y.shape
    squares = F.pad(y.float().square(), (0, -N % SUMSQ_BLOCK))
    return squares.view(M, -1, SUMSQ_BLOCK).sum(-1).T.contiguous()


def rstd_of(sumsq: Tensor, width: int, eps: float) -> Tensor:
    """Each row's ``rsqrt(mean(x^2) + eps)`` from ``PreNormed.sumsq`` (``width``: x's last dim)."""
    return torch.rsqrt(sumsq.sum(0) / width + eps)


def log_decay(logits: Tensor, bias: Tensor, scale: float) -> Tensor:
    """GLA's log-decay from its logits: ``logsigmoid(logits + bias) * scale`` in fp32."""
    return F.logsigmoid(logits.float() + bias) * scale


# The PyTorch paths. ``rstd``: ``rstd_of`` the input rows, or None without a pre-norm.


def _product(x: Tensor, weight: Tensor, rstd: Tensor | None) -> Tensor:
    y = F.linear(x, weight)
    return y if rstd is None else (y.float() * rstd[:, None]).to(y.dtype)


def decode_linear_torch(
    x: Tensor, weight: Tensor, widths: list[int], rstd: Tensor | None = None, decay: tuple[Tensor, float] | None = None
) -> tuple[Tensor, Tensor]:
    """The flat output (the ``[M, width]`` column blocks one after the other; with ``decay`` all but
    the last) and the last block as ``logsigmoid(y + bias) * scale`` in fp32 (empty without)."""
    parts = _product(x, weight, rstd).split(widths, dim=-1)
    if decay is None:
        return torch.cat([part.flatten() for part in parts]), x.new_empty(0, dtype=torch.float32)
    return torch.cat([part.flatten() for part in parts[:-1]]), log_decay(parts[-1], *decay).contiguous()


def gated_heads_torch(o: Tensor, gate: Tensor, head_weight: Tensor, eps: float) -> Tensor:
    """``RMSNorm(o) * silu(gate)`` over heads of ``head_weight``'s width, as GLA's output runs it."""
    M, K = o.shape
    D = head_weight.numel()
    normed = F.rms_norm(o.view(M, K // D, D), (D,), head_weight, eps).view(M, K)
    return normed * F.silu(gate)


def decode_linear_residual_torch(
    x: Tensor,
    weight: Tensor,
    residual: Tensor,
    norm_weight: Tensor | None,
    gated: tuple[Tensor, Tensor, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``residual + x @ weight^T``; with the next norm's weight also its ``scaled`` and ``sumsq``.
    ``gated = (gate, head_weight, eps)``: ``x`` is ``GatedHeads.o``, normed and gated first."""
    if gated is not None:
        x = gated_heads_torch(x, *gated)
    y = residual + F.linear(x, weight)
    if norm_weight is None:
        return y, y.new_empty(0), y.new_empty(0, dtype=torch.float32)
    return y, y * norm_weight, sumsq_partials(y)


def decode_swiglu_torch(x: Tensor, weight: Tensor, rstd: Tensor | None) -> Tensor:
    """``silu(a) * b`` of ``[a, b] = x @ weight^T`` (``weight``: W1's rows, then W3's)."""
    a, b = _product(x, weight, rstd).float().chunk(2, dim=-1)
    return (F.silu(a) * b).to(x.dtype)


if triton is not None:

    @triton.jit
    def _gated_heads(o, gate, head_w, eps, HEAD: tl.constexpr):
        """``RMSNorm(o) * silu(gate)`` over each ``HEAD`` columns of a ``[BLOCK_M, BLOCK_K]`` tile
        (``head_w``: the norm's weight tiled to ``BLOCK_K``), in fp32, back in ``o``'s dtype."""
        BLOCK_M: tl.constexpr = o.shape[0]
        BLOCK_K: tl.constexpr = o.shape[1]
        heads = tl.reshape(o.to(tl.float32), (BLOCK_M, BLOCK_K // HEAD, HEAD))
        rstd = tl.rsqrt(tl.sum(heads * heads, axis=2) / HEAD + eps)
        normed = tl.reshape(heads * rstd[:, :, None], (BLOCK_M, BLOCK_K))
        g = gate.to(tl.float32)
        return (normed * head_w[None, :] * g * tl.sigmoid(g)).to(o.dtype)

    @triton.jit
    def _weight_tile(w_ptr, rows, rows_ok, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
        """``w[rows, k0:k0 + BLOCK_K]`` (columns past K masked)."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        return tl.load(w_ptr + rows[:, None] * K + offs_k[None, :], mask=rows_ok[:, None] & (offs_k < K)[None, :],
                       other=0.0)  # fmt: skip

    @triton.jit
    def _await_inputs(PDL: tl.constexpr):
        """Launched programmatically dependent (``PDL``), a kernel's CTAs start while the kernel
        before it finishes; they have read only weights so far. Wait for its outputs, then let the
        next kernel's CTAs start (not earlier: two kernels resident at a time, not three)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _input_tile(x_ptr, stride_xm, offs_m, M, k0, gate_ptr, head_w, head_eps, K: tl.constexpr,
                    BLOCK_K: tl.constexpr, HEAD: tl.constexpr):  # fmt: skip
        """``x[offs_m, k0:k0 + BLOCK_K]``; ``HEAD > 0``: ``x`` is ``GatedHeads.o`` (``gate_ptr``: the
        gate, laid out as ``x``; ``head_w``: the head norm's weight tiled to ``BLOCK_K``), normed and
        gated."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        at = offs_m[:, None] * stride_xm + offs_k[None, :]
        mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0)
        if HEAD > 0:
            x = _gated_heads(x, tl.load(gate_ptr + at, mask=mask, other=0.0), head_w, head_eps, HEAD)
        return x

    @triton.jit
    def _product_tile(x_ptr, w_ptr, w_first, stride_xm, offs_m, rows, M, rows_ok, k_lo, gate_ptr, head_w_ptr,
                      head_eps, K: tl.constexpr, K_SPAN: tl.constexpr, BLOCK_K: tl.constexpr, HEAD: tl.constexpr,
                      PRECISION: tl.constexpr):  # fmt: skip
        """``x[offs_m, k_lo:k_lo + K_SPAN] @ w[rows, same]^T`` in fp32: the first K tile's weights
        (``w_first``) loaded before ``_await_inputs``, the other tiles pipelined. fp32 inputs in full
        fp32, not TF32: the fp32 model is the decode step's reference."""
        head_w = x_ptr  # a placeholder without gated heads
        if HEAD > 0:
            head_w = tl.load(head_w_ptr + tl.arange(0, BLOCK_K) % HEAD).to(tl.float32)
        acc = tl.zeros((offs_m.shape[0], rows.shape[0]), dtype=tl.float32)
        x = _input_tile(x_ptr, stride_xm, offs_m, M, k_lo, gate_ptr, head_w, head_eps, K, BLOCK_K, HEAD)
        acc = tl.dot(x, tl.trans(w_first), acc, input_precision=PRECISION)
        for k_step in range(BLOCK_K, K_SPAN, BLOCK_K):
            x = _input_tile(x_ptr, stride_xm, offs_m, M, k_lo + k_step, gate_ptr, head_w, head_eps, K, BLOCK_K, HEAD)
            w = _weight_tile(w_ptr, rows, rows_ok, k_lo + k_step, K, BLOCK_K)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        return acc

    # The epilogues' operands (partial sums of squares, biases, residuals, norm weights) are loaded
    # before the K loop and used after it: loaded after it, each adds a memory latency to a kernel
    # of 3-7 us (on an H200 the residual GEMMs took 4.9 us that way, 4.2 us this way).

    @triton.jit
    def _load_partials(sumsq_ptr, offs_m, M, P, BLOCK_P: tl.constexpr):
        """The ``[P, M]`` partial sums of squares, as a ``[BLOCK_P, BLOCK_M]`` tile (zeros past P)."""
        offs_p = tl.arange(0, BLOCK_P)
        return tl.load(sumsq_ptr + offs_p[:, None] * M + offs_m[None, :],
                       mask=(offs_p < P)[:, None] & (offs_m < M)[None, :], other=0.0)  # fmt: skip

    @triton.jit
    def _rstd(partials, eps, K: tl.constexpr):
        """``rsqrt(mean(x^2) + eps)`` per row."""
        return tl.rsqrt(tl.sum(partials, axis=0) / K + eps)

    @triton.jit
    def decode_linear_kernel(
        x_ptr, w_ptr, y_ptr, bounds_ptr, sumsq_ptr, decay_ptr, bias_ptr, M, N, P, stride_xm, eps, decay_from,
        decay_scale, K: tl.constexpr, N_SEGMENTS: tl.constexpr, NORM: tl.constexpr, DECAY: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
        PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One CTA per ``BLOCK_N`` output columns, all M rows. Column ``n`` of segment ``[lo, hi)``
        lands at ``M * lo + m * (hi - lo) + (n - lo)`` of the flat output; the columns from
        ``decay_from`` on (none without ``DECAY``: ``decay_from = N``) go to ``decay_ptr`` (fp32,
        activated) instead."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_m < M
        col_ok = offs_n < N
        decayed = offs_n >= decay_from
        w_first = _weight_tile(w_ptr, offs_n, col_ok, 0, K, BLOCK_K)
        _await_inputs(PDL)
        if NORM:
            partials = _load_partials(sumsq_ptr, offs_m, M, P, BLOCK_P)
        if DECAY:
            bias = tl.load(bias_ptr + offs_n - decay_from, mask=col_ok & decayed, other=0.0).to(tl.float32)
        acc = _product_tile(x_ptr, w_ptr, w_first, stride_xm, offs_m, offs_n, M, col_ok, 0, x_ptr, x_ptr, 0.0, K, K,
                            BLOCK_K, 0, PRECISION)  # fmt: skip
        if NORM:
            acc = acc * _rstd(partials, eps, K)[:, None]
        if DECAY:
            logits = acc + bias[None, :]
            log_sigmoid = tl.minimum(logits, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(logits)))  # stable
            width = N - decay_from
            tl.store(decay_ptr + offs_m[:, None] * width + (offs_n - decay_from)[None, :], log_sigmoid * decay_scale,
                     mask=row_ok[:, None] & (col_ok & decayed)[None, :])  # fmt: skip
            col_ok = col_ok & ~decayed
        lo = tl.zeros((BLOCK_N,), dtype=tl.int32)
        hi = tl.zeros((BLOCK_N,), dtype=tl.int32) + decay_from
        for s in tl.static_range(1, N_SEGMENTS):
            bound = tl.load(bounds_ptr + s)
            lo = tl.where(offs_n >= bound, bound, lo)
            hi = tl.where((offs_n < bound) & (hi > bound), bound, hi)
        offset = M * lo[None, :] + offs_m[:, None] * (hi - lo)[None, :] + (offs_n - lo)[None, :]
        tl.store(y_ptr + offset, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _residual_epilogue(acc, residual, g, y_ptr, scaled_ptr, sumsq_ptr, at, mask, offs_m, M,
                           NEXT_NORM: tl.constexpr):  # fmt: skip
        """``y = residual + acc``; with ``NEXT_NORM`` also ``y * g`` and the column block's per-row
        sum of ``y^2`` (row ``program_id(0)`` of ``sumsq [P, M]``)."""
        y = (acc + residual.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + at, y, mask=mask)
        if NEXT_NORM:
            stored = y.to(tl.float32)
            tl.store(scaled_ptr + at, (stored * g[None, :]).to(scaled_ptr.dtype.element_ty), mask=mask)
            tl.store(sumsq_ptr + tl.program_id(0) * M + offs_m, tl.sum(stored * stored, axis=1), mask=offs_m < M)

    @triton.jit
    def decode_residual_kernel(
        x_ptr, gate_ptr, head_w_ptr, w_ptr, res_ptr, y_ptr, scaled_ptr, sumsq_ptr, g_ptr, partial_ptr, arrivals_ptr,
        M, N, stride_xm, head_eps, K: tl.constexpr, K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr,
        HEAD: tl.constexpr, NEXT_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """``y = residual + x @ w^T`` for ``BLOCK_N`` columns (``_residual_epilogue``). Split-K: CTA
        ``(n, s)`` writes its product over K columns ``[s, s + 1) * K_PER_SPLIT`` to ``partial [S, M,
        N]`` (fp32); the column block's last CTA to arrive (``arrivals[n]``, left at 0 for the next
        launch) adds the partials in split order, so the result does not depend on who is last."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        mask = (offs_m < M)[:, None] & col_ok[None, :]
        at = offs_m[:, None] * N + offs_n[None, :]
        k_lo = tl.program_id(1) * K_PER_SPLIT
        w_first = _weight_tile(w_ptr, offs_n, col_ok, k_lo, K, BLOCK_K)
        _await_inputs(PDL)
        residual = tl.load(res_ptr + at, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)  # a placeholder without NEXT_NORM
        acc = _product_tile(x_ptr, w_ptr, w_first, stride_xm, offs_m, offs_n, M, col_ok, k_lo, gate_ptr, head_w_ptr,
                            head_eps, K, K_PER_SPLIT, BLOCK_K, HEAD, PRECISION)  # fmt: skip
        if SPLIT_K == 1:
            _residual_epilogue(acc, residual, g, y_ptr, scaled_ptr, sumsq_ptr, at, mask, offs_m, M, NEXT_NORM)
        else:
            tl.store(partial_ptr + tl.program_id(1) * M * N + at, acc, mask=mask)
            tl.debug_barrier()  # every thread's partial written before the release below
            if tl.atomic_add(arrivals_ptr + tl.program_id(0), 1, sem="acq_rel") == SPLIT_K - 1:
                total = tl.zeros_like(acc)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(partial_ptr + s * M * N + at, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(arrivals_ptr + tl.program_id(0), 0)
                _residual_epilogue(total, residual, g, y_ptr, scaled_ptr, sumsq_ptr, at, mask, offs_m, M, NEXT_NORM)

    @triton.jit
    def decode_swiglu_kernel(
        x_ptr, w_ptr, y_ptr, sumsq_ptr, M, H, P, stride_xm, eps, K: tl.constexpr, NORM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
        PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """``silu(a) * b`` for ``BLOCK_N // 2`` hidden columns ``n``: one product tile over W1's rows
        ``n`` and W3's rows ``H + n`` (so a CTA streams ``BLOCK_N`` weight rows, as the plain kernel)."""
        HALF: tl.constexpr = BLOCK_N // 2
        offs_m = tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_N)
        hidden = tl.program_id(0) * HALF + offs_c % HALF
        rows = hidden + (offs_c >= HALF).to(tl.int32) * H
        w_first = _weight_tile(w_ptr, rows, hidden < H, 0, K, BLOCK_K)
        _await_inputs(PDL)
        if NORM:
            partials = _load_partials(sumsq_ptr, offs_m, M, P, BLOCK_P)
        acc = _product_tile(x_ptr, w_ptr, w_first, stride_xm, offs_m, rows, M, hidden < H, 0, x_ptr, x_ptr, 0.0, K, K,
                            BLOCK_K, 0, PRECISION)  # fmt: skip
        if NORM:
            acc = acc * _rstd(partials, eps, K)[:, None]
        a, b = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        y = a * tl.sigmoid(a) * b
        offs_h = tl.program_id(0) * HALF + tl.arange(0, HALF)
        mask = (offs_m < M)[:, None] & (offs_h < H)[None, :]
        tl.store(y_ptr + offs_m[:, None] * H + offs_h[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def decode_tiling(n: int) -> dict:
    """A decode GEMM's tiling for ``n`` output columns, the fastest of ``bench.decode_linear``'s sweep
    on an H200 (BENCHMARKS.md): 16-column blocks of 256-wide K tiles, 5 in flight, for the 308M
    model's 1-10 MB projections (at 1 and 16 rows alike); 64-column blocks for a vocabulary-sized
    matrix."""
    if n >= 16384:
        return dict(block_n=64, block_k=128, num_warps=4, num_stages=5)
    if n > 4096:  # GLA's in-projection (5120 columns): the sweep's best, more CTAs resident per SM
        return dict(block_n=16, block_k=256, num_warps=2, num_stages=3)
    return dict(block_n=16, block_k=256, num_warps=2, num_stages=5)


def _pdl(x: Tensor) -> bool:
    """Programmatic dependent launch: on Hopper and later (not in Triton's interpreter)."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _on_kernel(x: Tensor) -> bool:
    return x.is_cuda and triton is not None and x.shape[0] <= MAX_ROWS


def _norm_args(sumsq: Tensor | None, x: Tensor) -> tuple[Tensor, int, int]:
    """``sumsq`` (a placeholder without a norm), its number of partials and their block size."""
    if sumsq is None:
        return x, 0, 1
    return sumsq, sumsq.shape[0], triton.next_power_of_2(sumsq.shape[0])


def launch_decode_linear(
    x: Tensor, weight: Tensor, bounds: Tensor, sumsq: Tensor | None = None, eps: float = 0.0,
    decay: tuple[Tensor, float] | None = None, block_n: int = 16, block_k: int = 256, num_warps: int = 2,
    num_stages: int = 5,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``decode_linear_kernel`` on ``x [M, K]`` (M <= 16, unit stride in K), a contiguous
    ``weight [N, K]``, ``bounds`` (int32: 0, then each segment's first column)."""
    M, K = x.shape
    N = weight.shape[0]
    if decay is None:
        bias, scale, decay_from, decay_out = x, 1.0, N, x.new_empty(0, dtype=torch.float32)
    else:
        bias, scale = decay
        decay_from = N - bias.numel()
        decay_out = x.new_empty(M, N - decay_from, dtype=torch.float32)
    y = x.new_empty(M * decay_from)
    sumsq, P, block_p = _norm_args(sumsq, x)
    pdl = _pdl(x)
    decode_linear_kernel[(triton.cdiv(N, block_n),)](
        x, weight, y, bounds, sumsq, decay_out, bias, M, N, P, x.stride(0), eps, decay_from, scale,
        K=K, N_SEGMENTS=bounds.numel() - (decay is not None), NORM=P > 0, DECAY=decay is not None,
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_P=block_p, PRECISION=_precision(x),
        PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return y, decay_out


@torch.library.custom_op("titan_hybrid::decode_linear", mutates_args=())
def decode_linear(
    x: Tensor, weight: Tensor, bounds: Tensor, widths: list[int], sumsq: Tensor | None = None, eps: float = 0.0,
    decay_bias: Tensor | None = None, decay_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``x [M, K] @ weight^T`` as the flat concatenation of its contiguous ``[M, width]`` column
    blocks (``split_segments`` views them). ``sumsq``: ``x`` is a ``PreNormed.scaled`` and the
    product is multiplied by its rows' ``rstd``. ``decay_bias``: the last block comes back
    separately as GLA's log-decay ``logsigmoid(y + bias) * decay_scale`` (fp32; empty without)."""
    decay = None if decay_bias is None else (decay_bias, decay_scale)
    if _on_kernel(x):
        with torch.cuda.device(x.device):
            return launch_decode_linear(x, weight, bounds, sumsq, eps, decay, **decode_tiling(weight.shape[0]))
    rstd = None if sumsq is None else rstd_of(sumsq, x.shape[-1], eps)
    return decode_linear_torch(x, weight, widths, rstd, decay)


@decode_linear.register_fake
def _(x, weight, bounds, widths, sumsq=None, eps=0.0, decay_bias=None, decay_scale=1.0):
    M, N = x.shape[0], weight.shape[0]
    if decay_bias is None:
        return x.new_empty(M * N), x.new_empty(0, dtype=torch.float32)
    width = decay_bias.numel()
    return x.new_empty(M * (N - width)), x.new_empty(M, width, dtype=torch.float32)


def residual_tiling(k: int, gated: bool) -> dict:
    """A residual GEMM's tiling (``SUMSQ_BLOCK``-column blocks) for ``k`` input columns: split-K,
    because its 1024 output columns make only 64 column blocks for an H200's 132 SMs, and the
    gated-heads prologue runs once per K tile of a CTA."""
    if gated:  # one K tile a CTA: the prologue's norm and gate are not pipelined
        return dict(block_k=256, num_warps=4, num_stages=5, split_k=4)
    if k <= 1024:
        return dict(block_k=128, num_warps=4, num_stages=5, split_k=1)
    return dict(block_k=256, num_warps=2, num_stages=5, split_k=4)


def launch_decode_residual(
    x: Tensor, weight: Tensor, residual: Tensor, norm_weight: Tensor | None,
    gated: tuple[Tensor, Tensor, float] | None = None, arrivals: Tensor | None = None, split_k: int = 1,
    block_k: int = 256, num_warps: int = 2, num_stages: int = 5,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``decode_residual_kernel`` on ``SUMSQ_BLOCK``-column blocks.
    ``gated = (gate, head_weight, eps)``; ``split_k > 1`` needs ``arrivals`` (int32 zeros, one per
    column block; left zero)."""
    M, K = x.shape
    N = weight.shape[0]
    blocks = triton.cdiv(N, SUMSQ_BLOCK)
    y = torch.empty_like(residual)
    if norm_weight is None:
        scaled, sumsq, g = y.new_empty(0), y.new_empty(0, dtype=torch.float32), y
    else:
        scaled, sumsq, g = torch.empty_like(y), y.new_empty(blocks, M, dtype=torch.float32), norm_weight
    gate, head_weight, head_eps = gated if gated is not None else (x, x, 0.0)
    head = 0 if gated is None else head_weight.numel()
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    if split_k > 1 and (arrivals is None or arrivals.numel() < blocks):
        raise ValueError(f"split-K over {blocks} column blocks needs as many arrival counters, got {arrivals}")
    if gated is not None and (block_k % head or gate.stride(0) != x.stride(0)):
        raise ValueError(f"gated heads of {head} columns need K tiles of whole heads and the gate laid out as x")
    partial = x.new_empty((split_k, M, N) if split_k > 1 else (0,), dtype=torch.float32)
    splits, pdl = triton.cdiv(K, k_per_split), _pdl(x)
    decode_residual_kernel[(blocks, splits)](
        x, gate, head_weight, weight, residual, y, scaled, sumsq, g, partial, arrivals if arrivals is not None else y,
        M, N, x.stride(0), head_eps, K=K, K_PER_SPLIT=k_per_split, SPLIT_K=splits, HEAD=head,
        NEXT_NORM=norm_weight is not None, BLOCK_M=MAX_ROWS, BLOCK_N=SUMSQ_BLOCK, BLOCK_K=block_k,
        PRECISION=_precision(x), PDL=pdl, num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return y, scaled, sumsq


def launch_decode_swiglu(
    x: Tensor, weight: Tensor, sumsq: Tensor | None, eps: float, block_n: int = 16, block_k: int = 256,
    num_warps: int = 2, num_stages: int = 5,
) -> Tensor:  # fmt: skip
    """``decode_swiglu_kernel``: ``block_n`` weight rows a CTA, half of them W1's, half W3's."""
    M, K = x.shape
    H = weight.shape[0] // 2
    y = x.new_empty(M, H)
    sumsq, P, block_p = _norm_args(sumsq, x)
    pdl = _pdl(x)
    decode_swiglu_kernel[(triton.cdiv(H, block_n // 2),)](
        x, weight, y, sumsq, M, H, P, x.stride(0), eps, K=K, NORM=P > 0, BLOCK_M=MAX_ROWS, BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_P=block_p, PRECISION=_precision(x), PDL=pdl, num_warps=num_warps,
        num_stages=num_stages, launch_pdl=pdl,
    )  # fmt: skip
    return y


@torch.library.custom_op("titan_hybrid::decode_linear_residual", mutates_args=())
def decode_linear_residual(
    x: Tensor, weight: Tensor, residual: Tensor, norm_weight: Tensor | None = None, gate: Tensor | None = None,
    head_weight: Tensor | None = None, head_eps: float = 0.0, arrivals: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``residual [M, N] + x [M, K] @ weight^T``, and with ``norm_weight`` (the next pre-norm's) the
    ``PreNormed`` parts of the result: ``y * norm_weight`` and ``sumsq [cdiv(N, SUMSQ_BLOCK), M]``
    (both empty without). ``gate``: ``x`` is ``GatedHeads.o`` (``head_weight``, ``head_eps``: the
    head norm's). ``arrivals``: the split-K kernel's counters (``LinearGroup`` keeps them; they are
    zero again after each call); without them K is not split."""
    gated = None if gate is None else (gate, head_weight, head_eps)
    if _on_kernel(x):
        with torch.cuda.device(x.device):
            tiling = residual_tiling(x.shape[1], gated is not None)
            if arrivals is None:
                tiling["split_k"] = 1
            return launch_decode_residual(x, weight, residual, norm_weight, gated, arrivals, **tiling)
    return decode_linear_residual_torch(x, weight, residual, norm_weight, gated)


@decode_linear_residual.register_fake
def _(x, weight, residual, norm_weight=None, gate=None, head_weight=None, head_eps=0.0, arrivals=None):
    if norm_weight is None:
        return torch.empty_like(residual), residual.new_empty(0), residual.new_empty(0, dtype=torch.float32)
    P = -(-weight.shape[0] // SUMSQ_BLOCK)
    return torch.empty_like(residual), torch.empty_like(residual), residual.new_empty(P, x.shape[0], dtype=torch.float32)


@torch.library.custom_op("titan_hybrid::decode_swiglu", mutates_args=())
def decode_swiglu(x: Tensor, weight: Tensor, sumsq: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """SwiGLU's hidden ``silu(x @ W1^T) * (x @ W3^T)`` from ``weight = [W1; W3]``, one kernel for
    both products and the gate; ``sumsq`` as in ``decode_linear``."""
    if _on_kernel(x):
        with torch.cuda.device(x.device):
            return launch_decode_swiglu(x, weight, sumsq, eps, **decode_tiling(weight.shape[0]))
    rstd = None if sumsq is None else rstd_of(sumsq, x.shape[-1], eps)
    return decode_swiglu_torch(x, weight, rstd)


@decode_swiglu.register_fake
def _(x, weight, sumsq=None, eps=0.0):
    return x.new_empty(x.shape[0], weight.shape[0] // 2)
