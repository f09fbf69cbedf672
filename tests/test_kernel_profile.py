"""bench.kernel_profile on a synthetic trace: busy time, gaps and their buckets."""

import json

from bench import kernel_profile
from bench.kernel_profile import Kernel, busy_time_us, gap_histogram, gaps, gaps_by_family


def kernels() -> list[Kernel]:
    # A GEMM, 3 us idle, an fla kernel, 50 us idle, an Inductor kernel overlapping a second
    # stream's kernel, 2,000 us idle, a GEMM.
    return [
        Kernel("nvjet_sm90_tst_256x128", 0.0, 10.0),
        Kernel("chunk_gla_fwd_kernel_o", 13.0, 7.0),
        Kernel("triton_poi_fused_add", 70.0, 20.0),
        Kernel("triton_red_fused_sum", 80.0, 20.0),
        Kernel("nvjet_sm90_tst_128x128", 2100.0, 10.0),
    ]


def test_gaps_are_the_idle_intervals_between_overlapping_streams():
    found = gaps(kernels())
    assert [(gap, after.name) for gap, _, after in found] == [
        (2000.0, "nvjet_sm90_tst_128x128"),
        (50.0, "triton_poi_fused_add"),
        (3.0, "chunk_gla_fwd_kernel_o"),
    ]
    assert busy_time_us(kernels()) == 2110.0 - 2053.0


def test_gap_histogram_and_gaps_by_family():
    found = gaps(kernels())
    assert gap_histogram(found) == [(5.0, 1, 3.0), (20.0, 0, 0.0), (100.0, 1, 50.0), (1000.0, 0, 0.0),
                                    (float("inf"), 1, 2000.0)]  # fmt: skip
    assert gaps_by_family(found, 0, 100) == {"fla linear attention": [1, 3.0], "Inductor fused kernels": [1, 50.0]}
    assert gaps_by_family(found, 5, 10_000) == {"Inductor fused kernels": [1, 50.0], "GEMM (cuBLAS / CUTLASS)": [1, 2000.0]}


def test_main_prints_the_gap_buckets(tmp_path, capsys):
    events = [{"cat": "kernel", "ph": "X", "name": k.name, "ts": k.start_us, "dur": k.dur_us} for k in kernels()]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    kernel_profile.main([str(trace)])
    out = capsys.readouterr().out
    assert "5 kernels; span 2.1 ms, GPU busy 0.1 ms (2.7%)" in out
    assert "        1      2.0  1000-inf us" in out
    assert "        1      0.1  Inductor fused kernels" in out


def test_a_file_that_is_no_trace_is_refused_by_name(tmp_path):
    import pytest

    bad = tmp_path / "trace.json"
    bad.write_text('{"events": []}')
    with pytest.raises(SystemExit, match=r"trace.json: not a torch.profiler trace .*'traceEvents'"):
        kernel_profile.main([str(bad)])


def test_host_syncs_say_where_they_ran():
    """A sync op counts when a waiting runtime call runs inside it, by where it ran (its enclosing ops)."""
    from bench.kernel_profile import host_syncs

    def op(name, ts, dur, cat="cpu_op", tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}

    events = [
        op("titan_hybrid::fla_chunk_gla", 0, 100),
        op("aten::repeat_interleave", 10, 20),
        op("cudaStreamSynchronize", 12, 15, cat="cuda_runtime"),
        op("aten::repeat_interleave", 50, 5),  # no wait inside: not a sync
        op("aten::_local_scalar_dense", 200, 10, tid=2),
        op("cudaStreamSynchronize", 201, 8, cat="cuda_runtime", tid=2),
    ]
    ops, waited = host_syncs(events)
    assert ops == {("aten::repeat_interleave", "titan_hybrid::fla_chunk_gla"): 1,
                   ("aten::_local_scalar_dense", "(top level)"): 1}  # fmt: skip
    assert waited == {"cudaStreamSynchronize": [2, 23.0]}

