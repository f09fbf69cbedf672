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

import pickle
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from tokenizers import Tokenizer
from torchdata.nodes import Loader, Prefetcher
from torchdata.nodes.loader import LoaderIterator
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import JobConfig

from titan_hybrid.config.job_config import HybridData

from .packing import check_special_tokens
from .prefetch import ProcessPrefetcher
from .streams import (  # noqa: F401 - SOURCES, DataConfigError, streams_of_rank: this module's API too
    SOURCE_TOKENS,
    SOURCES,
    Batch,
    DataConfigError,
    StreamBatcher,
    build_stream_batcher,
    streams_of_rank,
)

STREAM_KEY = "stream_{}"
NUM_STREAMS_KEY = "num_streams"


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
