"""The ``[hybrid_data]`` loader: seeded mixing, shuffling, tokenizing and packing on torchdata.nodes.

The data is split into ``[hybrid_data] streams`` independent streams, fixed for a run
and decoupled from the number of dp ranks: shard sources -> weighted mix -> shuffle
buffer -> tokenizer workers (in order) -> packer, per stream. A dp rank reads the
streams ``rank, rank + W, ...`` and fills each batch round-robin from them. So the
rows of a global step are the same whatever the dp world size ``W``, a stream
depends only on the seed and its index (never on ``num_workers``), and a checkpoint
stores each stream's position under its own key: a run saved on one world size
resumes on another (any ``W`` that divides ``streams``) without repeating or
skipping a sample. The same idea as MosaicML Streaming's "canonical nodes".
"""

from __future__ import annotations

import fnmatch
import pickle
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from tokenizers import Tokenizer
from torchdata.nodes import (
    BaseNode,
    Loader,
    Mapper,
    MultiNodeWeightedSampler,
    ParallelMapper,
    Prefetcher,
    StopCriteria,
)
from torchdata.nodes.loader import LoaderIterator
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import JobConfig

from titan_hybrid.config.job_config import HybridData, ReasoningSource, TextSource

from .packing import Encoder, Packer, Row, check_special_tokens, collate
from .prefetch import ProcessPrefetcher
from .shuffle import ShuffleBuffer
from .sources import Doc, ShardSource, list_shards, reasoning_doc, text_doc

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]
STREAM_KEY = "stream_{}"
NUM_STREAMS_KEY = "num_streams"
SOURCES = ("web", "code", "reasoning")
"""The ``[hybrid_data]`` sources, in the order of the per-source token counts."""
SOURCE_TOKENS = "source_tokens"
"""Batch key (taken off by ``HybridDataLoader``) of the batch's input tokens per source."""


class DataConfigError(ValueError):
    """The ``[hybrid_data]`` settings cannot work with the run's parallelism; the message names the keys."""


def streams_of_rank(num_streams: int, dp_rank: int, dp_world_size: int, local_batch_size: int) -> list[int]:
    """The streams dp rank ``dp_rank`` reads; checks that every stream feeds each batch equally."""
    if num_streams % dp_world_size:
        raise DataConfigError(
            f"[hybrid_data] streams = {num_streams} is not divisible by the {dp_world_size} data-parallel ranks; "
            "choose a multiple of every dp world size the run may use (keep it fixed for the whole run)"
        )
    per_rank = num_streams // dp_world_size
    if local_batch_size % per_rank:
        raise DataConfigError(
            f"[hybrid_data] streams = {num_streams} gives each of the {dp_world_size} dp ranks {per_rank} streams, "
            f"which must divide training.local_batch_size = {local_batch_size}"
        )
    return list(range(dp_rank, num_streams, dp_world_size))


def source_of(data: HybridData, name: str) -> TextSource | ReasoningSource:
    if name not in SOURCES:
        raise DataConfigError(f"unknown data source {name!r}; the sources are {', '.join(SOURCES)}")
    return getattr(data, name)


def holdout_shards(name: str, cfg: TextSource | ReasoningSource) -> list[str]:
    """The source's shards named by ``holdout`` (each pattern must match one at least)."""
    files = list_shards(cfg.path, cfg.data_dir, f"[hybrid_data.{name}]")
    held = []
    for pattern in cfg.holdout:
        matches = [f for f in files if fnmatch.fnmatch(f, f"*/{pattern}")]
        if not matches:
            raise DataConfigError(
                f"[hybrid_data.{name}] holdout: {pattern!r} matches no shard under {cfg.path}/{cfg.data_dir}"
            )
        held += [f for f in matches if f not in held]
    return held


def training_shards(name: str, cfg: TextSource | ReasoningSource) -> list[str]:
    """The source's shards less its ``holdout``."""
    held = set(holdout_shards(name, cfg))
    files = [f for f in list_shards(cfg.path, cfg.data_dir, f"[hybrid_data.{name}]") if f not in held]
    if not files:
        raise DataConfigError(f"[hybrid_data.{name}] holdout holds out every shard; keep one at least for training")
    return files


def document_columns(name: str, cfg: TextSource | ReasoningSource):
    """The Parquet columns a source reads and the function that makes them a document."""
    if isinstance(cfg, ReasoningSource):
        columns = [cfg.prompt_field, cfg.reasoning_field, cfg.answer_field]
        return columns, reasoning_doc(name, *columns)
    return [cfg.text_field], text_doc(name, cfg.text_field)


