"""Decode-time linear: ``x [M, K] @ weight[N, K]^T`` for the few rows of a decode step (M <= 16).

At batch 16 a decode step's GEMMs are latency-bound: cuBLAS takes 4.4-5.9 us for each of the
308M model's 1-10 MB weights on an H200 (10-40 % of HBM bandwidth; BENCHMARKS.md).
``decode_linear_kernel`` gives every CTA a narrow column block and keeps several K tiles in
flight: up to 1.3x faster at 16 rows, 2.3x at one.

Its output can be *segmented*: a fused projection's column blocks (GLA's q, k, v, gates) are
written one after the other, each a contiguous ``[M, width]`` matrix, so the recurrent kernels
that want contiguous heads read them without a copy. ``decode_linear_torch`` is the reference
and the path off CUDA (and for M > 16, where cuBLAS is the right tool).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton is optional on CPU-only installs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None

MAX_ROWS = 16  # tl.dot's smallest tile; a decode step has one row per sequence


def decode_linear_torch(x: torch.Tensor, weight: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """The kernel's flat output from ``F.linear(x, weight)``: its ``[M, width]`` column blocks one
    after the other."""
    return torch.cat([part.flatten() for part in F.linear(x, weight).split(widths, dim=-1)])


if triton is not None:

    @triton.jit
    def decode_linear_kernel(
        x_ptr, w_ptr, y_ptr, bounds_ptr, M, N, stride_xm,
        K: tl.constexpr, N_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One CTA per ``BLOCK_N`` output columns, all M rows; fp32 accumulation (fp32 inputs in
        full fp32, not TF32: the fp32 model is the decode step's reference). Column ``n`` of
        segment ``[lo, hi)`` lands at ``M * lo + m * (hi - lo) + (n - lo)`` of the flat output."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = offs_m < M
        col_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            w = tl.load(w_ptr + offs_n[:, None] * K + (k0 + offs_k)[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        lo = tl.zeros((BLOCK_N,), dtype=tl.int32)
        hi = tl.zeros((BLOCK_N,), dtype=tl.int32) + N
        for s in tl.static_range(1, N_SEGMENTS):
            bound = tl.load(bounds_ptr + s)
            lo = tl.where(offs_n >= bound, bound, lo)
            hi = tl.where((offs_n < bound) & (hi > bound), bound, hi)
        offset = M * lo[None, :] + offs_m[:, None] * (hi - lo)[None, :] + (offs_n - lo)[None, :]
        tl.store(y_ptr + offset, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def decode_tiling(n: int) -> dict:
    """``launch_decode_linear``'s tiling for a shape, the fastest of ``bench.decode_linear``'s sweep
    on an H200 (BENCHMARKS.md): 16-column blocks of 256-wide K tiles, 5 in flight, for the 308M
    model's 1-10 MB projections (at 1 and 16 rows alike); 64-column blocks for a vocabulary-sized
    matrix."""
    if n >= 16384:
        return dict(block_n=64, block_k=128, num_warps=4, num_stages=5)
    return dict(block_n=16, block_k=256, num_warps=2, num_stages=5)


def launch_decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bounds: torch.Tensor, block_n: int = 16, block_k: int = 256,
    num_warps: int = 2, num_stages: int = 5,
) -> torch.Tensor:  # fmt: skip
    """The kernel on ``x [M, K]`` (M <= 16, unit stride in K), a contiguous ``weight [N, K]`` and
    ``bounds`` (int32: 0, then each segment's first column); the flat output ``[M * N]``."""
    M, K = x.shape
    N = weight.shape[0]
    y = x.new_empty(M * N)
    decode_linear_kernel[(triton.cdiv(N, block_n),)](
        x, weight, y, bounds, M, N, x.stride(0),
        K=K, N_SEGMENTS=bounds.numel(), BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y


def segment_bounds(widths: list[int], device: torch.device) -> torch.Tensor:
    """``launch_decode_linear``'s ``bounds``: 0, then each later segment's first column (int32)."""
    starts = [0]
    for width in widths[:-1]:
        starts.append(starts[-1] + width)
    return torch.tensor(starts, dtype=torch.int32, device=device)


@torch.library.custom_op("titan_hybrid::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor, bounds: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """``x [M, K] @ weight^T`` as the flat concatenation of its contiguous ``[M, width]`` column
    blocks (``split_segments`` views them): the kernel on CUDA for M <= 16, PyTorch elsewhere."""
    if x.is_cuda and triton is not None and x.shape[0] <= MAX_ROWS:
        with torch.cuda.device(x.device):
            return launch_decode_linear(x, weight, bounds, **decode_tiling(weight.shape[0]))
    return decode_linear_torch(x, weight, widths)


@decode_linear.register_fake
def _(x, weight, bounds, widths):
    return x.new_empty(x.shape[0] * weight.shape[0])


def split_segments(flat: torch.Tensor, rows: int, widths: list[int]) -> list[torch.Tensor]:
    """``decode_linear``'s flat output as its ``[rows, width]`` blocks (views)."""
    return [block.view(rows, width) for block, width in zip(flat.split([rows * w for w in widths]), widths)]
