"""Where a training step's GPU time goes, from a TorchTitan profiler trace.

    python -m bench.kernel_profile DUMP/profile_traces/iteration_N/rank0_trace.json [--top 25]

Prints (1) how busy the GPU was between the step's first and last kernel, (2) the
device time per kernel family and per kernel name, and (3) the longest idle gaps with the kernels around
them: a GPU that waits on the host (launch overhead, the data loader, a sync) shows
up as gaps, not as slow kernels. Run it on a step that is not the first profiled one.
"""

from __future__ import annotations

import argparse
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


def read_kernels(trace_path: str) -> list[Kernel]:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
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


def gaps(kernels: list[Kernel], top: int) -> list[tuple[float, Kernel, Kernel]]:
    found, end, last = [], kernels[0].end_us, kernels[0]
    for k in kernels[1:]:
        if k.start_us > end:
            found.append((k.start_us - end, last, k))
        if k.end_us > end:
            end, last = k.end_us, k
    return sorted(found, key=lambda g: -g[0])[:top]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    kernels = read_kernels(args.trace)
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

    idle = span - busy
    print(f"\nidle {idle / 1e3:,.1f} ms; longest gaps:")
    for gap, before, after in gaps(kernels, args.top):
        print(f"{gap / 1e3:9.2f} ms  after {before.name[:50]}  before {after.name[:50]}")


if __name__ == "__main__":
    main()
