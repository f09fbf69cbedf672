"""Where a training step's GPU time goes, from a TorchTitan profiler trace.

    python -m bench.kernel_profile DUMP/profile_traces/iteration_N/rank0_trace.json [--top 25]

Prints (1) how busy the GPU was between the step's first and last kernel, (2) the
device time per kernel family and per kernel name, and (3) the longest idle gaps with the kernels around
them: a GPU that waits on the host (launch overhead, the data loader, a sync) shows
up as gaps, not as slow kernels; all gaps by length, and the shorter ones (up to 100 us, and
100 us to 1 ms) by the family of the kernel that ends them (many such gaps before one family: the
host launches it slower than the GPU runs what came before); (4) the host syncs: the CPU ops that wait for the GPU (``.item()``,
``nonzero``, a copy to pageable host memory), how often each ran and inside which ops (a custom op,
a compiled graph's backward, the optimizer), and how long the host waited in
CUDA's synchronising calls. Each sync drains the GPU's queue, so what the host does next shows as
idle GPU time. Run it on a step that is not the first profiled one.
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    name: str
    start_us: float
    dur_us: float

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us


def read_events(trace_path: str) -> list[dict]:
    """The trace's events; a file that is no profiler trace is refused naming it."""
    try:
        with open(trace_path) as f:
            return json.load(f)["traceEvents"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"{trace_path}: not a torch.profiler trace (a JSON object with 'traceEvents'): {e!r}") from e


def read_kernels(events: list[dict]) -> list[Kernel]:
    kernels = [
        Kernel(e["name"], float(e["ts"]), float(e["dur"]))
        for e in events
        if e.get("cat") == "kernel" and e.get("ph") == "X"
    ]
    return sorted(kernels, key=lambda k: k.start_us)


