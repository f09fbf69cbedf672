"""Validation inside a 2-rank debug run (run_train.sh): at its freq, reduced over ranks, in TensorBoard;
the run resumes bit-exact, untouched by validation; plot and evaluate on the run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from matplotlib.colors import to_rgb
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import ConfigManager

from _train_runs import CONFIG, SMALL, records, train
from data_pipelines.validation import build_validation_sets
from titan_hybrid.bpb import Totals, batch_totals, summed_nll, token_byte_lengths
from titan_hybrid.evaluate import main as evaluate_main
from titan_hybrid.export import export, load_checkpoint_model
from titan_hybrid.plot import TRAIN_COLOUR, TRAIN_LOSS, VALIDATION_COLOURS, plot, read_scalars

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
STEPS, FREQ = 10, 5
VALIDATED_AT = [1, 5, 10]
VALIDATION_LINE = re.compile(r"validate step:\s*(\d+)\s+bpb: ([0-9.]+)")


@pytest.fixture(scope="module")
def reasoning_split(tmp_path_factory) -> Path:
    """A separate validation split for the reasoning source (prompt-masked like training)."""
    folder = tmp_path_factory.mktemp("openr1_validation")
    table = pq.read_table(ROOT / "data_pipelines" / "fixtures" / "openr1" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 24), folder / "validation.parquet")
    return folder


@pytest.fixture(scope="module")
def args(reasoning_split) -> list[str]:
    return ["--training.steps", str(STEPS), "--checkpoint.interval", str(FREQ), "--validation.freq", str(FREQ),
            "--hybrid_data.loader", "thread",
            "--hybrid_validation.sources", "web,reasoning", "--hybrid_validation.reasoning.path", str(reasoning_split)]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, args) -> tuple[Path, str]:
    dump = tmp_path_factory.mktemp("validated") / "run"
    return dump, train(dump, *args).stdout


def test_validation_runs_at_its_freq_and_reaches_tensorboard(run):
    dump, log = run
    logged = {int(s): float(b) for s, b in VALIDATION_LINE.findall(log)}
    assert sorted(logged) == VALIDATED_AT
    scalars = read_scalars(str(dump))
    for metric in ("loss", "perplexity", "bpb", "web/loss", "web/bpb", "reasoning/loss", "reasoning/bpb"):
        assert sorted(scalars[f"validation_metrics/{metric}"]) == VALIDATED_AT, metric
    bpb = scalars["validation_metrics/bpb"]
    assert all(abs(bpb[s] - logged[s]) < 1e-4 for s in VALIDATED_AT)
    assert bpb[10] < bpb[1]  # the model learns
    # Overall = token-weighted over the sources: between the two.
    web, reasoning = scalars["validation_metrics/web/loss"][10], scalars["validation_metrics/reasoning/loss"][10]
    assert min(web, reasoning) < scalars["validation_metrics/loss"][10] < max(web, reasoning)

    steps = list(range(1, STEPS + 1))
    for tag in (TRAIN_LOSS, "grad_norm", "lr", "throughput(tps)", "memory/max_reserved(GiB)", "data_mix/web"):
        assert sorted(scalars[tag]) == steps, tag
    mix = [scalars[f"data_mix/{s}"][STEPS] for s in ("web", "code", "reasoning")]
    assert sum(mix) == pytest.approx(1.0) and all(0 < m < 1 for m in mix)
    assert sorted(scalars["time_metrics/eta(s)"]) == steps[1:]
    # CPU: no peak FLOPS, so neither TFLOPS nor MFU, in the events or the step line; the ETA is there.
    assert not any(tag in scalars for tag in ("mfu(%)", "tflops"))
    step_lines = [line for line in log.splitlines() if re.search(r" step:\s*\d+\s+loss:", line) and "validate" not in line]
    assert len(step_lines) == STEPS and all("eta: " in line and "mfu" not in line for line in step_lines)


def test_validation_numbers_are_every_ranks_share_summed(run, args):
    """Re-score step 5's validation in this process: both ranks' rows with the step-5 weights."""
    dump, _ = run
    config = ConfigManager().parse_args(["--job.config_file", str(CONFIG), *SMALL, *args])
    tokenizer = HuggingFaceTokenizer(config.model.hf_assets_path)
    token_bytes = token_byte_lengths(tokenizer.tokenizer, tokenizer.eos_id)
    model = load_checkpoint_model(str(dump / "checkpoint" / f"step-{FREQ}"))
    scalars = read_scalars(str(dump))
    for name in ("web", "reasoning"):
        totals = torch.zeros(3, dtype=torch.float64)
        for rank in (0, 1):
            batches = build_validation_sets(config, tokenizer.tokenizer, tokenizer.eos_id, rank, 2)[name]
            with torch.no_grad():
                for _, (input_dict, labels) in zip(range(config.validation.steps), batches):
                    totals += batch_totals(summed_nll(model, input_dict, labels), labels, token_bytes)
        want = Totals.of(totals).metrics()
        assert scalars[f"validation_metrics/{name}/bpb"][FREQ] == pytest.approx(want["bpb"], rel=1e-4), name
        assert scalars[f"validation_metrics/{name}/loss"][FREQ] == pytest.approx(want["loss"], rel=1e-4), name


def test_run_with_validation_resumes_bit_exact(run, args, tmp_path):
    """Also shows that validation leaves training alone: the reference's steps 6-10 follow its step-5
    validation, the resumed run's (from the step-5 checkpoint, saved before it) follow none."""
    dump, log = run
    resumed = tmp_path / "resumed"
    shutil.copytree(dump / "checkpoint" / f"step-{FREQ}", resumed / "checkpoint" / f"step-{FREQ}")

    resumed_log = train(resumed, *args).stdout

    want, got = records(dump), records(resumed)
    assert sorted(got) == list(range(FREQ + 1, STEPS + 1))
    for step in got:
        assert got[step]["loss"] == want[step]["loss"] and got[step]["rows"] == want[step]["rows"], step
    assert VALIDATION_LINE.findall(resumed_log)[-1] == VALIDATION_LINE.findall(log)[-1]  # step 10's validation


def test_plot_writes_a_png_that_shows_both_curves(run, tmp_path):
    dump, _ = run
    out = plot(str(dump), str(tmp_path / "curves.png"))
    image = plt_image(out)
    assert image.shape[0] > 300 and image.shape[1] > 600
    # Both curves are drawn: many pixels of the train colour and of the validation colour.
    for colour in (TRAIN_COLOUR, VALIDATION_COLOURS[0]):
        assert (np.abs(image - np.array(to_rgb(colour))).sum(axis=-1) < 0.05).sum() > 300, colour


def plt_image(path: str) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)[..., :3]


def test_evaluate_a_run_and_its_export(run, tmp_path, capsys):
    dump, _ = run
    text = tmp_path / "doc.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n" * 8)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"Document {i}: photosynthesis makes sugar."}) + "\n" for i in range(5)))

    def evaluate(model: Path) -> dict:
        evaluate_main(["--model", str(model), "--data", str(text), str(jsonl), "--seq-len", "128", "--json"])
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    from_run = evaluate(dump)
    export(str(dump), str(tmp_path / "exported"))
    from_export = evaluate(tmp_path / "exported")

    assert from_run.keys() == {str(text), str(jsonl), "all"}
    every = from_run["all"]
    assert every["tokens"] == from_run[str(text)]["tokens"] + from_run[str(jsonl)]["tokens"]
    assert 0 < every["bpb"] < 20 and every["perplexity"] > 1
    for key in from_run:
        assert from_export[key]["bpb"] == pytest.approx(from_run[key]["bpb"], rel=1e-5)
