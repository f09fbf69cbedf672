"""Inference: the bias-free linears that read the same input as one matrix, so a latency-bound
decode step runs one GEMM where it ran several, through ``ops.decode_linear`` (a GEMM tiled for
a decode step's few rows, each linear's output a contiguous block).

``LinearGroup`` concatenates the weights once and makes each linear's weight a view of its
rows: no memory is added, names and state dicts stay as they are (``load_state_dict`` copies
into the views), and the math is unchanged. Build it after the model has its device and dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titan_hybrid.ops.decode_linear import MAX_ROWS, decode_linear, segment_bounds, split_segments


class LinearGroup:
    """``extra``: more rows after the linears' (a matrix derived from other weights, e.g. a low-rank
    pair multiplied out); its output comes last. Derived rows do not follow a later
    ``load_state_dict``: fuse after loading. One linear makes a group too: its decode GEMM."""

    def __init__(self, linears: list[nn.Linear], extra: torch.Tensor | None = None):
        if any(lin.bias is not None for lin in linears) or len({lin.in_features for lin in linears}) != 1:
            raise ValueError("a LinearGroup takes bias-free linears of one input width")
        blocks = [lin.weight.detach() for lin in linears] + ([extra.to(linears[0].weight.dtype)] if extra is not None else [])
        self.weight = torch.cat(blocks)
        self.sizes = [block.shape[0] for block in blocks]
        self.bounds = segment_bounds(self.sizes, self.weight.device)
        for lin, rows in zip(linears, self.weight.split(self.sizes)):
            lin.weight = nn.Parameter(rows, requires_grad=lin.weight.requires_grad)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each linear's output; a decode step's (at most ``MAX_ROWS`` rows) each contiguous."""
        lead, width = x.shape[:-1], x.shape[-1]
        rows = x.numel() // width
        if rows > MAX_ROWS:
            return F.linear(x, self.weight).split(self.sizes, dim=-1)
        flat = decode_linear(x.reshape(rows, width), self.weight, self.bounds, self.sizes)
        return tuple(block.view(*lead, -1) for block in split_segments(flat, rows, self.sizes))


def project(x: torch.Tensor, linears: list[nn.Linear], group: LinearGroup | None) -> tuple[torch.Tensor, ...]:
    """Each linear applied to ``x``: one GEMM through ``group`` when the linears are fused."""
    return group(x) if group is not None else tuple(lin(x) for lin in linears)


def apply(x: torch.Tensor, linear: nn.Linear, group: LinearGroup | None) -> torch.Tensor:
    """``linear(x)``, through its one-linear ``group`` (the decode GEMM) once fused."""
    return group(x)[0] if group is not None else linear(x)
