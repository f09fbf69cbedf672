"""Perplexity and bits per byte of a model on local text files.

``python -m titan_hybrid.evaluate --model EXPORT_OR_RUN --data PATH [PATH ...]``

``--model`` is an exported folder (``python -m titan_hybrid.export``) or a run's dump folder
(its newest complete checkpoint, or ``--step N``). Each ``--data`` file is scored on its own and
all together: ``.parquet`` and ``.jsonl`` rows give a document each (``--field``, default
``text``); any other file is one document. Documents are packed as in training (EOS after
each, rows of ``--seq-len`` tokens, the last row padded) and scored with ``titan_hybrid.bpb``,
the accounting validation uses: every token is supervised, so bits per byte counts every byte.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator

import pyarrow.parquet as pq
import torch
from torchdata.nodes import IterableWrapper, Mapper
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from data_pipelines.packing import Encoder, Packer, collate
from titan_hybrid.bpb import Totals, batch_totals, summed_nll, token_byte_lengths
from titan_hybrid.checkpoint import read_marker
from titan_hybrid.export import CONFIG, find_step_dir, load_checkpoint_model, load_exported
from titan_hybrid.models.hybrid import HybridLM


def load_model(path: str, step: int | None = None, device: str = "cpu") -> tuple[HybridLM, HuggingFaceTokenizer]:
    """The model and tokenizer of an exported folder or of a run's checkpoint."""
    if os.path.isfile(os.path.join(path, CONFIG)):
        return load_exported(path, device=device), HuggingFaceTokenizer(path)
    step_dir = find_step_dir(path, step)
    model = load_checkpoint_model(step_dir).to(device)
    return model, HuggingFaceTokenizer(read_marker(step_dir)["hf_assets_path"])


def documents(path: str, field: str = "text") -> Iterator[str]:
    """The texts of a ``.parquet`` / ``.jsonl`` file (one per row), or the whole of any other file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file")
    if path.endswith(".parquet"):
        names = pq.ParquetFile(path).schema_arrow.names
        if field not in names:
            raise ValueError(f"--data {path}: no column {field!r} (--field); columns are {names}")
        for batch in pq.ParquetFile(path).iter_batches(columns=[field]):
            yield from (text for text in batch.column(0).to_pylist() if text)
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if field not in row:
                        raise ValueError(f"--data {path}: line {n} has no field {field!r} (--field)")
                    if row[field]:
                        yield row[field]
    else:
        with open(path, encoding="utf-8") as f:
            yield f.read()


@torch.no_grad()
def evaluate_texts(
    model: HybridLM, tokenizer: HuggingFaceTokenizer, texts: Iterator[str], seq_len: int, batch_size: int = 4
) -> Totals:
    """Summed NLL, tokens and bytes of ``texts`` packed into rows of ``seq_len``."""
    device = next(model.parameters()).device
    token_bytes = token_byte_lengths(tokenizer.tokenizer, tokenizer.eos_id).to(device)
    docs = IterableWrapper({"source": "eval", "text": text} for text in texts)
    rows = Packer(Mapper(docs, Encoder(tokenizer.tokenizer)), seq_len, tokenizer.eos_id, pad_last=True)
    rows.reset()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    while batch := [row for _, row in zip(range(batch_size), rows)]:
        input_dict, labels = collate(batch)
        input_dict, labels = {k: v.to(device) for k, v in input_dict.items()}, labels.to(device)
        totals += batch_totals(summed_nll(model, input_dict, labels), labels, token_bytes)
    return Totals.of(totals)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_hybrid.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported folder or run dump folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: newest complete)")
    parser.add_argument("--data", nargs="+", required=True, help=".parquet, .jsonl or text files")
    parser.add_argument("--field", default="text", help="text column / key of .parquet and .jsonl files")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the model's max_seq_len)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model, args.step, args.device)
    seq_len = args.seq_len or model.model_args.max_seq_len
    if seq_len > model.model_args.max_seq_len:
        parser.error(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.model_args.max_seq_len}")
    results = {
        path: evaluate_texts(model, tokenizer, documents(path, args.field), seq_len, args.batch_size)
        for path in args.data
    }
    results["all"] = Totals.total(list(results.values()))
    if args.json:
        print(json.dumps({k: {"tokens": t.tokens, "bytes": t.bytes, **t.metrics()} for k, t in results.items()}))
        return
    width = max(len(k) for k in results)
    print(f"{'data':<{width}}  {'tokens':>10}  {'bytes':>11}  {'loss':>7}  {'ppl':>10}  {'bpb':>6}")
    for name, t in results.items():
        m = t.metrics()
        print(f"{name:<{width}}  {t.tokens:>10,}  {t.bytes:>11,}  {m['loss']:>7.4f}  {m['perplexity']:>10.2f}  {m['bpb']:>6.4f}")


if __name__ == "__main__":
    main()
