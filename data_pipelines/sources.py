"""Reading one corpus: Parquet shards from the hub or a local directory, as a stateful node.

Hub and local sources share everything after file listing: each shard is streamed
with ``datasets`` in Arrow batches, so resuming mid-shard skips whole batches
without decoding them to Python.
"""

from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

from datasets import load_dataset
from torchdata.nodes import BaseNode

logger = logging.getLogger(__name__)

Row = dict[str, Any]
Doc = dict[str, str]
"""``{"source": name, "text": ...}`` or ``{"source": name, "prompt": ..., "response": ...}``."""

THINK, END_THINK = "<think>", "</think>"
_ARROW_BATCH = 1024
# A shard that fits in one Arrow batch of at most this many bytes is read once and kept: a small
# corpus cycles epoch after epoch (with more ranks than shards, a pass yields a few documents), and
# each pass through ``datasets`` costs ~1-2 ms of opening and schema work before its first row.
_SMALL_SHARD_BYTES = 4 << 20
_SMALL_SHARDS_BYTES = 16 << 20  # per source and stream (every stream keeps its own)


class DataSourceError(RuntimeError):
    """A shard cannot be used; the message names the source and the file."""


def _looks_local(path: str) -> bool:
    """Hub dataset ids are ``name`` or ``org/name``; anything else can only be a local path."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def _unreachable(error: Exception) -> bool:
    """Whether the hub could not be reached: offline mode (a ConnectionError) or a transport error
    of its HTTP client (httpx's, which shares no base class with OSError)."""
    return any(c.__name__ in ("ConnectionError", "TransportError", "TimeoutError") for c in type(error).__mro__)


def list_shards(path: str, data_dir: str, section: str) -> list[str]:
    """Sorted ``**/*.parquet`` under ``path/data_dir``; ``path`` is a local directory or a hub dataset id.

    ``section`` (e.g. ``[hybrid_data.web]``) heads every error, which names the path, where it
    was looked for locally and why the hub did not answer, in one line.
    """
    local = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(local):
        root = os.path.join(local, data_dir)
        files = sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True))
    elif _looks_local(path):
        raise DataSourceError(f"{section} path = {path!r}: no such local directory ({local})")
    else:
        from huggingface_hub import HfFileSystem

        root = f"datasets/{path}/{data_dir}".rstrip("/")
        try:
            files = sorted(f"hf://{f}" for f in HfFileSystem().glob(f"{root}/**/*.parquet"))
        except Exception as e:  # noqa: BLE001 - the hub client's errors have no common base
            why = "the Hugging Face hub cannot be reached" if _unreachable(e) else "the hub cannot list it"
            first_line = (str(e).splitlines() or [""])[0]
            raise DataSourceError(
                f"{section} path = {path!r}: not a local directory (nothing at {local}), so it was taken "
                f"for a hub dataset id, and {why} ({type(e).__name__}: {first_line})"
            ) from None
    if not files:
        raise DataSourceError(f"{section} path / data_dir: no .parquet files under '{root}'")
    return files


