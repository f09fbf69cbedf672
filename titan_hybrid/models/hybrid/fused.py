"""Inference: the bias-free linears that read the same input as one matrix, so a latency-bound
decode step runs one GEMM where it ran several.

``LinearGroup`` concatenates the weights once and makes each linear's weight a view of its
rows: no memory is added, names and state dicts stay as they are (``load_state_dict`` copies
into the views), and the math is unchanged. Build it after the model has its device and dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearGroup:
    def __init__(self, linears: list[nn.Linear]):
        if any(lin.bias is not None for lin in linears) or len({lin.in_features for lin in linears}) != 1:
            raise ValueError("a LinearGroup takes bias-free linears of one input width")
        self.weight = torch.cat([lin.weight.detach() for lin in linears])
        self.sizes = [lin.out_features for lin in linears]
        for lin, rows in zip(linears, self.weight.split(self.sizes)):
            lin.weight = nn.Parameter(rows, requires_grad=lin.weight.requires_grad)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight).split(self.sizes, dim=-1)


def project(x: torch.Tensor, linears: list[nn.Linear], group: LinearGroup | None) -> tuple[torch.Tensor, ...]:
    """Each linear applied to ``x``: one GEMM through ``group`` when the linears are fused."""
    return group(x) if group is not None else tuple(lin(x) for lin in linears)
