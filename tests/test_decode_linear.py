"""ops.decode_linear: the decode GEMM's segmented output and its custom op (the PyTorch path; the
Triton kernel is checked against F.linear on the GPU by bench.decode_linear and bench.mixer_parity)."""

import torch
import torch.nn.functional as F
from torch import nn

from titan_hybrid.models.hybrid.fused import LinearGroup
from titan_hybrid.ops.decode_linear import decode_linear, segment_bounds, split_segments


def test_segments_are_contiguous_column_blocks_of_the_product():
    x, weight = torch.randn(5, 24), torch.randn(40, 24)
    widths = [8, 24, 8]
    flat = decode_linear(x, weight, segment_bounds(widths, x.device), widths)
    assert flat.shape == (5 * 40,)
    blocks = split_segments(flat, 5, widths)
    assert all(block.is_contiguous() for block in blocks)
    for block, expected in zip(blocks, F.linear(x, weight).split(widths, dim=-1)):
        torch.testing.assert_close(block, expected)
    assert segment_bounds(widths, x.device).tolist() == [0, 8, 32]


def test_decode_linear_passes_opcheck():
    widths = [4, 12]
    torch.library.opcheck(decode_linear, (torch.randn(3, 8), torch.randn(16, 8), segment_bounds(widths, "cpu"), widths))


def test_linear_group_decode_rows_match_the_unfused_linears():
    """At most 16 rows take the decode GEMM (contiguous outputs), more take one F.linear: same values."""
    linears = [nn.Linear(32, n, bias=False) for n in (16, 48)]
    inputs = [torch.randn(4, 1, 32), torch.randn(3, 7, 32)]
    expected = [[lin(x) for lin in linears] for x in inputs]
    group = LinearGroup(linears)
    for x, want in zip(inputs, expected):
        got = group(x)
        assert [t.shape for t in got] == [t.shape for t in want]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert all(t.is_contiguous() for t in group(inputs[0]))
