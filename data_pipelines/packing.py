"""Tokenizing documents and packing them into fixed-length training rows."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from tokenizers import Tokenizer
from torchdata.nodes import BaseNode

from .sources import END_THINK, THINK, Doc

IGNORE_INDEX = -100
"""Label of an unscored token: torch's cross-entropy default, TorchTitan's ``IGNORE_INDEX``. Not
imported from TorchTitan, whose packages the loader process would then import (``streams``)."""

Encoded = tuple[list[int], int, str]
"""A document's token ids, how many leading ones are unsupervised prompt, and its source."""
Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(input, labels, positions)``, each ``LongTensor[seq_len]``."""


class Encoder:
    """Maps a document to ``(ids, n_prompt)``; picklable, so it runs in process workers too."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, doc: Doc) -> Encoded:
        if "text" in doc:
            return self._ids(doc["text"]), 0, doc["source"]
        prompt = self._ids(doc["prompt"])
        return prompt + self._ids(doc["response"]), len(prompt), doc["source"]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def check_special_tokens(tokenizer: Tokenizer) -> None:
    """Reasoning formatting needs ``<think>``/``</think>`` to encode as one token each."""
    for token in (THINK, END_THINK):
        ids = tokenizer.encode(token, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"tokenizer must encode {token!r} as one token (add it as a special token), got {ids}")


class Packer(BaseNode[Row]):
    """Concatenates encoded documents, each followed by EOS, into rows of ``seq_len + 1`` tokens.

    ``positions`` count from 0 at each document's first token, and also at the start
    of each row: a document continued from the previous row sees nothing before the
    row anyway, and it keeps positions below ``seq_len`` (the RoPE table). Labels are
    the next token, or ``IGNORE_INDEX`` where the next token is prompt. Documents that
    encode to no tokens are dropped and counted in ``empty_docs``. ``row_sources`` counts the
    input tokens of the last row by document source (the data mix actually served). With
    ``pad_last`` (finite sources: evaluation) the tokens left when the source ends make one more
    row, padded with EOS whose labels are ``IGNORE_INDEX``; otherwise they are dropped.
    """

    SOURCE, IDS, SUPERVISED, STARTS, SOURCES = "source", "ids", "supervised", "starts", "sources"

    def __init__(self, source: BaseNode[Encoded], seq_len: int, eos_id: int, pad_last: bool = False):
        super().__init__()
        self.source, self.seq_len, self.eos_id, self.pad_last = source, seq_len, eos_id, pad_last
        self.empty_docs = 0
        self.row_sources: Counter[str] = Counter()

    def reset(self, initial_state: dict[str, Any] | None = None):
        super().reset(initial_state)
        if initial_state is not None:
            self.source.reset(initial_state[self.SOURCE])
            self._ids = list(initial_state[self.IDS])
            self._supervised = list(initial_state[self.SUPERVISED])
            self._starts = list(initial_state[self.STARTS])
            # States saved before sources were tracked: their buffered tokens count as unknown.
            self._sources = list(initial_state.get(self.SOURCES, [""] * len(self._ids)))
        else:
            self.source.reset(None)
            self._ids, self._supervised, self._starts, self._sources = [], [], [], []

    def next(self) -> Row:
        n = self.seq_len + 1
        while len(self._ids) < n:
            try:
                ids, n_prompt, source = next(self.source)
            except StopIteration:
                if not self.pad_last or len(self._ids) < 2:
                    raise
                pad = n - len(self._ids)
                self._ids += [self.eos_id] * pad
                self._supervised += [False] * pad
                self._starts += [False] * pad
                self._sources += [""] * pad
                continue
            if not ids:
                self.empty_docs += 1
                continue
            self._ids += ids + [self.eos_id]
            self._supervised += [False] * n_prompt + [True] * (len(ids) - n_prompt + 1)
            self._starts += [True] + [False] * len(ids)
            self._sources += [source] * (len(ids) + 1)
        tokens = torch.tensor(self._ids[:n])
        supervised = torch.tensor(self._supervised[:n])
        starts = torch.tensor(self._starts[:n])
        self.row_sources = Counter(self._sources[: self.seq_len])
        del self._ids[:n], self._supervised[:n], self._starts[:n], self._sources[:n]

        labels = torch.where(supervised[1:], tokens[1:], IGNORE_INDEX)
        starts[0] = True
        steps = torch.arange(self.seq_len)
        last_start = torch.cummax(torch.where(starts[:-1], steps, 0), dim=0).values
        return tokens[:-1], labels, steps - last_start

    def get_state(self) -> dict[str, Any]:
        return {
            self.SOURCE: self.source.state_dict(),
            self.IDS: list(self._ids),
            self.SUPERVISED: list(self._supervised),
            self.STARTS: list(self._starts),
            self.SOURCES: list(self._sources),
        }


def collate(rows: list[Row]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """TorchTitan's batch contract: ``({"input", "positions"}, labels)``, each ``[B, seq_len]``."""
    inputs, labels, positions = (torch.stack(t) for t in zip(*rows))
    return {"input": inputs, "positions": positions}, labels
