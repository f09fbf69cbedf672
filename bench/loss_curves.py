"""Training-loss curves of several runs from their TorchTitan logs, as one PNG.

The throughput benchmarks keep each run's console log, not TensorBoard events
(``titan_hybrid.plot`` draws those); comparing two code paths' numerics (a fast path against the
plain one, same seed and data) is then a look at their ``step: N  loss: X`` lines side by side.

    python -m bench.loss_curves fast.log plain.log --labels "compiled" "eager" --png curves.png

Prints the mean and largest absolute difference of each run from the first, step by step.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

STEP_LOSS = re.compile(r"step:\s*(\d+)\s+loss:\s*([0-9.]+)")


def read_losses(log: Path) -> dict[int, float]:
    """Step -> training loss of a TorchTitan log (a step logged twice: the later line wins)."""
    losses = {int(step): float(loss) for step, loss in STEP_LOSS.findall(log.read_text(errors="replace"))}
    if not losses:
        raise ValueError(f"{log}: no 'step: N  loss: X' lines (is it a TorchTitan training log?)")
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+", help="one per log (default: the file names)")
    parser.add_argument("--title", default="training loss")
    parser.add_argument("--png", default="loss_curves.png")
    cli = parser.parse_args(argv)
    labels = cli.labels or [log.stem for log in cli.logs]
    if len(labels) != len(cli.logs):
        parser.error(f"--labels: {len(labels)} given for {len(cli.logs)} logs")
    try:
        runs = [read_losses(log) for log in cli.logs]
    except (OSError, ValueError) as e:
        sys.exit(f"bench.loss_curves: {e}")
    for label, run in zip(labels[1:], runs[1:]):
        steps = sorted(set(run) & set(runs[0]))
        diffs = [abs(run[s] - runs[0][s]) for s in steps]
        worst = max(range(len(steps)), key=diffs.__getitem__)
        print(f"{label} vs {labels[0]}: {len(steps)} steps, mean |difference| {sum(diffs) / len(diffs):.3f}, "
              f"largest {diffs[worst]:.3f} (step {steps[worst]})")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run in zip(labels, runs):
        steps = sorted(run)
        ax.plot(steps, [run[s] for s in steps], "-o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(cli.title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(cli.png, dpi=120)
    print(f"wrote {cli.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
