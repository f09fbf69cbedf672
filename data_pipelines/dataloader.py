"""The ``[hybrid_data]`` loader: seeded mixing, shuffling, tokenizing and packing on torchdata.nodes.

Per dp rank: shard sources -> weighted mix -> shuffle buffer -> tokenizer workers
(in order) -> packer -> batches. Everything before the tokenizer workers runs in one
thread, so a rank's stream depends only on the seed and ``(dp_rank, dp_world_size)``,
never on ``num_workers``; every node is stateful, so a checkpoint resumes it exactly.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import torch
from tokenizers import Tokenizer
from torchdata.nodes import (
    BaseNode,
    Batcher,
    Loader,
    Mapper,
    MultiNodeWeightedSampler,
    ParallelMapper,
    Prefetcher,
    StopCriteria,
)
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import JobConfig

from titan_hybrid.config.job_config import HybridData, ReasoningSource, TextSource

from .packing import Encoder, Packer, check_special_tokens, collate
from .shuffle import ShuffleBuffer
from .sources import Doc, ShardSource, list_shards, reasoning_doc, text_doc

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def build_source(
    name: str, cfg: TextSource | ReasoningSource, data: HybridData, dp_rank: int, dp_world_size: int
) -> ShardSource:
    if isinstance(cfg, ReasoningSource):
        columns = [cfg.prompt_field, cfg.reasoning_field, cfg.answer_field]
        to_doc = reasoning_doc(name, *columns)
    else:
        columns = [cfg.text_field]
        to_doc = text_doc(name, cfg.text_field)
    return ShardSource(
        name,
        list_shards(cfg.path, cfg.data_dir),
        columns,
        to_doc,
        seed=data.seed,
        rank=dp_rank,
        world_size=dp_world_size,
        skip_bad_shards=data.skip_bad_shards,
    )


def build_documents(data: HybridData, dp_rank: int, dp_world_size: int) -> BaseNode[Doc]:
    """The rank's shuffled document stream, before tokenization."""
    sources = {"web": data.web, "code": data.code, "reasoning": data.reasoning}
    weights = {name: float(cfg.weight) for name, cfg in sources.items() if cfg.weight > 0}
    if not weights:
        raise ValueError("[hybrid_data]: every source has weight 0")
    nodes = {name: build_source(name, sources[name], data, dp_rank, dp_world_size) for name in weights}
    # rank/world_size only vary the mixing seed; the sources above do the sharding.
    docs: BaseNode[Doc] = MultiNodeWeightedSampler(
        nodes,
        weights,
        stop_criteria=StopCriteria.CYCLE_FOREVER,
        rank=dp_rank,
        world_size=dp_world_size,
        seed=data.seed,
    )
    if data.shuffle_buffer > 1:
        docs = ShuffleBuffer(docs, data.shuffle_buffer, seed=data.seed)
    return docs


def build_batches(
    data: HybridData,
    tokenizer: Tokenizer,
    eos_id: int,
    seq_len: int,
    batch_size: int,
    dp_rank: int,
    dp_world_size: int,
) -> BaseNode[Batch]:
    if data.reasoning.weight > 0:
        check_special_tokens(tokenizer)
    docs = build_documents(data, dp_rank, dp_world_size)
    encoder = Encoder(tokenizer)
    if data.num_workers > 0:
        if data.worker_method not in ("thread", "process"):
            raise ValueError(f"[hybrid_data] worker_method must be 'thread' or 'process', got {data.worker_method!r}")
        encoded = ParallelMapper(docs, encoder, data.num_workers, in_order=True, method=data.worker_method)
    else:
        encoded = Mapper(docs, encoder)
    rows = Packer(encoded, seq_len, eos_id)
    batches = Mapper(Batcher(rows, batch_size, drop_last=True), collate)
    return Prefetcher(batches, prefetch_factor=2)


class HybridDataLoader(BaseDataLoader):
    """Iterates ``({"input", "positions"}, labels)`` batches; state keyed by dp rank like TorchTitan's."""

    def __init__(self, root: BaseNode[Batch], dp_rank: int, dp_world_size: int):
        self._root = root
        self._loader = Loader(root)
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self._rank_key = f"dp_rank_{dp_rank}"

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._loader)

    def state_dict(self) -> dict[str, Any]:
        # One opaque blob per rank, as TorchTitan's loader stores it, rather than DCP flattening
        # the nested node state (generator tensors, token buffers) into many entries.
        return {self._rank_key: pickle.dumps(self._loader.state_dict()), "world_size": self.dp_world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._rank_key not in state_dict:
            raise KeyError(f"dataloader state has no entry for {self._rank_key}")
        if state_dict["world_size"] != self.dp_world_size:
            raise ValueError(
                f"dataloader state was saved with {state_dict['world_size']} dp ranks, "
                f"resuming with {self.dp_world_size}: resharding the stream is not supported"
            )
        # A fresh Loader: DCP calls state_dict() first (as a template), and a torchdata Loader
        # hands the iterator made for that to the next iter() without applying loaded state.
        self._loader = Loader(self._root)
        self._loader.load_state_dict(pickle.loads(state_dict[self._rank_key]))


def build_hybrid_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: HuggingFaceTokenizer | None,
    job_config: JobConfig,
) -> HybridDataLoader:
    """TorchTitan ``build_dataloader_fn`` for ``[hybrid_data]``; tokenizer from ``[model] hf_assets_path``."""
    if tokenizer is None or tokenizer.eos_id is None:
        raise ValueError("[hybrid_data] needs a tokenizer with an EOS token ([model] hf_assets_path)")
    root = build_batches(
        job_config.hybrid_data,
        tokenizer.tokenizer,
        tokenizer.eos_id,
        seq_len=job_config.training.seq_len,
        batch_size=job_config.training.local_batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
    )
    return HybridDataLoader(root, dp_rank, dp_world_size)
