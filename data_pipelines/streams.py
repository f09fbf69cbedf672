"""One data stream's documents, rows and batches: what the loader process builds and runs.

Kept apart from ``dataloader`` (TorchTitan's side) so that the loader process imports only
torch, torchdata, tokenizers and datasets: it imports what unpickling its factory names, and
TorchTitan's packages would add seconds to every start before the first batch (BENCHMARKS.md).
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from tokenizers import Tokenizer
from torchdata.nodes import BaseNode, Mapper, MultiNodeWeightedSampler, ParallelMapper, StopCriteria

from titan_hybrid.config.job_config import HybridData, ReasoningSource, TextSource

from .packing import Encoder, Packer, Row, collate
from .shuffle import ShuffleBuffer
from .sources import Doc, ShardSource, list_shards, reasoning_doc, text_doc

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]
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
