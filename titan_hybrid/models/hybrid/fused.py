"""Inference: the bias-free linears that read the same input as one matrix, so a latency-bound
decode step runs one GEMM where it ran several, through ``ops.decode_linear`` (GEMMs tiled for a
decode step's few rows, each linear's output a contiguous block, the block's norms, residual adds
and gates in their epilogues).

``LinearGroup`` concatenates the weights once and makes each linear's weight a view of its
rows: no memory is added, names and state dicts stay as they are (``load_state_dict`` copies
into the views), and the math is unchanged. Build it after the model has its device and dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titan_hybrid.ops.decode_linear import (
    MAX_ROWS,
    SUMSQ_BLOCK,
    GatedHeads,
    PreNormed,
    decode_linear,
    decode_linear_residual,
    decode_swiglu,
    log_decay,
    norm_eps,
    segment_bounds,
    split_segments,
)


class LinearGroup:
    """``extra``: more rows after the linears' (a matrix derived from other weights, e.g. a low-rank
    pair multiplied out); its output comes last. Derived rows do not follow a later
    ``load_state_dict``: fuse after loading. One linear makes a group too: its decode GEMM.
    ``decay = (bias, scale)``: the last output is GLA's log-decay ``logsigmoid(y + bias) * scale``
    (fp32), computed in the decode GEMM's epilogue."""

    def __init__(self, linears: list[nn.Linear], extra: torch.Tensor | None = None,
                 decay: tuple[torch.Tensor, float] | None = None):  # fmt: skip
        if any(lin.bias is not None for lin in linears) or len({lin.in_features for lin in linears}) != 1:
            raise ValueError("a LinearGroup takes bias-free linears of one input width")
        blocks = [lin.weight.detach() for lin in linears] + ([extra.to(linears[0].weight.dtype)] if extra is not None else [])
        self.weight = torch.cat(blocks)
        self.sizes = [block.shape[0] for block in blocks]
        self.bounds = segment_bounds(self.sizes, self.weight.device)
        self.decay = decay
        # The split-K residual GEMM's arrival counters (zero between calls), one per column block.
        blocks = -(-self.weight.shape[0] // SUMSQ_BLOCK)
        self.arrivals = torch.zeros(blocks, dtype=torch.int32, device=self.weight.device)
        for lin, rows in zip(linears, self.weight.split(self.sizes)):
            lin.weight = nn.Parameter(rows, requires_grad=lin.weight.requires_grad)

    def __call__(self, x: torch.Tensor | PreNormed) -> tuple[torch.Tensor, ...]:
        """Each linear's output of ``x``, or of ``RMSNorm(x)`` for a ``PreNormed`` stream; a decode
        step's (at most ``MAX_ROWS`` rows) each contiguous."""
        inputs = x.scaled if isinstance(x, PreNormed) else x
        lead, width = inputs.shape[:-1], inputs.shape[-1]
        rows = inputs.numel() // width
        bias, scale = self.decay if self.decay is not None else (None, 1.0)
        if rows > MAX_ROWS and not isinstance(x, PreNormed):
            parts = list(F.linear(inputs, self.weight).split(self.sizes, dim=-1))
            if bias is not None:
                parts[-1] = log_decay(parts[-1], bias, scale)
            return tuple(parts)
        sumsq, eps = (x.sumsq, x.eps) if isinstance(x, PreNormed) else (None, 0.0)
        flat, decayed = decode_linear(
            inputs.reshape(rows, width), self.weight, self.bounds, self.sizes, sumsq, eps, bias, scale
        )
        blocks = split_segments(flat, rows, self.sizes[:-1] if bias is not None else self.sizes)
        blocks += [decayed] if bias is not None else []
        return tuple(block.view(*lead, -1) for block in blocks)

    def residual(
        self, x: torch.Tensor | GatedHeads, residual: torch.Tensor, next_norm: nn.RMSNorm | None
    ) -> torch.Tensor | PreNormed:
        """``residual + x @ W^T`` (a one-linear group) in one decode GEMM, ``x``'s head norm and gate
        in its prologue for ``GatedHeads``; ready for ``next_norm`` (the next pre-norm) when one is
        given."""
        rows = residual.numel() // residual.shape[-1]
        next_weight = None if next_norm is None else next_norm.weight
        if isinstance(x, GatedHeads):
            inputs, gated = x.o, (x.gate.reshape(rows, -1), x.weight, x.eps)
        else:
            inputs, gated = x, (None, None, 0.0)
        y, scaled, sumsq = decode_linear_residual(
            inputs.reshape(rows, -1), self.weight, residual.reshape(rows, -1), next_weight, *gated, self.arrivals
        )
        y = y.view(residual.shape)
        return y if next_norm is None else PreNormed(y, scaled.view(residual.shape), sumsq, norm_eps(next_norm))

    def swiglu(self, x: PreNormed) -> torch.Tensor:
        """``silu(W1 RMSNorm(x)) * W3 RMSNorm(x)`` (the group of W1 and W3) in one decode GEMM."""
        rows = x.x.numel() // x.x.shape[-1]
        hidden = decode_swiglu(x.scaled.reshape(rows, -1), self.weight, x.sumsq, x.eps)
        return hidden.view(*x.x.shape[:-1], -1)


def project(x: torch.Tensor | PreNormed, linears: list[nn.Linear], group: LinearGroup | None) -> tuple[torch.Tensor, ...]:
    """Each linear applied to ``x``: one GEMM through ``group`` when the linears are fused."""
    return group(x) if group is not None else tuple(lin(x) for lin in linears)


def apply(x: torch.Tensor, linear: nn.Linear, group: LinearGroup | None) -> torch.Tensor:
    """``linear(x)``, through its one-linear ``group`` (the decode GEMM) once fused."""
    return group(x)[0] if group is not None else linear(x)
