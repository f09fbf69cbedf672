"""The [hybrid_data] pipeline on the fixture shards: determinism, mixing, sharding, resume, formatting, errors."""

import os
import pickle
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer
from torchtitan.components.loss import IGNORE_INDEX

from data_pipelines.dataloader import HybridDataLoader, build_batches, streams_of_rank
from data_pipelines import packing
from data_pipelines.packing import Encoder
from data_pipelines.sources import DataSourceError, list_shards
from data_pipelines.streams import build_documents, build_source
from titan_hybrid.config.job_config import HybridData, ReasoningSource, TextSource

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "data_pipelines" / "fixtures"
TOKENIZER = Tokenizer.from_file(str(ROOT / "assets" / "tokenizer" / "starcoder2_think" / "tokenizer.json"))
EOS, THINK_ID, END_THINK_ID = 0, 49152, 49153
SEQ_LEN, BATCH = 128, 2


def fixture_data(web=0.5, code=0.25, reasoning=0.25, **kw) -> HybridData:
    return HybridData(
        web=TextSource(path=str(FIXTURES / "fineweb-edu"), data_dir="sample/10BT", weight=web),
        code=TextSource(path=str(FIXTURES / "starcoderdata"), data_dir="python", weight=code, text_field="content"),
        reasoning=ReasoningSource(path=str(FIXTURES / "openr1"), data_dir="data", weight=reasoning),
        **{"seed": 1234, "streams": 2, "shuffle_buffer": 16, "num_workers": 0, "loader": "thread", **kw},
    )


def loader(data: HybridData, rank: int = 0, world: int = 1, batch: int = BATCH) -> HybridDataLoader:
    stream_ids = streams_of_rank(data.streams, rank, world, batch)
    return HybridDataLoader(build_batches(data, TOKENIZER, EOS, SEQ_LEN, batch, stream_ids), data.streams, stream_ids)


