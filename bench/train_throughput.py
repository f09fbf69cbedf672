"""Training throughput of a TOML config on the GPUs present, through run_train.sh.

    python -m bench.train_throughput CONFIG [--steps N] [--label NAME] [--out FILE.jsonl] [-- OVERRIDES...]

Runs N steps (no checkpoints), reads TorchTitan's per-step metric lines and prints,
per GPU: tokens/s and MFU (means over the steps after ``--skip``), peak reserved
memory, and the warm-up (launch to the end of step 1: start-up, torch.compile and
Triton autotuning, which run_train.sh's ``TITAN_HYBRID_CACHE_DIR`` keeps for the next start;
``bench.warm_start`` times a cold and a warm start). MFU is TorchTitan's:
FLOPs per token from ``HybridModelArgs.get_nparams_and_flops`` (6·N plus the
attention and linear-attention terms) over the GPU's named dense bf16 peak
(``torchtitan.tools.utils.get_peak_flops``, 989 TFLOP/s for H100 SXM and H200).
Appends one JSON line per run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRIC_LINE = re.compile(
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>[-\d.naninf]+).*?memory:\s*(?P<mem>[\d.]+)GiB.*?"
    r"tps:\s*(?P<tps>[\d,]+).*?tflops:\s*(?P<tflops>[\d,.]+).*?mfu:\s*(?P<mfu>[\d.]+)%"
)


def environment() -> dict[str, str]:
    import torch

    versions = {"torch": torch.__version__, "device": "cpu", "gpus": 0}
    if torch.cuda.is_available():
        versions.update(device=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
    for name in ("triton", "fla", "torchtitan"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "absent"
    return versions


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The bench's own arguments, and what follows ``--``: TorchTitan overrides for run_train.sh."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def run(config: str, steps: int, overrides: list[str], log_path: Path) -> tuple[list[dict], float, int]:
    """Run training; returns the parsed metric lines, seconds to the first one, and the exit code."""
    cmd = [str(ROOT / "run_train.sh"), config, "--training.steps", str(steps), "--metrics.log_freq", "1",
           "--checkpoint.no-enable", "--metrics.disable_color_printing", *overrides]  # fmt: skip
    start, first_step_at, metrics = time.monotonic(), None, []
    with open(log_path, "w", buffering=1) as log, subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            match = METRIC_LINE.search(line)
            if match:
                first_step_at = first_step_at or time.monotonic()
                metrics.append(
                    {
                        "step": int(match["step"]),
                        "loss": float(match["loss"]),
                        "mem_gib": float(match["mem"]),
                        "tps": float(match["tps"].replace(",", "")),
                        "mfu": float(match["mfu"]),
                    }
                )
    warmup = (first_step_at - start) if first_step_at else float("nan")
    return metrics, warmup, proc.returncode


def summarise(metrics: list[dict], skip: int, exclude: set[int]) -> dict[str, float]:
    timed = [m for m in metrics if m["step"] > skip and m["step"] not in exclude]
    if not timed:
        raise SystemExit(f"no metric lines after step {skip}; see the log")
    return {
        "tokens_per_s_per_gpu": statistics.mean(m["tps"] for m in timed),
        "tokens_per_s_min": min(m["tps"] for m in timed),
        "tokens_per_s_max": max(m["tps"] for m in timed),
        "mfu_pct": statistics.mean(m["mfu"] for m in timed),
        "peak_reserved_gib": max(m["mem_gib"] for m in metrics),
        "loss_first": metrics[0]["loss"],
        "loss_last": metrics[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="steps left out of the means (warm-up)")
    parser.add_argument("--exclude", type=int, nargs="*", default=[], help="more steps left out (e.g. profiled)")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line here")
    parser.add_argument("--log", type=Path, default=None, help="training log (default: next to --out)")
    args, overrides = parse_with_overrides(parser, argv)

    label = args.label or Path(args.config).stem
    log_path = args.log or (args.out.parent if args.out else Path(".")) / f"{label}.log"
    metrics, warmup, code = run(args.config, args.steps, overrides, log_path)
    if code != 0:
        sys.stdout.write(log_path.read_text()[-4000:])
        raise SystemExit(f"training exited with {code}; log: {log_path}")
    result = {
        "label": label,
        "config": args.config,
        "overrides": overrides,
        "steps": args.steps,
        "skip": args.skip,
        "warmup_s": round(warmup, 1),
        "excluded_steps": args.exclude,
        **{k: round(v, 3) for k, v in summarise(metrics, args.skip, set(args.exclude)).items()},
        **environment(),
        "ngpu": int(os.environ.get("NGPU", "0")) or None,
    }
    print(
        f"{label}: {result['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU "
        f"({result['tokens_per_s_min']:,.0f}-{result['tokens_per_s_max']:,.0f}), MFU {result['mfu_pct']:.1f}%, "
        f"peak {result['peak_reserved_gib']:.2f} GiB, warm-up {result['warmup_s']:.0f} s, "
        f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f} on {result['gpus']}x {result['device']}"
    )
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
