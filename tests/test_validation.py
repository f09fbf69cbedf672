"""Bits per byte by hand, held-out shards, the served data mix and config errors (in process, no torchrun)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import ConfigManager

from data_pipelines.dataloader import SOURCES, DataConfigError, HybridDataLoader, build_batches, streams_of_rank
from data_pipelines.sources import DataSourceError
from data_pipelines.streams import training_shards
from data_pipelines.validation import build_validation_sets, validation_files
from titan_hybrid.bpb import token_byte_lengths
from titan_hybrid.evaluate import documents, evaluate_texts
from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train_configs" / "debug_cpu.toml"
WEB = ROOT / "data_pipelines" / "fixtures" / "fineweb-edu" / "sample" / "10BT"
TOKENIZER = HuggingFaceTokenizer(str(ROOT / "assets" / "tokenizer" / "starcoder2_think"))


def job_config(*overrides: str):
    return ConfigManager().parse_args(["--job.config_file", str(CONFIG), *overrides])


def fixture_texts(n: int) -> list[str]:
    return pq.read_table(WEB / "001_00000.parquet", columns=["text"]).column("text").to_pylist()[:n]


def test_token_bytes_add_up_to_the_utf8_bytes_of_the_text():
    lengths = token_byte_lengths(TOKENIZER.tokenizer, TOKENIZER.eos_id)
    texts = fixture_texts(50) + ["<think>\nhé 日本 123 🙂</think>"]
    for text in texts:
        ids = TOKENIZER.tokenizer.encode(text, add_special_tokens=False).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[TOKENIZER.eos_id] == 0


def test_bpb_equals_a_hand_computation_on_a_fixture():
    torch.manual_seed(0)
    model = HybridLM(replace(hybrid_flavors["debug"], vocab_size=49280)).eval()
    with torch.no_grad():
        model.init_weights()
    texts = [t[:300] for t in fixture_texts(3)]
    seq_len = 512  # one row holds all three documents (padded)

    got = evaluate_texts(model, TOKENIZER, iter(texts), seq_len)

    # By hand: documents + EOS concatenated; every token after the first is a target.
    ids = [i for t in texts for i in TOKENIZER.tokenizer.encode(t, add_special_tokens=False).ids + [TOKENIZER.eos_id]]
    assert len(ids) <= seq_len
    starts = [0]
    for t in texts[:-1]:
        starts.append(starts[-1] + len(TOKENIZER.tokenizer.encode(t, add_special_tokens=False).ids) + 1)
    positions = torch.tensor([i - max(s for s in starts if s <= i) for i in range(len(ids) - 1)])
    with torch.no_grad():
        logits = model(torch.tensor(ids[:-1])[None], positions=positions[None])[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    nll = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    first_token_bytes = len(TOKENIZER.tokenizer.decode([ids[0]]).encode("utf-8"))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts) - first_token_bytes  # the first token is never a target

    assert got.tokens == len(ids) - 1 and got.bytes == n_bytes
    assert got.nll == pytest.approx(nll, rel=1e-5)
    metrics = got.metrics()
    assert metrics["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert metrics["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_documents_of_parquet_jsonl_and_text_files(tmp_path):
    texts = fixture_texts(3)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    (tmp_path / "b.txt").write_text(texts[0])
    assert list(documents(str(tmp_path / "a.jsonl"), "body")) == texts
    assert list(documents(str(tmp_path / "b.txt"))) == [texts[0]]
    assert list(documents(str(WEB / "001_00000.parquet")))[:3] == texts
    with pytest.raises(ValueError, match=r"--data .*a.jsonl: line 1 has no field 'text' \(--field\)"):
        list(documents(str(tmp_path / "a.jsonl")))


def test_holdout_shard_is_validated_and_never_trained_on():
    config = job_config()
    held = [str(WEB / "001_00000.parquet")]
    assert [str(Path(f).resolve()) for f in validation_files(config, "web")] == held
    assert [str(Path(f).resolve()) for f in training_shards("web", config.hybrid_data.web)] == [
        str(WEB / "000_00000.parquet")
    ]


def test_validation_sets_split_the_rows_across_ranks_and_restart():
    config = job_config("--validation.steps", "-1", "--validation.seq_len", "64")
    sets = [build_validation_sets(config, TOKENIZER.tokenizer, TOKENIZER.eos_id, r, 2)["web"] for r in (0, 1)]
    first = [next(iter(s)) for s in sets]
    assert not torch.equal(first[0][0]["input"], first[1][0]["input"])
    again = next(iter(sets[0]))
    assert torch.equal(first[0][0]["input"], again[0]["input"]) and torch.equal(first[0][1], again[1])
    assert first[0][0]["input"].shape == (config.validation.local_batch_size, 64)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--hybrid_validation.sources", "web,wiki"], "[hybrid_validation] sources: unknown source 'wiki'"),
        (["--hybrid_validation.sources", "code"], "[hybrid_validation] sources lists 'code', which has no held-out data"),
        (["--hybrid_validation.sources", "code", "--hybrid_validation.code.path", "/nonexistent"],
         "[hybrid_validation.code] path = '/nonexistent': no such local directory (/nonexistent)"),
        (["--hybrid_validation.sources", "code", "--hybrid_validation.code.path", str(WEB), "--hybrid_validation.code.data_dir", "x"],
         "[hybrid_validation.code] path / data_dir: no .parquet files under"),
        (["--hybrid_data.web.holdout", "002_*.parquet"], "[hybrid_data.web] holdout: '002_*.parquet' matches no shard"),
    ],
)  # fmt: skip
def test_bad_validation_config_names_the_key(overrides, message):
    config = job_config(*overrides)
    with pytest.raises((DataConfigError, DataSourceError)) as error:
        build_validation_sets(config, TOKENIZER.tokenizer, TOKENIZER.eos_id, 0, 1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_validation_without_sources_or_holding_out_everything_says_which_key():
    config = job_config()
    config.hybrid_validation.sources = []
    with pytest.raises(DataConfigError, match=r"\[validation\] enable = true needs held-out data: set \[hybrid_validation\] sources"):
        build_validation_sets(config, TOKENIZER.tokenizer, TOKENIZER.eos_id, 0, 1)
    config = job_config("--hybrid_data.web.holdout", "*.parquet")
    with pytest.raises(DataConfigError, match=r"\[hybrid_data.web\] holdout holds out every shard"):
        training_shards("web", config.hybrid_data.web)


def test_served_tokens_count_the_data_mix():
    data = replace(job_config().hybrid_data, loader="thread", num_workers=0, shuffle_buffer=0)
    data.code = replace(data.code, weight=0.0)
    stream_ids = streams_of_rank(data.streams, 0, 1, 2)
    loader = HybridDataLoader(build_batches(data, TOKENIZER.tokenizer, TOKENIZER.eos_id, 32, 2, stream_ids), 2, stream_ids)
    it = iter(loader)
    batches = [next(it) for _ in range(20)]
    assert all(x.keys() == {"input", "positions"} for x, _ in batches)
    served = dict(zip(SOURCES, loader.served_tokens.tolist()))
    assert sum(served.values()) == 20 * 2 * 32  # every input token, by the source of its document
    assert served["code"] == 0 and served["web"] > 0 and served["reasoning"] > 0
