"""Held-out data for ``[hybrid_validation]``: per source, the same documents, packing and prompt
masking as training, in a fixed order, split across dp ranks.

A source is scored on its ``[hybrid_validation.<source>]`` split when ``path`` is set, else on
its ``[hybrid_data.<source>] holdout`` shards (which training never reads). Every validation
starts again from the beginning, so each one scores the same rows, and it touches neither the
training loader nor any global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator

from tokenizers import Tokenizer
from torchdata.nodes import Mapper
from torchtitan.config import JobConfig

from .packing import Encoder, Packer, check_special_tokens, collate
from .sources import ShardSource, list_shards
from .streams import SOURCES, Batch, DataConfigError, document_columns, holdout_shards, source_of


def validation_files(job_config: JobConfig, name: str) -> list[str]:
    """The shards scored for source ``name``; errors name the section and key to fix."""
    if name not in SOURCES:
        raise DataConfigError(
            f"[hybrid_validation] sources: unknown source {name!r}; the sources are {', '.join(SOURCES)}"
        )
    split = getattr(job_config.hybrid_validation, name)
    if split.path:
        return list_shards(split.path, split.data_dir, f"[hybrid_validation.{name}]")
    held = holdout_shards(name, source_of(job_config.hybrid_data, name))
    if not held:
        raise DataConfigError(
            f"[hybrid_validation] sources lists {name!r}, which has no held-out data: set "
            f"[hybrid_validation.{name}] path (and data_dir), or [hybrid_data.{name}] holdout"
        )
    return held


class ValidationSet:
    """One source's held-out rows on one dp rank, in batches of ``batch_size``; iterating starts over."""

    def __init__(
        self, name: str, files: list[str], job_config: JobConfig, tokenizer: Tokenizer, eos_id: int,
        dp_rank: int, dp_world_size: int,
    ):  # fmt: skip
        data, validation = job_config.hybrid_data, job_config.validation
        columns, to_doc = document_columns(name, source_of(data, name))
        shards = ShardSource(name, files, columns, to_doc, seed=data.seed, rank=dp_rank, world_size=dp_world_size)
        self.name, self.files, self.batch_size = name, files, validation.local_batch_size
        self.rows = Packer(Mapper(shards, Encoder(tokenizer)), validation.seq_len, eos_id, pad_last=True)
        self.rows.reset()
        self._start = self.rows.state_dict()

    def __iter__(self) -> Iterator[Batch]:
        self.rows.reset(self._start)
        while True:
            rows = []
            for _ in range(self.batch_size):
                try:
                    rows.append(next(self.rows))
                except StopIteration:
                    break
            if not rows:
                return
            yield collate(rows)


def build_validation_sets(
    job_config: JobConfig, tokenizer: Tokenizer, eos_id: int, dp_rank: int, dp_world_size: int
) -> dict[str, ValidationSet]:
    names = job_config.hybrid_validation.sources
    if not names:
        raise DataConfigError("[validation] enable = true needs held-out data: set [hybrid_validation] sources")
    if "reasoning" in names:
        check_special_tokens(tokenizer)
    files = {name: validation_files(job_config, name) for name in names}
    return {
        name: ValidationSet(name, files[name], job_config, tokenizer, eos_id, dp_rank, dp_world_size)
        for name in names
    }