# Kernel families, first match wins: where a step's kernel time goes at a glance.
FAMILIES = [
    ("GEMM (cuBLAS / CUTLASS)", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
    ("fla linear attention", ("chunk_", "recompute_w_u", "fused_recurrent", "solve_tril")),
    ("softmax attention (SDPA)", ("sdpa", "flash", "fmha", "attention")),
    ("optimizer and grad clipping", ("multi_tensor", "adam", "lpnorm", "norm_kernel")),
    ("Inductor fused kernels", ("triton_",)),
]


def family(name: str) -> str:
    lowered = name.lower()
    return next((f for f, keys in FAMILIES if any(key in lowered for key in keys)), "other (eager ATen)")


def busy_time_us(kernels: list[Kernel]) -> float:
    """Union of the kernels' intervals (overlapping streams count once)."""
    busy, end = 0.0, float("-inf")
    for k in kernels:
        if k.end_us > end:
            busy += k.end_us - max(k.start_us, end)
            end = k.end_us
    return busy


def gaps(kernels: list[Kernel]) -> list[tuple[float, Kernel, Kernel]]:
    """Every idle interval (us) with the kernel before it and the one that ends it, longest first."""
    found, end, last = [], kernels[0].end_us, kernels[0]
    for k in kernels[1:]:
        if k.start_us > end:
            found.append((k.start_us - end, last, k))
        if k.end_us > end:
            end, last = k.end_us, k
    return sorted(found, key=lambda g: -g[0])


# Upper bounds (us) of the gap-length buckets: launch latency, host launch overhead, a sync's
# drain and refill, longer host work.
GAP_BUCKETS_US = (5.0, 20.0, 100.0, 1000.0, float("inf"))


def gap_histogram(found: list[tuple[float, Kernel, Kernel]]) -> list[tuple[float, int, float]]:
    """``(upper bound us, gaps, idle us)`` per ``GAP_BUCKETS_US`` bucket."""
    rows = [[bound, 0, 0.0] for bound in GAP_BUCKETS_US]
    for gap, _, _ in found:
        row = next(r for r in rows if gap <= r[0])
        row[1] += 1
        row[2] += gap
    return [tuple(r) for r in rows]


def gaps_by_family(found: list[tuple[float, Kernel, Kernel]], above_us: float, up_to_us: float) -> dict[str, list[float]]:
    """Gaps longer than ``above_us`` and at most ``up_to_us``: ``[count, idle us]`` per family of the
    kernel ending them."""
    by_family: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for gap, _, after in found:
        if above_us < gap <= up_to_us:
            by_family[family(after.name)][0] += 1
            by_family[family(after.name)][1] += gap
    return dict(by_family)


# CPU ops that read a GPU value on the host, and the CUDA runtime calls in which the host waits.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::repeat_interleave", "aten::to", "aten::copy_")
WAITING_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def host_syncs(events: list[dict]) -> tuple[dict[tuple[str, str], int], dict[str, list[float]]]:
    """Calls of each ``SYNC_OPS`` op that contain a waiting runtime call (counted once per op call),
    by op and by where it ran (``sync_site``), and per waiting call its count and total duration (us)."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    waits = sorted(
        (e for e in complete if e["name"] in WAITING_CALLS), key=lambda e: float(e["ts"])
    )
    waited: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in waits:
        waited[e["name"]][0] += 1
        waited[e["name"]][1] += float(e["dur"])
    starts = [float(e["ts"]) for e in waits]
    cpu_ops = [e for e in complete if e.get("cat") == "cpu_op"]
    ops: dict[tuple[str, str], int] = defaultdict(int)
    for e in cpu_ops:
        if e["name"] in SYNC_OPS:
            begin, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
            i = bisect.bisect_left(starts, begin)
            if i < len(starts) and starts[i] <= end:
                ops[(e["name"], sync_site(e, cpu_ops))] += 1
    return dict(ops), dict(waited)


def sync_site(op: dict, cpu_ops: list[dict], depth: int = 3) -> str:
    """The CPU ops enclosing ``op`` on its thread, outermost first (at most ``depth``): which part of
    the step (a custom op, a compiled graph, an optimizer) a sync came from."""
    begin, end = float(op["ts"]), float(op["ts"]) + float(op["dur"])
    enclosing = [
        e for e in cpu_ops
        if e is not op and e.get("tid") == op.get("tid") and float(e["ts"]) <= begin and float(e["ts"]) + float(e["dur"]) >= end
    ]  # fmt: skip
    enclosing.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
    return " > ".join(e["name"] for e in enclosing[:depth]) or "(top level)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    events = read_events(args.trace)
    kernels = read_kernels(events)
    span = kernels[-1].end_us - kernels[0].start_us
    busy = busy_time_us(kernels)
    print(f"{len(kernels):,} kernels; span {span / 1e3:,.1f} ms, GPU busy {busy / 1e3:,.1f} ms ({100 * busy / span:.1f}%)")

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for k in kernels:
        totals[k.name][0] += k.dur_us
        totals[k.name][1] += 1
    kernel_total = sum(us for us, _ in totals.values())
    by_family: dict[str, float] = defaultdict(float)
    for name, (us, _) in totals.items():
        by_family[family(name)] += us
    print(f"\n{'ms':>9} {'share':>6}  family")
    for name, us in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"{us / 1e3:9.1f} {100 * us / kernel_total:5.1f}%  {name}")
    print(f"\n{'ms':>9} {'share':>6} {'calls':>6}  kernel")
    for name, (us, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{us / 1e3:9.1f} {100 * us / kernel_total:5.1f}% {int(calls):6d}  {name[:110]}")

    idle, found = span - busy, gaps(kernels)
    print(f"\nidle {idle / 1e3:,.1f} ms; longest gaps:")
    for gap, before, after in found[: args.top]:
        print(f"{gap / 1e3:9.2f} ms  after {before.name[:50]}  before {after.name[:50]}")
    print(f"\n{'gaps':>9} {'idle ms':>8}  gap length")
    lower = 0.0
    for bound, count, us in gap_histogram(found):
        print(f"{count:9,d} {us / 1e3:8.1f}  {lower:g}-{bound:g} us")
        lower = bound
    for above, up_to in ((0.0, 100.0), (100.0, 1000.0)):
        print(f"\n{'gaps':>9} {'idle ms':>8}  gaps of {above:g}-{up_to:g} us, by the family of the kernel after them")
        for name, (count, us) in sorted(gaps_by_family(found, above, up_to).items(), key=lambda kv: -kv[1][1]):
            print(f"{int(count):9,d} {us / 1e3:8.1f}  {name}")

    ops, waited = host_syncs(events)
    print("\nhost syncs (CPU ops that waited on the GPU, and the waiting runtime calls):")
    for (name, site), calls in sorted(ops.items(), key=lambda kv: -kv[1]):
        print(f"{calls:9d}  {name}  in {site[:160]}")
    for name, (calls, us) in sorted(waited.items(), key=lambda kv: -kv[1][1]):
        print(f"{int(calls):9d}  {name}: {us / 1e3:,.1f} ms waited")


if __name__ == "__main__":
    main()
