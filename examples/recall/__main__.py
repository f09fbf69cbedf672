"""``python -m examples.recall [--patterns gggg gggA] [--device cuda] ...``: the associative-recall probe.

Trains one HybridLM per pattern, all of the same width, depth and heads, on multi-query
associative recall (see ``mqar.py``) and prints a table of held-out recall. With enough
pairs, pure GLA stays near chance (its state is too small to hold the table) while one
attention layer in four recalls almost every value.

The defaults (64 pairs, dim 128, 4 layers, 8 heads, 5000 steps of 128 rows) are sized for
one GPU; on a CPU, shrink them as tests/test_recall_probe.py does.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from .probe import RecallConfig, train


def main() -> None:
    defaults = RecallConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patterns", nargs="+", default=["gggg", "gggA"])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (cuda trains under bf16 autocast)",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--pairs", type=int, default=defaults.n_pairs)
    parser.add_argument("--queries", type=int, default=defaults.n_queries)
    parser.add_argument("--key-vocab", type=int, default=defaults.key_vocab)
    parser.add_argument("--value-vocab", type=int, default=defaults.value_vocab)
    parser.add_argument("--dim", type=int, default=defaults.dim)
    parser.add_argument("--layers", type=int, default=defaults.n_layers)
    parser.add_argument("--heads", type=int, default=defaults.n_heads)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--stop-at-recall", type=float, default=defaults.stop_at_recall)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", type=Path, default=None, help="write one JSON line per pattern here")
    args = parser.parse_args()

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("")
    rows = []
    for pattern in args.patterns:
        cfg = RecallConfig(
            pattern=pattern,
            n_pairs=args.pairs,
            n_queries=args.queries,
            key_vocab=args.key_vocab,
            value_vocab=args.value_vocab,
            dim=args.dim,
            n_layers=args.layers,
            n_heads=args.heads,
            ffn_dim=2 * args.dim,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            eval_every=args.eval_every,
            stop_at_recall=args.stop_at_recall,
            seed=args.seed,
            device=args.device,
        )
        row = train(cfg)
        rows.append(row)
        if args.json is not None:
            with args.json.open("a") as f:
                f.write(json.dumps({**row, "config": dataclasses.asdict(cfg)}) + "\n")

    print(
        f"\nMQAR: {args.pairs} pairs, {args.queries} queries; "
        f"dim {args.dim}, {args.layers} layers, {args.heads} heads"
    )
    print(f"{'pattern':<12} {'params':>10} {'steps':>7} {'recall':>7} {'chance':>7} {'seconds':>8}")
    for r in rows:
        print(
            f"{r['pattern']:<12} {r['params']:>10,} {r['steps']:>7} {r['recall']:>7.3f}"
            f" {r['chance']:>7.4f} {r['seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
