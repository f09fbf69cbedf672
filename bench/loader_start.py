"""Seconds from building a rank's [hybrid_data] loader to its first batch, each time in a fresh process.

    HF_DATASETS_OFFLINE=1 python -m bench.loader_start CONFIG [--repeat N] [--out FILE.jsonl] [-- OVERRIDES...]

What a restart waits for before its first forward, whatever its compile caches hold: with
``[hybrid_data] loader = "process"`` the loader process's spawn and imports, building the streams and
filling their shuffle buffers. The clock starts after the trainer's own imports and the tokenizer,
as TorchTitan builds the loader (``build_hybrid_dataloader``: rank 0 of 1), and stops at the first
batch. Appends one JSON line per run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.train_throughput import environment, parse_with_overrides

ROOT = Path(__file__).resolve().parents[1]


def first_batch(config: str, overrides: list[str]) -> dict[str, float]:
    """In this process: seconds to build the loader, then to its first batch."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.config import ConfigManager

    from data_pipelines.dataloader import build_hybrid_dataloader

    job_config = ConfigManager().parse_args(["--job.config_file", config, *overrides])
    tokenizer = HuggingFaceTokenizer(job_config.model.hf_assets_path)
    start = time.perf_counter()
    loader = build_hybrid_dataloader(1, 0, tokenizer, job_config)
    built = time.perf_counter()
    next(iter(loader))
    done = time.perf_counter()
    return {"build_s": round(built - start, 2), "first_batch_s": round(done - start, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # one run, JSON on stdout
    args, overrides = parse_with_overrides(parser, argv)

    if args.in_process:
        print(json.dumps(first_batch(args.config, overrides)))
        return
    command = [sys.executable, "-m", "bench.loader_start", args.config, "--in-process", "--", *overrides]
    versions = environment() if args.out else {}
    for run in range(1, args.repeat + 1):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stdout.write(done.stdout + done.stderr[-4000:])
            raise SystemExit(f"run {run} failed with exit code {done.returncode}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"run {run}: loader built in {result['build_s']:.2f} s, first batch {result['first_batch_s']:.2f} s "
              f"after the build started")  # fmt: skip
        if args.out:
            line = {"label": args.label or Path(args.config).stem, "config": args.config, "overrides": overrides,
                    "run": run, **result, **versions}  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
