"""A sample shuffle buffer whose position is a few integers, so resuming is exact and cheap."""

from __future__ import annotations

import random
from typing import Any, TypeVar

from torchdata.nodes import BaseNode

T = TypeVar("T")


class ShuffleBuffer(BaseNode[T]):
    """Shuffles a stream through ``size`` slots, block by block.

    The stream is cut into blocks of ``size`` items. While block ``k`` is emitted in
    the order of a permutation seeded by ``(seed, k)``, each emitted slot is refilled
    with the next item of block ``k + 1``. The state is the source's state at the
    start of block ``k`` plus how many items of block ``k`` were emitted: loading it
    re-reads that block (and the refills) instead of storing ``size`` documents in
    every checkpoint, which a reservoir-style buffer would need to resume exactly.
    """

    SOURCE, BLOCK, POS = "source_at_block_start", "block", "pos"

    def __init__(self, source: BaseNode[T], size: int, seed: int | str):
        super().__init__()
        if size < 2:
            raise ValueError(f"shuffle buffer size must be >= 2, got {size}")
        self.source, self.size, self.seed = source, size, seed

    def reset(self, initial_state: dict[str, Any] | None = None):
        super().reset(initial_state)
        state = initial_state or {self.SOURCE: None, self.BLOCK: 0, self.POS: 0}
        self.source.reset(state[self.SOURCE])
        self._block_start = self.source.state_dict()
        self._block, self._pos = state[self.BLOCK], 0
        self._exhausted = False
        # Block k's item j sits where block k-1's j-th emitted item was.
        slots = self._perm(self._block - 1) if self._block > 0 else range(self.size)
        self._slots: list[T | None] = [None] * self.size
        for slot in slots:
            self._slots[slot] = self._read()
        self._order = self._perm(self._block)
        for _ in range(state[self.POS]):
            self._step()

    def next(self) -> T:
        while True:
            if self._exhausted and all(item is None for item in self._slots):
                raise StopIteration
            item = self._step()
            if item is not None:
                return item

    def get_state(self) -> dict[str, Any]:
        return {self.SOURCE: self._block_start, self.BLOCK: self._block, self.POS: self._pos}

    def _step(self) -> T | None:
        """Emit the next slot of the current block and refill it from the next block."""
        if self._pos == self.size:
            self._block, self._pos = self._block + 1, 0
            self._block_start = self._next_block_start
            self._order = self._perm(self._block)
        if self._pos == 0:
            self._next_block_start = self.source.state_dict()
        slot = self._order[self._pos]
        item, self._slots[slot] = self._slots[slot], self._read()
        self._pos += 1
        return item

    def _read(self) -> T | None:
        if self._exhausted:
            return None
        try:
            return next(self.source)
        except StopIteration:
            self._exhausted = True
            return None

    def _perm(self, block: int) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}/{block}").shuffle(order)
        return order
