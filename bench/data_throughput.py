"""Data-loader throughput on the CPU: packed tokens/s of one rank's [hybrid_data] loader.

    OMP_NUM_THREADS=1 HF_DATASETS_OFFLINE=1 python bench/data_throughput.py \
        --config train_configs/debug_cpu.toml --seq-len 4096 --batch-size 4 --workers 0 1 2

Reads the sources, weights and tokenizer from the TOML (the fixture shards in
debug_cpu.toml) and reports tokens/s per loader worker, to compare with what one
GPU consumes (~170k tokens/s for the 308M model). Workers = 0 tokenizes inline
and counts as one.
"""

from __future__ import annotations

import argparse
import time

from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import ConfigManager

from data_pipelines.dataloader import build_batches, streams_of_rank


def measure(job_config, tokenizer: HuggingFaceTokenizer, args: argparse.Namespace, workers: int) -> float:
    """Tokens/s after a warm-up (which fills the shuffle buffer)."""
    data = job_config.hybrid_data
    data.num_workers, data.worker_method = workers, args.method
    stream_ids = streams_of_rank(data.streams, dp_rank=0, dp_world_size=1, local_batch_size=args.batch_size)
    batches = build_batches(data, tokenizer.tokenizer, tokenizer.eos_id, args.seq_len, args.batch_size, stream_ids)
    batches.reset()
    for _ in range(args.warmup):
        next(batches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        x, _ = next(batches)
        n += x["input"].numel()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="train_configs/debug_cpu.toml")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--method", choices=["thread", "process"], default="thread")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    job_config = ConfigManager().parse_args(["--job.config_file", args.config])
    tokenizer = HuggingFaceTokenizer(job_config.model.hf_assets_path)
    print(f"seq_len={args.seq_len} batch_size={args.batch_size} method={args.method} config={args.config}")
    print(f"{'workers':>8} {'tokens/s':>12} {'tokens/s/worker':>16}")
    for workers in args.workers:
        rate = measure(job_config, tokenizer, args, workers)
        print(f"{workers:>8} {rate:>12,.0f} {rate / max(workers, 1):>16,.0f}")


if __name__ == "__main__":
    main()
