"""ops.decode_linear: the decode GEMMs' outputs and custom ops (the PyTorch paths; the Triton kernels
are checked against these on the GPU by bench.decode_linear and bench.mixer_parity, and under
TRITON_INTERPRET by ``check_kernels``)."""

import torch
import torch.nn.functional as F
from torch import nn

from titan_hybrid.models.hybrid.fused import LinearGroup
from titan_hybrid.ops.decode_linear import (
    SUMSQ_BLOCK,
    GatedHeads,
    PreNormed,
    decode_linear,
    decode_linear_residual,
    decode_swiglu,
    segment_bounds,
    split_segments,
)


def _normed_stream(rows: int = 5, dim: int = 40) -> tuple[PreNormed, nn.RMSNorm]:
    norm = nn.RMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return PreNormed.of(torch.randn(rows, 1, dim), norm), norm


def test_segments_are_contiguous_column_blocks_of_the_product():
    x, weight = torch.randn(5, 24), torch.randn(40, 24)
    widths = [8, 24, 8]
    flat, log_decay = decode_linear(x, weight, segment_bounds(widths, x.device), widths)
    assert flat.shape == (5 * 40,) and log_decay.numel() == 0
    blocks = split_segments(flat, 5, widths)
    assert all(block.is_contiguous() for block in blocks)
    for block, expected in zip(blocks, F.linear(x, weight).split(widths, dim=-1)):
        torch.testing.assert_close(block, expected)
    assert segment_bounds(widths, x.device).tolist() == [0, 8, 32]


def test_decay_segment_comes_back_activated_in_fp32():
    x, weight, bias = torch.randn(3, 16).bfloat16(), torch.randn(20, 16).bfloat16(), torch.randn(8).bfloat16()
    widths = [4, 8, 8]
    flat, log_decay = decode_linear(x, weight, segment_bounds(widths, x.device), widths, decay_bias=bias, decay_scale=0.25)
    y = F.linear(x, weight)
    assert flat.shape == (3 * 12,) and log_decay.dtype == torch.float32 and log_decay.shape == (3, 8)
    torch.testing.assert_close(log_decay, F.logsigmoid(y[:, 12:].float() + bias) * 0.25)
    assert (log_decay <= 0).all()


def test_pre_normed_stream_gives_the_products_of_the_rms_norm():
    torch.manual_seed(0)  # the other tests' draws (xdist's order) must not pick the values
    stream, norm = _normed_stream()
    weight = torch.randn(24, 40)
    normed = norm(stream.x).reshape(5, 40)
    flat, _ = decode_linear(stream.scaled.reshape(5, 40), weight, segment_bounds([24], "cpu"), [24], stream.sumsq, stream.eps)
    torch.testing.assert_close(flat.view(5, 24), F.linear(normed, weight))
    w13 = torch.randn(2 * 12, 40)
    a, b = F.linear(normed, w13).chunk(2, dim=-1)
    # rstd * ((x * g) @ W) against (x * rstd * g) @ W: fp32 rounds them apart by a few ulps, which
    # silu(a) * b multiplies (once 2.1e-5 at 3.8: 5.6e-6 relative, over the default 1.3e-6).
    swiglu = decode_swiglu(stream.scaled.reshape(5, 40), w13, stream.sumsq, stream.eps)
    torch.testing.assert_close(swiglu, F.silu(a) * b, rtol=1e-5, atol=1e-5)


