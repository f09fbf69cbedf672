"""GPU time per kernel family from a TorchTitan profiler trace (``[profiling] enable_profiling``).

    python -m bench.kernel_profile DUMP/profile_traces/iteration_N/rank0_trace.json [--top 25]

Sums the device time of every CUDA kernel in the trace (one profiled step, all its
micro-batches) by kernel name, and prints the share of each: where a step's time goes,
to decide which speed work can pay off.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def kernel_times(trace_path: str) -> dict[str, tuple[float, int]]:
    """``{kernel name: (total microseconds, calls)}``."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.get("cat") == "kernel" and event.get("ph") == "X":
            entry = totals[event["name"]]
            entry[0] += event["dur"]
            entry[1] += 1
    return {name: (us, int(calls)) for name, (us, calls) in totals.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    times = kernel_times(args.trace)
    total = sum(us for us, _ in times.values())
    print(f"{total / 1e3:,.1f} ms of kernel time in {sum(c for _, c in times.values()):,} launches")
    print(f"{'ms':>9} {'share':>6} {'calls':>6}  kernel")
    for name, (us, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{us / 1e3:9.1f} {100 * us / total:5.1f}% {calls:6d}  {name[:110]}")


if __name__ == "__main__":
    main()