def build_source(
    name: str, cfg: TextSource | ReasoningSource, data: HybridData, stream: int, num_streams: int
) -> ShardSource:
    columns, to_doc = document_columns(name, cfg)
    return ShardSource(
        name,
        training_shards(name, cfg),
        columns,
        to_doc,
        seed=data.seed,
        rank=stream,
        world_size=num_streams,
        skip_bad_shards=data.skip_bad_shards,
    )


def build_documents(data: HybridData, stream: int, num_streams: int) -> BaseNode[Doc]:
    """One stream's shuffled documents, before tokenization."""
    sources = {name: source_of(data, name) for name in SOURCES}
    weights = {name: float(cfg.weight) for name, cfg in sources.items() if cfg.weight > 0}
    if not weights:
        raise ValueError("[hybrid_data]: every source has weight 0")
    nodes = {name: build_source(name, sources[name], data, stream, num_streams) for name in weights}
    # rank/world_size only vary the mixing seed; the sources above do the sharding.
    docs: BaseNode[Doc] = MultiNodeWeightedSampler(
        nodes,
        weights,
        stop_criteria=StopCriteria.CYCLE_FOREVER,
        rank=stream,
        world_size=num_streams,
        seed=data.seed,
    )
    if data.shuffle_buffer > 1:
        docs = ShuffleBuffer(docs, data.shuffle_buffer, seed=f"{data.seed}/{stream}")
    return docs


def build_stream(
    data: HybridData, tokenizer: Tokenizer, eos_id: int, seq_len: int, stream: int, num_streams: int
) -> BaseNode[Row]:
    """One stream's packed rows (tokenized in ``num_workers`` threads, or inline when 0)."""
    docs = build_documents(data, stream, num_streams)
    encoder = Encoder(tokenizer)
    if data.num_workers > 0:
        if data.worker_method not in ("thread", "process"):
            raise DataConfigError(
                f"[hybrid_data] worker_method must be 'thread' or 'process', got {data.worker_method!r}"
            )
        encoded = ParallelMapper(docs, encoder, data.num_workers, in_order=True, method=data.worker_method)
    else:
        encoded = Mapper(docs, encoder)
    return Packer(encoded, seq_len, eos_id)


