"""Training and validation curves of a run, from its TensorBoard event files, as one PNG.

``python -m titan_hybrid.plot RUN_DIR [--out FILE.png]`` (default ``RUN_DIR/curves.png``).
Reads every event file under ``RUN_DIR`` (a resumed run writes a new folder under
``[metrics] save_tb_folder``; for a step logged twice the later run wins). Left: training loss
and validation loss (overall and per source); right: validation bits per byte. Needs
matplotlib (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import argparse
import glob
import os

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

TRAIN_LOSS = "loss_metrics/global_avg_loss"
VALIDATION = "validation_metrics"
Curve = dict[int, float]
TRAIN_COLOUR = "tab:blue"
VALIDATION_COLOURS = ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
"""Overall first, then per source."""


def read_scalars(run_dir: str) -> dict[str, Curve]:
    """Every scalar tag of the run's event files: tag -> {step: value}."""
    files = sorted(glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir} (is [metrics] enable_tensorboard on?)")
    curves: dict[str, Curve] = {}
    for path in files:
        events = EventAccumulator(path, size_guidance={SCALARS: 0})  # 0: keep every point
        events.Reload()
        for tag in events.Tags()[SCALARS]:
            curves.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return curves


def validation_curves(curves: dict[str, Curve], metric: str) -> dict[str, Curve]:
    """``metric`` of the validation overall ("all") and, with more than one source, per source."""
    overall = {"all": curves[f"{VALIDATION}/{metric}"]} if f"{VALIDATION}/{metric}" in curves else {}
    per_source = {}
    for tag, curve in curves.items():
        parts = tag.split("/")
        if len(parts) == 3 and parts[0] == VALIDATION and parts[2] == metric:
            per_source[parts[1]] = curve
    return {**overall, **per_source} if len(per_source) > 1 else overall


def plot(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_scalars(run_dir)
    if TRAIN_LOSS not in curves:
        raise ValueError(f"{run_dir}: the event files have no {TRAIN_LOSS}")
    out = out or os.path.join(run_dir, "curves.png")
    fig, (loss_ax, bpb_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    train = curves[TRAIN_LOSS]
    loss_ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train", color=TRAIN_COLOUR)
    for metric, ax, label in (("loss", loss_ax, "validation ({})"), ("bpb", bpb_ax, "{}")):
        for (name, curve), colour in zip(validation_curves(curves, metric).items(), VALIDATION_COLOURS):
            steps = sorted(curve)
            ax.plot(steps, [curve[s] for s in steps], marker="o", color=colour, label=label.format(name))
    loss_ax.set(title="loss (nats / token)", xlabel="step")
    bpb_ax.set(title="validation bits per byte", xlabel="step")
    for ax in (loss_ax, bpb_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_hybrid.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run's dump folder (or any folder holding its event files)")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    print(f"wrote {plot(args.run_dir, args.out)}")


if __name__ == "__main__":
    main()