def _text(value: Any) -> str:
    """Field value as text: lists contribute their first element, missing values are empty."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else ""


def text_doc(name: str, text_field: str) -> Callable[[Row], Doc | None]:
    def to_doc(row: Row) -> Doc | None:
        text = _text(row[text_field])
        return {"source": name, "text": text} if text.strip() else None

    return to_doc


def reasoning_doc(name: str, prompt_field: str, reasoning_field: str, answer_field: str) -> Callable[[Row], Doc | None]:
    """``prompt`` (unsupervised) then ``<think> reasoning </think> answer``."""

    def to_doc(row: Row) -> Doc | None:
        prompt, reasoning = _text(row[prompt_field]), _text(row[reasoning_field])
        if not prompt.strip() or not reasoning.strip():
            return None
        response = f"{THINK}\n{reasoning.strip()}\n{END_THINK}\n\n{_text(row[answer_field]).strip()}"
        return {"source": name, "prompt": f"{prompt.strip()}\n\n", "response": response}

    return to_doc


class ShardSource(BaseNode[Doc]):
    """One rank's share of a corpus, cycled forever with a fresh shard order each epoch.

    Shard order is shuffled by ``(seed, name, epoch)``, the same on every rank. With at
    least as many shards as ranks each rank reads whole shards (``order[rank::world]``);
    otherwise every rank reads every shard and keeps rows ``rank::world``. Either way the
    ranks' documents are disjoint and the split does not depend on loader workers.
    Rows that make no document (empty text) are skipped and counted in ``empty_rows``.
    """

    EPOCH, SHARD, ROW = "epoch", "shard", "row"

    def __init__(
        self,
        name: str,
        files: list[str],
        columns: list[str],
        to_doc: Callable[[Row], Doc | None],
        *,
        seed: int,
        rank: int,
        world_size: int,
        skip_bad_shards: bool = False,
    ):
        super().__init__()
        self.name, self.files, self.columns, self.to_doc = name, files, columns, to_doc
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.skip_bad_shards = skip_bad_shards
        self.bad_shards = 0
        self.empty_rows = 0
        self._datasets: dict[str, Any] = {}
        self._small_shards: dict[str, Any] = {}  # file -> its one Arrow table (``_tables``)
        self._started = False

    def reset(self, initial_state: dict[str, Any] | None = None):
        super().reset(initial_state)
        if initial_state is not None:
            self._epoch = initial_state[self.EPOCH]
            self._shard, self._row = initial_state[self.SHARD], initial_state[self.ROW]
        else:
            self._epoch = self._epoch + 1 if self._started else 0
            self._shard, self._row = 0, 0
        self._started = False
        self._docs = self._iter_docs()

    def next(self) -> Doc:
        self._started = True
        return next(self._docs)

    def get_state(self) -> dict[str, Any]:
        return {self.EPOCH: self._epoch, self.SHARD: self._shard, self.ROW: self._row}

    def _epoch_shards(self) -> tuple[list[str], int]:
        """This rank's shards for the epoch, and the row stride inside each."""
        order = list(self.files)
        random.Random(f"{self.seed}/{self.name}/{self._epoch}").shuffle(order)
        if len(order) >= self.world_size:
            return order[self.rank :: self.world_size], 1
        return order, self.world_size

    def _iter_docs(self) -> Iterator[Doc]:
        shards, stride = self._epoch_shards()
        yielded = self._row > 0 or self._shard > 0
        while self._shard < len(shards):
            for doc in self._read_shard(shards[self._shard], stride):
                yielded = True
                yield doc
            self._shard, self._row = self._shard + 1, 0
        if not yielded:
            raise DataSourceError(
                f"source '{self.name}': no documents for dp rank {self.rank} of {self.world_size} "
                f"in {len(self.files)} shard(s) (bad shards skipped: {self.bad_shards})"
            )

    def _read_shard(self, file: str, stride: int) -> Iterator[Doc]:
        """Documents of one shard from row ``self._row`` on, keeping ``self._row`` the next row to read."""
        if self._row == 0:
            self._row = self.rank if stride > 1 else 0
        try:
            start = 0
            for table in self._tables(file):
                end = start + table.num_rows
                if self._row < end:  # else resuming: skip the batch undecoded
                    missing = [c for c in self.columns if c not in table.column_names]
                    if missing:
                        raise DataSourceError(
                            f"source '{self.name}': {file}: missing field(s) {missing}; "
                            f"columns are {table.column_names}"
                        )
                    rows = table.select(self.columns).to_pylist()
                    for i in range(self._row, end, stride):
                        self._row = i + stride
                        doc = self.to_doc(rows[i - start])
                        if doc is None:
                            self.empty_rows += 1
                            continue
                        yield doc
                start = end
        except DataSourceError as e:
            self._on_bad_shard(file, e)
        except Exception as e:  # pyarrow / datasets read errors: name the file
            self._on_bad_shard(
                file, DataSourceError(f"source '{self.name}': cannot read {file}: {type(e).__name__}: {e}")
            )

    def _tables(self, file: str) -> Iterator[Any]:
        """The shard's Arrow tables of ``_ARROW_BATCH`` rows (the last one shorter). A first table
        shorter than that is the whole shard: a small one (``_SMALL_SHARD_BYTES``) is kept, up to
        ``_SMALL_SHARDS_BYTES`` of them, and later passes read it from memory."""
        if file in self._small_shards:
            yield self._small_shards[file]
            return
        for index, table in enumerate(self._open(file).iter(batch_size=_ARROW_BATCH)):
            if index == 0 and table.num_rows < _ARROW_BATCH and table.nbytes <= _SMALL_SHARD_BYTES:
                kept = sum(t.nbytes for t in self._small_shards.values())
                if kept + table.nbytes <= _SMALL_SHARDS_BYTES:
                    self._small_shards[file] = table
            yield table

    def _on_bad_shard(self, file: str, error: DataSourceError) -> None:
        if not self.skip_bad_shards:
            raise error
        self.bad_shards += 1
        self._datasets.pop(file, None)
        self._small_shards.pop(file, None)
        logger.warning(f"{error}; skipped ({self.bad_shards} bad shard(s) in '{self.name}' so far)")

    def _open(self, file: str):
        """The shard as a streaming ``datasets`` dataset yielding Arrow tables (opened once)."""
        if file not in self._datasets:
            ds = load_dataset("parquet", data_files=[file], split="train", streaming=True)
            self._datasets[file] = ds.with_format("arrow")
        return self._datasets[file]