class StreamBatcher(BaseNode[Batch]):
    """Batches of ``batch_size`` rows taken round-robin from a rank's streams.

    Each batch starts again at the rank's first stream, and the number of streams
    divides the batch size (``streams_of_rank`` checks it), so every batch (and every
    step) holds the same number of rows from each stream: the state is just each
    stream's own position.
    """

    STREAMS = "streams"

    def __init__(self, streams: dict[int, BaseNode[Row]], batch_size: int):
        super().__init__()
        self.streams = streams
        self._order = [streams[i] for i in sorted(streams)] * (batch_size // len(streams))

    def reset(self, initial_state: dict[str, Any] | None = None):
        super().reset(initial_state)
        for stream_id, node in self.streams.items():
            node.reset(initial_state[self.STREAMS][stream_id] if initial_state is not None else None)

    def next(self) -> Batch:
        rows, served = [], torch.zeros(len(SOURCES), dtype=torch.long)
        for node in self._order:
            rows.append(next(node))
            served += torch.tensor([node.row_sources[name] for name in SOURCES])
        input_dict, labels = collate(rows)
        input_dict[SOURCE_TOKENS] = served
        return input_dict, labels

    def get_state(self) -> dict[str, Any]:
        return {self.STREAMS: {stream_id: node.state_dict() for stream_id, node in self.streams.items()}}


def build_stream_batcher(
    data: HybridData, tokenizer: Tokenizer, eos_id: int, seq_len: int, batch_size: int, stream_ids: list[int]
) -> StreamBatcher:
    """The batches of the given streams, built where they are read (also in a loader process)."""
    streams = {i: build_stream(data, tokenizer, eos_id, seq_len, i, data.streams) for i in stream_ids}
    return StreamBatcher(streams, batch_size)


def build_batches(
    data: HybridData,
    tokenizer: Tokenizer,
    eos_id: int,
    seq_len: int,
    batch_size: int,
    stream_ids: list[int],
    prefetch: int = 2,
) -> Prefetcher[Batch] | ProcessPrefetcher[Batch]:
    """A rank's batches (of its ``streams_of_rank``), produced up to ``prefetch`` ahead by one
    background thread or process.

    One producer for all of the rank's streams: a thread per stream measured 16% slower
    training on an H100 (8 streams; BENCHMARKS.md), its Python threads taking the GIL
    from the training loop; ``[hybrid_data] loader = "process"`` takes the rest of the
    loader's Python work out of the training process.
    """
    if data.reasoning.weight > 0:
        check_special_tokens(tokenizer)
    build = partial(build_stream_batcher, data, tokenizer, eos_id, seq_len, batch_size, stream_ids)
    if data.loader == "process":
        return ProcessPrefetcher(build, prefetch)
    if data.loader == "thread":
        return Prefetcher(build(), prefetch_factor=prefetch)
    raise DataConfigError(f"[hybrid_data] loader must be 'process' or 'thread', got {data.loader!r}")


class HybridDataLoader(BaseDataLoader):
    """Iterates ``({"input", "positions"}, labels)`` batches; its state is one entry per stream.

    Each stream's position is one opaque blob (rather than DCP flattening the nested
    node state into many entries), keyed by stream so that any dp world size can load it.
    ``served_tokens`` counts the input tokens handed out per source (``SOURCES`` order) since
    the loader was built: the data mix actually trained on.
    """

    def __init__(self, root: Prefetcher[Batch] | ProcessPrefetcher[Batch], num_streams: int, stream_ids: list[int]):
        self._root = root
        self._loader = Loader(root)
        self.num_streams = num_streams
        self.stream_ids = stream_ids
        self.served_tokens = torch.zeros(len(SOURCES), dtype=torch.long)

    def __iter__(self) -> Iterator[Batch]:
        for input_dict, labels in self._loader:
            self.served_tokens += input_dict.pop(SOURCE_TOKENS)
            yield input_dict, labels

    def state_dict(self) -> dict[str, Any]:
        # Either prefetcher's state is the snapshot of its source taken with the last batch handed out.
        prefetched = self._loader.state_dict()[LoaderIterator.ROOT_KEY]
        streams = prefetched[ProcessPrefetcher.SNAPSHOT][StreamBatcher.STREAMS]
        state: dict[str, Any] = {STREAM_KEY.format(i): pickle.dumps(s) for i, s in streams.items()}
        state[NUM_STREAMS_KEY] = self.num_streams
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        saved = state_dict.get(NUM_STREAMS_KEY)
        if saved != self.num_streams:
            raise DataConfigError(
                f"the dataloader state holds {saved} data streams but [hybrid_data] streams = {self.num_streams}; "
                f"resume with --hybrid_data.streams {saved}"
            )
        missing = [i for i in self.stream_ids if STREAM_KEY.format(i) not in state_dict]
        if missing:
            raise KeyError(f"dataloader state has no entry for stream(s) {missing}")
        streams = {i: pickle.loads(state_dict[STREAM_KEY.format(i)]) for i in self.stream_ids}
        prefetched = {
            ProcessPrefetcher.SNAPSHOT: {StreamBatcher.STREAMS: streams},
            ProcessPrefetcher.STEPS_SINCE_SNAPSHOT: 0,
        }
        # A fresh Loader: DCP calls state_dict() first (as a template), and a torchdata Loader
        # hands the iterator made for that to the next iter() without applying loaded state.
        self._loader = Loader(self._root)
        self._loader.load_state_dict({LoaderIterator.ROOT_KEY: prefetched, LoaderIterator.NUM_YIELDED_KEY: 0})


def build_hybrid_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: HuggingFaceTokenizer | None,
    job_config: JobConfig,
) -> HybridDataLoader:
    """TorchTitan ``build_dataloader_fn`` for ``[hybrid_data]``; tokenizer from ``[model] hf_assets_path``."""
    if tokenizer is None or tokenizer.eos_id is None:
        raise ValueError("[hybrid_data] needs a tokenizer with an EOS token ([model] hf_assets_path)")
    data, training = job_config.hybrid_data, job_config.training
    # TorchTitan takes a whole step's micro-batches at its start: keep two steps' worth ready.
    rows_per_step = training.global_batch_size if training.global_batch_size > 0 else training.local_batch_size
    micro_batches = max(1, rows_per_step // (training.local_batch_size * dp_world_size))
    stream_ids = streams_of_rank(data.streams, dp_rank, dp_world_size, training.local_batch_size)
    root = build_batches(
        data,
        tokenizer.tokenizer,
        tokenizer.eos_id,
        seq_len=training.seq_len,
        batch_size=training.local_batch_size,
        stream_ids=stream_ids,
        prefetch=2 * micro_batches,
    )
    if isinstance(root, ProcessPrefetcher):
        # TorchTitan builds the loader before the model: the loader process starts up meanwhile.
        root.start()
    return HybridDataLoader(root, data.streams, stream_ids)