def test_residual_output_is_the_next_norms_pre_normed_stream():
    """The residual GEMM's ``scaled`` and ``sumsq`` (per 16-column block) are ``PreNormed.of`` its output."""
    _, next_norm = _normed_stream(dim=40)
    x, weight, residual = torch.randn(5, 24), torch.randn(40, 24), torch.randn(5, 40)
    y, scaled, sumsq = decode_linear_residual(x, weight, residual, next_norm.weight)
    torch.testing.assert_close(y, residual + F.linear(x, weight))
    expected = PreNormed.of(y.view(5, 1, 40), next_norm)
    assert sumsq.shape == (-(-40 // SUMSQ_BLOCK), 5)
    torch.testing.assert_close(scaled.view(5, 1, 40), expected.scaled)
    torch.testing.assert_close(sumsq.sum(0, keepdim=True), expected.sumsq)
    y_only, scaled, sumsq = decode_linear_residual(x, weight, residual)
    torch.testing.assert_close(y_only, y)
    assert scaled.numel() == sumsq.numel() == 0


def test_gated_heads_residual_is_the_norm_gate_then_the_projection():
    """``GatedHeads`` through the output projection's residual GEMM: ``RMSNorm(o) * silu(gate)`` per
    head (GLA's output), projected and added, as the unfused step computes it."""
    rows, heads, head_dim = 3, 4, 8
    o, gate = torch.randn(rows, 1, heads, head_dim), torch.randn(rows, 1, heads, head_dim)
    head_norm = nn.RMSNorm(head_dim, eps=1e-5)
    with torch.no_grad():
        head_norm.weight.uniform_(0.5, 1.5)
    o_proj, residual = nn.Linear(heads * head_dim, 40, bias=False), torch.randn(rows, 1, 40)
    expected = residual + o_proj((head_norm(o) * F.silu(gate)).reshape(rows, 1, -1))
    got = LinearGroup([o_proj]).residual(GatedHeads(o, gate, head_norm.weight, 1e-5), residual, None)
    torch.testing.assert_close(got, expected)


def test_decode_ops_pass_opcheck():
    widths = [4, 12]
    x, weight, bounds = torch.randn(3, 8), torch.randn(16, 8), segment_bounds(widths, "cpu")
    sumsq = torch.rand(2, 3) + 0.5
    torch.library.opcheck(decode_linear, (x, weight, bounds, widths))
    torch.library.opcheck(decode_linear, (x, weight, bounds, widths, sumsq, 1e-5, torch.randn(12), 0.5))
    torch.library.opcheck(decode_linear_residual, (x, weight, torch.randn(3, 16), torch.rand(16)))
    torch.library.opcheck(decode_linear_residual, (x, weight, torch.randn(3, 16)))
    gated = (torch.randn(3, 8), torch.rand(4) + 0.5, 1e-5, torch.zeros(1, dtype=torch.int32))
    torch.library.opcheck(decode_linear_residual, (x, weight, torch.randn(3, 16), torch.rand(16), *gated))
    torch.library.opcheck(decode_swiglu, (x, weight, sumsq, 1e-5))


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


def test_bench_tiling_variants_override_only_the_named_shapes_and_restore(monkeypatch):
    """``bench.decode --tilings``: a variant reaches the launches of 16-bit inputs for the shapes it
    names (a residual GEMM without split-K counters stays unsplit); fp32 inputs and other shapes keep
    the tilings the ops pass; the launches are restored afterwards."""
    from bench.decode import tilings
    from titan_hybrid.ops import decode_linear as ops

    launched = []
    for name in ("launch_decode_linear", "launch_decode_swiglu", "launch_decode_residual"):
        monkeypatch.setattr(ops, name, lambda x, weight, *args, _name=name, **tiling: launched.append((_name, tiling)))
    recorders = ops.launch_decode_linear, ops.launch_decode_swiglu, ops.launch_decode_residual
    whole_k = {"block_n": 16, "block_k": 1024, "num_warps": 4, "num_stages": 1}
    split = {"block_k": 512, "num_warps": 4, "num_stages": 1, "split_k": 4}
    bf16, fp32 = torch.zeros(16, 1024, dtype=torch.bfloat16), torch.zeros(16, 1024)
    w5120, w1024, w2048 = torch.zeros(5120, 1024), torch.zeros(1024, 1024), torch.zeros(1024, 2048)
    x2048 = torch.zeros(16, 2048, dtype=torch.bfloat16)
    counters = torch.zeros(64, dtype=torch.int32)
    with tilings({"linear": {"5120": whole_k}, "residual": {"2048": split}}):
        ops.launch_decode_linear(bf16, w5120, None, **ops.decode_tiling(5120))
        ops.launch_decode_linear(fp32, w5120, None, **ops.decode_tiling(5120))
        ops.launch_decode_swiglu(bf16, torch.zeros(4096, 1024), None, 0.0, **ops.decode_tiling(4096))
        ops.launch_decode_residual(x2048, w2048, None, None, None, counters, **ops.residual_tiling(2048, False))
        ops.launch_decode_residual(x2048, w2048, None, None, None, None, **ops.residual_tiling(2048, False))
        ops.launch_decode_residual(bf16, w1024, None, None, None, None, **ops.residual_tiling(1024, False))
    assert launched == [
        ("launch_decode_linear", whole_k),
        ("launch_decode_linear", ops.decode_tiling(5120)),
        ("launch_decode_swiglu", ops.decode_tiling(4096)),
        ("launch_decode_residual", split),
        ("launch_decode_residual", {**split, "split_k": 1}),
        ("launch_decode_residual", ops.residual_tiling(1024, False)),
    ]
    assert (ops.launch_decode_linear, ops.launch_decode_swiglu, ops.launch_decode_residual) == recorders
    assert whole_k != ops.decode_tiling(5120) and split != ops.residual_tiling(2048, False)

