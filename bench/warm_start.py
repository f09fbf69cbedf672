"""Cold and warm warm-up of a config: launch to the end of step 1, with empty and with filled caches.

    python -m bench.warm_start CONFIG [--cache-dir DIR] [--label NAME] [--out FILE.jsonl] [-- OVERRIDES...]
    python -m bench.warm_start CONFIG --warm-only --cache-dir FILLED_DIR [--repeat N] [...]

Runs ``./run_train.sh CONFIG`` for one step twice with the same ``TITAN_HYBRID_CACHE_DIR``: first
empty (cold: fla's Triton autotuning, Inductor's compiles), then as the first run left it (warm:
what a restart costs). Each run's time to rank 0's step-1 metric line is split at TorchTitan's
"Training starts" line into start-up (imports, model, data loader) and step 1 (Dynamo tracing,
compiling, autotuning, the step itself; for compiled runs also the part of it spent waiting for the
first batch, marked by Dynamo's first trace under ``TORCH_LOGS=dynamo``). The cache variables that
run_train.sh derives from the folder (``TRITON_CACHE_DIR``, ``TORCHINDUCTOR_CACHE_DIR``, ...) are
dropped from the environment, so the cold run is cold. ``--cache-dir`` (kept; must be empty or
absent) defaults to a temporary folder that is removed afterwards. ``--warm-only`` times restarts
on a folder that earlier runs filled (``bench.train_throughput`` runs of the same config, say),
``--repeat`` times, with no cold run.
Appends one JSON line to ``--out``; each run's log is beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.train_throughput import environment, parse_with_overrides

ROOT = Path(__file__).resolve().parents[1]
STEP_1 = re.compile(r"(?<!validate )step:\s*1\s+loss:")
TRAINING_STARTS = re.compile(r"Training starts at step")
# Dynamo's first trace needs the first batch (its block mask or the first block's forward), so with
# TORCH_LOGS=dynamo (set, with recompiles, unless the caller sets TORCH_LOGS) it marks when the data
# loader delivered.
FIRST_TRACE = re.compile(r"torchdynamo start tracing")
# ops.fla_kernels' line: importing fla, which the first fla call of step 1 does.
IMPORTED_FLA = re.compile(r"imported fla in ([\d.]+) s")
# What run_train.sh sets from TITAN_HYBRID_CACHE_DIR; a value from the caller would win there.
CACHE_VARS = (
    "TRITON_CACHE_DIR",
    "TRITON_CACHE_AUTOTUNING",
    "TORCHINDUCTOR_CACHE_DIR",
    "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "TORCHINDUCTOR_AUTOGRAD_CACHE",
)


def timed_run(config: str, overrides: list[str], cache_dir: Path, log_path: Path) -> dict[str, float | dict]:
    """One step of training; seconds from the launch to "Training starts" and to the step-1 line (and
    the fla import's, which the log gives on CUDA)."""
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    env.update(TITAN_HYBRID_CACHE_DIR=str(cache_dir), LOG_RANK="0", PYTHON=env.get("PYTHON", sys.executable))
    env.setdefault("TORCH_LOGS", "dynamo,recompiles")  # recompiles: why a graph is compiled again
    marks: dict[str, float] = {}
    values: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="warm_start_dump_") as dump:
        # Plain metric lines: on a terminal-less GPU run TorchTitan colours them, which STEP_1 would miss.
        cmd = [str(ROOT / "run_train.sh"), config, "--job.dump_folder", dump, "--training.steps", "1",
               "--metrics.log_freq", "1", "--metrics.disable_color_printing", "--checkpoint.no-enable",
               *overrides]  # fmt: skip
        start = time.monotonic()
        with open(log_path, "w", buffering=1) as log, subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            for line in proc.stdout:
                log.write(line)
                for name, pattern in (("training_starts", TRAINING_STARTS), ("first_trace", FIRST_TRACE),
                                      ("step_1", STEP_1)):  # fmt: skip
                    if name not in marks and pattern.search(line):
                        marks[name] = time.monotonic() - start
                if (imported := IMPORTED_FLA.search(line)) and "fla_import_s" not in values:
                    values["fla_import_s"] = float(imported.group(1))
    if proc.returncode != 0 or "step_1" not in marks:
        sys.stdout.write(log_path.read_text()[-4000:])
        raise SystemExit(f"training exited with {proc.returncode} before step 1 ended; log: {log_path}")
    startup = marks.get("training_starts", float("nan"))
    run = {"warmup_s": round(marks["step_1"], 1), "startup_s": round(startup, 1),
           "step_1_s": round(marks["step_1"] - startup, 1), "cache_mib": cache_sizes(cache_dir)}  # fmt: skip
    if "first_trace" in marks:  # compiled runs: step 1 = waiting for the first batch + compiling and running
        run["first_batch_wait_s"] = round(marks["first_trace"] - startup, 1)
    return run | values


def cache_sizes(cache_dir: Path) -> dict[str, float]:
    """MiB per cache subfolder (triton, inductor): what a run added shows which cache it filled."""
    sizes = {}
    for sub in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        sizes[sub.name] = round(sum(f.stat().st_size for f in sub.rglob("*") if f.is_file()) / 2**20, 1)
    return sizes


def filled_cache_dir(path: Path | None) -> Path:
    """The folder a warm-only run restarts on: it must hold what an earlier run compiled."""
    if path is None or not path.is_dir() or not any(path.iterdir()):
        raise SystemExit(f"--warm-only needs --cache-dir naming a folder that earlier runs filled (got {path})")
    return path.resolve()


def empty_cache_dir(path: Path | None) -> Path:
    """The given folder (absent or empty, else the cold run would not be cold), or a temporary one."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix="titan_hybrid_cache_"))
    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"--cache-dir {path} is not empty: the first run must start cold")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--cache-dir", type=Path, default=None, help="kept after the runs (default: a temp folder)")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "warm_start.jsonl")
    parser.add_argument("--warm-only", action="store_true", help="restart on --cache-dir as earlier runs left it")
    parser.add_argument("--repeat", type=int, default=1, help="warm runs with --warm-only")
    args, overrides = parse_with_overrides(parser, argv)

    label = args.label or Path(args.config).stem
    if args.warm_only:
        cache_dir, kinds = filled_cache_dir(args.cache_dir), [f"warm{i + 1}" for i in range(args.repeat)]
    else:
        cache_dir, kinds = empty_cache_dir(args.cache_dir), ["cold", "warm"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        runs = {kind: timed_run(args.config, overrides, cache_dir, args.out.parent / f"{label}_{kind}.log")
                for kind in kinds}  # fmt: skip
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    result = {"label": label, "config": args.config, "overrides": overrides, **runs, **environment(),
              "ngpu": int(os.environ.get("NGPU", "0")) or None}  # fmt: skip
    for kind, run in runs.items():
        wait = f", {run['first_batch_wait_s']:.1f} s of it until the first batch" if "first_batch_wait_s" in run else ""
        wait += f", {run['fla_import_s']:.1f} s importing fla" if "fla_import_s" in run else ""
        print(f"{label} {kind}: step 1 ends {run['warmup_s']:.1f} s after launch (start-up {run['startup_s']:.1f} s, "
              f"step 1 {run['step_1_s']:.1f} s{wait}); cache MiB {run['cache_mib']}")  # fmt: skip
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
