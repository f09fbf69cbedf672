"""``python -m examples.grokking [--steps N] [--out DIR]``: train, print accuracies, plot them.

Needs matplotlib for the plot (``pip install -e .[examples]``).
"""

import argparse
import json
from pathlib import Path

from .modular import GrokkingConfig, train


def plot(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["train_acc"] for r in history], label="train")
    ax.plot(steps, [r["val_acc"] for r in history], label="validation")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    defaults = GrokkingConfig()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--no-grokfast", action="store_true")
    parser.add_argument("--no-cautious", action="store_true")
    parser.add_argument("--stop-at-val-acc", type=float, default=None)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=Path("outputs/grokking"))
    args = parser.parse_args()
    cfg = GrokkingConfig(
        steps=args.steps,
        eval_every=args.eval_every,
        weight_decay=args.weight_decay,
        grokfast=not args.no_grokfast,
        cautious=not args.no_cautious,
        stop_at_val_acc=args.stop_at_val_acc,
        seed=args.seed,
    )
    history = train(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "history.json").write_text(json.dumps({"config": vars(cfg), "history": history}))
    title = (
        f"a+b mod {cfg.p}, {cfg.train_fraction:.0%} train, GrokAdamW wd={cfg.weight_decay}"
        f"{' +grokfast' if cfg.grokfast else ''}{' +cautious' if cfg.cautious else ''}"
    )
    plot(history, args.out / "grokking.png", title)


if __name__ == "__main__":
    main()