def take(it, n: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    return [next(it) for _ in range(n)]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.keys() == xb.keys() == {"input", "positions"}
        for k in xa:
            assert torch.equal(xa[k], xb[k]), k
        assert torch.equal(ya, yb)


def test_batch_contract():
    x, y = next(iter(loader(fixture_data())))
    for t in (x["input"], x["positions"], y):
        assert t.dtype == torch.long and t.shape == (BATCH, SEQ_LEN)
    # Labels are the next input token unless ignored.
    keep = y[:, :-1] != IGNORE_INDEX
    assert torch.equal(y[:, :-1][keep], x["input"][:, 1:][keep])
    # Positions restart after every EOS (EOS ends its document) and stay below seq_len.
    after_eos = torch.zeros_like(x["input"], dtype=torch.bool)
    after_eos[:, 1:] = x["input"][:, :-1] == EOS
    assert (x["positions"][after_eos] == 0).all()
    assert (x["positions"][:, 0] == 0).all()
    steps = x["positions"][:, 1:] - x["positions"][:, :-1]
    assert ((steps == 1) | (x["positions"][:, 1:] == 0)).all()


def test_same_seed_same_stream_other_seed_other_order():
    data = fixture_data()
    a, b = take(iter(loader(data)), 6), take(iter(loader(data)), 6)
    assert_same(a, b)
    c = take(iter(loader(replace(data, seed=99))), 6)
    assert not all(torch.equal(x["input"], z["input"]) for (x, _), (z, _) in zip(a, c))


def test_realised_mixture_matches_weights():
    """~10k documents, before tokenization (the mixture is decided there)."""
    weights = {"web": 0.5, "code": 0.25, "reasoning": 0.25}
    docs = build_documents(fixture_data(**weights, shuffle_buffer=256), stream=0, num_streams=1)
    docs.reset()
    counts = Counter(next(docs)["source"] for _ in range(10_000))
    for name, w in weights.items():
        assert abs(counts[name] / 10_000 - w) < 0.02, counts


@pytest.mark.parametrize("name,world", [("web", 2), ("reasoning", 2), ("code", 3)])
def test_streams_read_disjoint_shares_covering_the_source(name, world):
    """web has 2 shards (split by shard), reasoning and code 1 (split by row)."""
    data = fixture_data()
    shares = []
    for rank in range(world):
        source = build_source(name, getattr(data, name), data, rank, world)
        source.reset()
        shares.append([str(doc) for doc in source])  # one epoch
    everything = build_source(name, getattr(data, name), data, 0, 1)
    everything.reset()
    assert sorted(sum(shares, [])) == sorted(str(doc) for doc in everything)
    assert sum(len(s) for s in shares) == sum(len(set(s)) for s in shares)  # no repeats inside a share
    for i in range(world):
        for j in range(i + 1, world):
            assert not set(shares[i]) & set(shares[j])


def test_two_ranks_get_different_batches():
    data = fixture_data()
    r0, r1 = take(iter(loader(data, 0, 2)), 3), take(iter(loader(data, 1, 2)), 3)
    assert not any(torch.equal(x0["input"], x1["input"]) for (x0, _), (x1, _) in zip(r0, r1))


def test_num_workers_does_not_change_a_ranks_stream():
    """Nor where they run: tokenizer processes inside the loader process too (its children)."""
    data = fixture_data()
    streams = {
        (n, method, where): take(iter(loader(replace(data, num_workers=n, worker_method=method, loader=where), 1, 2)), 6)
        for n, method, where in [
            (0, "thread", "thread"), (1, "thread", "thread"), (2, "thread", "thread"), (2, "process", "thread"),
            (1, "process", "process"),
        ]
    }  # fmt: skip
    ref = streams[(0, "thread", "thread")]
    for stream in streams.values():
        assert_same(stream, ref)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resumes_with_the_next_batch(num_workers):
    """Resume after k batches from a fresh loader; a 2-document buffer crosses many blocks."""
    data = fixture_data(shuffle_buffer=2, num_workers=num_workers)
    first = loader(data, 1, 2)
    it = iter(first)
    take(it, 5)
    state = first.state_dict()
    expected = take(it, 5)

    resumed = loader(data, 1, 2)
    resumed.state_dict()  # as DCP does, to get a template, before loading
    resumed.load_state_dict(state)
    assert_same(take(iter(resumed), 5), expected)



def test_loader_process_gives_the_thread_loaders_batches_and_checkpoints():
    """The same batches from a child process, and states that load either way."""
    data = fixture_data(shuffle_buffer=4)
    in_thread, in_process = (loader(replace(data, loader=where), 1, 2) for where in ("thread", "process"))
    thread_it, process_it = iter(in_thread), iter(in_process)
    assert_same(take(process_it, 4), take(thread_it, 4))
    saved = {"thread": in_thread.state_dict(), "process": in_process.state_dict()}
    expected = take(thread_it, 3)
    assert_same(take(process_it, 3), expected)

    for saved_by, resumed_by in [("process", "thread"), ("thread", "process")]:
        resumed = loader(replace(data, loader=resumed_by), 1, 2)
        resumed.state_dict()  # as DCP does, before loading
        resumed.load_state_dict(saved[saved_by])
        assert_same(take(iter(resumed), 3), expected)


def test_a_loader_process_started_early_serves_the_same_batches_and_yields_to_a_loaded_state():
    """``start()`` (the trainer's loader starts while the model is built): the first ``iter()`` takes
    its child over, with the same batches; a state loaded before reading replaces it."""
    data = replace(fixture_data(shuffle_buffer=4), loader="process")
    reference = loader(data, 1, 2)
    reference_it = iter(reference)
    expected = take(reference_it, 6)
    saved = reference.state_dict()

    early = loader(data, 1, 2)
    early._root.start()
    child = early._root._process.pid
    early.state_dict()  # as DCP does, for a template: it must not restart the child either
    assert_same(take(iter(early), 3), expected[:3])
    assert early._root._process.pid == child

    resumed = loader(data, 1, 2)
    resumed._root.start()
    replaced = resumed._root._process
    resumed.state_dict()
    resumed.load_state_dict(saved)
    assert_same(take(iter(resumed), 3), take(reference_it, 3))
    assert not replaced.is_alive()


def test_the_loader_process_imports_no_torchtitan():
    """What the loader process imports: the trainer's main module (spawn imports it) and all that
    unpickling its factory needs. TorchTitan's packages would add seconds before every first batch."""
    factory = build_batches(replace(fixture_data(), loader="process"), TOKENIZER, EOS, SEQ_LEN, BATCH, [0, 1]).build
    child = (
        "import pickle, sys; import titan_hybrid.train; pickle.loads(sys.stdin.buffer.read()); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchtitan'))"
    )
    done = subprocess.run([sys.executable, "-c", child], input=pickle.dumps(factory), capture_output=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "[]"


def test_packed_labels_skip_what_torchtitan_s_loss_skips():
    assert packing.IGNORE_INDEX == IGNORE_INDEX


def test_loader_process_raises_the_data_error_with_its_traceback(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    with pytest.raises(DataSourceError, match="bad.parquet") as error:
        next(iter(loader(local_web(tmp_path, loader="process"))))
    assert any("raised in the data loader process" in note for note in error.value.__notes__)


def test_loader_process_ends_when_the_training_process_is_killed():
    """A SIGKILLed trainer runs no cleanup; its loader process must not linger (and burn CPU)."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
from dataclasses import replace
from test_data_pipeline import fixture_data, loader
dl = loader(replace(fixture_data(), loader="process"))
next(iter(dl))
print(dl._root._process.pid, flush=True)
sys.stdin.read()
"""
    trainer = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = int(trainer.stdout.readline())
    os.kill(child, 0)  # alive while the trainer is
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and pid_alive(child):
        time.sleep(0.2)
    assert not pid_alive(child)


def test_loader_process_stops_cleanly_at_exit():
    """Asked to stop, the child exits by itself: a killed one leaves semaphores the tracker warns about."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
from dataclasses import replace
from test_data_pipeline import fixture_data, loader
next(iter(loader(replace(fixture_data(), loader="process"))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "leaked" not in done.stderr, done.stderr


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def rows_per_step(its: list[Iterator], steps: int, microbatches: int = 1) -> list[list[list[int]]]:
    """Per step, the sorted rows (as token lists) of every rank's microbatches."""
    out = []
    for _ in range(steps):
        rows = [row.tolist() for it in its for _ in range(microbatches) for row in next(it)[0]["input"]]
        out.append(sorted(rows))
    return out


def test_a_step_holds_the_same_rows_on_any_number_of_ranks():
    """2 ranks x batch 2, or 1 rank x 2 microbatches of 2: the same global batches."""
    data = fixture_data(streams=2)
    two_ranks = rows_per_step([iter(loader(data, 0, 2)), iter(loader(data, 1, 2))], steps=4)
    one_rank = rows_per_step([iter(loader(data, 0, 1))], steps=4, microbatches=2)
    assert one_rank == two_ranks


def test_state_saved_on_two_ranks_resumes_on_one():
    data = fixture_data(streams=2, shuffle_buffer=4)
    ranks = [loader(data, 0, 2), loader(data, 1, 2)]
    its = [iter(dl) for dl in ranks]
    for it in its:
        take(it, 3)
    saved = {**ranks[0].state_dict(), **ranks[1].state_dict()}  # DCP's view: the union of both ranks' keys
    expected = rows_per_step(its, steps=3)

    single = loader(data, 0, 1)
    assert set(single.state_dict()) == set(saved)  # the template asks for both streams
    single.load_state_dict(saved)
    assert rows_per_step([iter(single)], steps=3, microbatches=2) == expected


def test_stream_settings_that_cannot_work_are_named():
    with pytest.raises(ValueError, match=r"streams = 2 is not divisible by the 4 data-parallel ranks"):
        loader(fixture_data(streams=2), 0, 4)
    with pytest.raises(ValueError, match=r"gives each of the 1 dp ranks 4 streams, .*local_batch_size = 2"):
        loader(fixture_data(streams=4), 0, 1)
    state = loader(fixture_data(streams=2), 0, 1).state_dict()
    with pytest.raises(ValueError, match="holds 2 data streams but .* streams = 4; resume with --hybrid_data.streams 2"):
        loader(fixture_data(streams=4), 0, 2).load_state_dict(state)


def test_reasoning_prompt_is_ignored_and_think_tags_are_single_tokens():
    for tag, tid in (("<think>", THINK_ID), ("</think>", END_THINK_ID)):
        assert TOKENIZER.encode(tag, add_special_tokens=False).ids == [tid]
    data = fixture_data(web=0.0, code=0.0, reasoning=1.0, shuffle_buffer=0)
    docs = build_documents(data, 0, 1)
    docs.reset()
    doc = next(docs)
    ids, n_prompt, _ = Encoder(TOKENIZER)(doc)
    assert ids[n_prompt] == THINK_ID and END_THINK_ID in ids[n_prompt:]
    assert TOKENIZER.decode(ids[:n_prompt]).strip() == doc["prompt"].strip()

    x, y = next(iter(loader(data)))
    row, labels = x["input"][0], y[0]
    assert row[:n_prompt].tolist() == ids[:n_prompt]
    assert (labels[: n_prompt - 1] == IGNORE_INDEX).all()  # targets that are prompt tokens
    assert labels[n_prompt - 1] == THINK_ID  # the response, from <think> on, is supervised
    response_end = min(len(ids), SEQ_LEN) - 1
    assert (labels[n_prompt - 1 : response_end] != IGNORE_INDEX).all()
    # Wherever <think> is the target (in any document of the batch), it is supervised.
    think_next = x["input"][:, 1:] == THINK_ID
    assert think_next.any() and (y[:, :-1][think_next] == THINK_ID).all()


def write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def local_web(tmp_path: Path, **kw) -> HybridData:
    return replace(
        fixture_data(web=1.0, code=0.0, reasoning=0.0, shuffle_buffer=0, **kw),
        web=TextSource(path=str(tmp_path), data_dir="", weight=1.0),
    )


def test_empty_documents_are_skipped_and_counted(tmp_path):
    texts = ["first document", "", "   ", None, "second document"]
    write_parquet(tmp_path / "a.parquet", pa.table({"text": pa.array(texts, pa.string())}))
    data = local_web(tmp_path)
    source = build_source("web", data.web, data, 0, 1)
    source.reset()
    assert [d["text"] for d in source] == ["first document", "second document"]
    assert source.empty_rows == 3


def test_corrupt_shard_error_names_the_file_or_is_skipped(tmp_path):
    write_parquet(tmp_path / "good.parquet", pa.table({"text": [f"document {i}" for i in range(50)]}))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    with pytest.raises(DataSourceError, match="bad.parquet"):
        next(iter(loader(local_web(tmp_path))))

    data = local_web(tmp_path, skip_bad_shards=True)
    source = build_source("web", data.web, data, 0, 1)
    source.reset()
    assert len(list(source)) == 50 and source.bad_shards == 1


def test_a_small_shard_is_read_once_and_cycles_from_memory(monkeypatch, tmp_path):
    """A shard that fits in one Arrow batch goes through ``datasets`` once; later epochs read it from
    memory and give the documents (and resume states) that reading it again gives. A larger shard
    is read each epoch."""
    from data_pipelines import sources

    write_parquet(tmp_path / "small.parquet", pa.table({"text": [f"small {i}" for i in range(10)]}))
    large = [f"large {i}" for i in range(sources._ARROW_BATCH + 5)]
    write_parquet(tmp_path / "large.parquet", pa.table({"text": large}))
    data = local_web(tmp_path)

    def epochs(source, n: int = 3) -> list[list[str]]:
        out = []
        for _ in range(n):
            source.reset()
            out.append([d["text"] for d in source])
        return out

    reads = Counter()
    cached = build_source("web", data.web, data, 0, 1)
    open_shard = cached._open

    def counting_open(file):
        reads[Path(file).name] += 1
        return open_shard(file)

    monkeypatch.setattr(cached, "_open", counting_open)
    got = epochs(cached)
    assert reads == {"small.parquet": 1, "large.parquet": 3}
    monkeypatch.setattr(sources, "_SMALL_SHARD_BYTES", 0)  # keep nothing: every epoch reads both
    uncached = build_source("web", data.web, data, 0, 1)
    assert got == epochs(uncached) and len(got[0]) == sources._ARROW_BATCH + 15

    # A state taken mid-way through a kept shard resumes (on a source reading from disk) where it was.
    cached.reset()
    while not next(cached)["text"].startswith("small"):
        pass
    state = cached.state_dict()
    rest = [d["text"] for d in cached]
    resumed = build_source("web", data.web, data, 0, 1)
    resumed.reset(state)
    assert [d["text"] for d in resumed] == rest and "small 1" in rest and "small 0" not in rest


def test_missing_field_error_names_file_and_field(tmp_path):
    write_parquet(tmp_path / "shard.parquet", pa.table({"content": ["x = 1\n"] * 4}))
    with pytest.raises(DataSourceError, match=r"shard\.parquet.*missing field.*'text'"):
        next(iter(loader(local_web(tmp_path))))


def test_source_with_no_documents_fails(tmp_path):
    write_parquet(tmp_path / "empty.parquet", pa.table({"text": pa.array(["", None], pa.string())}))
    with pytest.raises(DataSourceError, match="no documents"):
        next(iter(loader(local_web(tmp_path))))


def test_a_missing_local_path_is_named_and_never_sent_to_the_hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataSourceError) as error:
        list_shards("./data/fineweb-edu", "sample/10BT", "[hybrid_data.web]")
    assert str(error.value) == (
        f"[hybrid_data.web] path = './data/fineweb-edu': no such local directory ({tmp_path}/data/fineweb-edu)"
    )


def test_a_hub_id_offline_says_the_hub_cannot_be_reached(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError) as error:
        list_shards("HuggingFaceFW/fineweb-edu", "sample/10BT", "[hybrid_data.web]")
    message = str(error.value)
    assert message.startswith(
        f"[hybrid_data.web] path = 'HuggingFaceFW/fineweb-edu': not a local directory (nothing at "
        f"{tmp_path}/HuggingFaceFW/fineweb-edu), so it was taken for a hub dataset id, and the Hugging Face "
        "hub cannot be reached (OfflineModeIsEnabled: "
    )
    assert "\n" not in message
