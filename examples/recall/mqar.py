"""Multi-query associative recall (MQAR; Arora et al., 2023, "Zoology").

A row is ``k1 v1 k2 v2 ... kN vN  q1 q2 ... qM``: N key-value pairs with distinct keys, then
M distinct keys drawn from those pairs. At each ``q_i`` the model must output the value
paired with it; only those M positions are scored. The answers are never shown, so no
query can be solved by elimination from earlier answers. Keys and values use disjoint
token ranges, so the vocabulary is ``key_vocab + value_vocab``.

Answering needs the whole key -> value table at once: attention looks it up, while a
linear-attention layer must squeeze it into its fixed-size state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
"""Target at unscored positions (``F.cross_entropy``'s default ``ignore_index``)."""


@dataclass(frozen=True)
class MQARTask:
    n_pairs: int
    n_queries: int
    key_vocab: int
    value_vocab: int

    def __post_init__(self) -> None:
        if not 0 < self.n_pairs <= self.key_vocab:
            raise ValueError(f"n_pairs = {self.n_pairs} must lie in [1, key_vocab = {self.key_vocab}]")
        if not 0 < self.n_queries <= self.n_pairs:
            raise ValueError(f"n_queries = {self.n_queries} must lie in [1, n_pairs = {self.n_pairs}]")
        if self.value_vocab < 2:
            raise ValueError(f"value_vocab = {self.value_vocab} must be at least 2")

    @property
    def vocab_size(self) -> int:
        return self.key_vocab + self.value_vocab

    @property
    def seq_len(self) -> int:
        return 2 * self.n_pairs + self.n_queries

    @property
    def chance(self) -> float:
        """Recall of a model that knows answers are values but not which one."""
        return 1 / self.value_vocab

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens, targets``, both ``[batch_size, seq_len]`` int64; targets are ``IGNORE``
        except at the query positions, where they hold the paired value. Made on the generator's
        device."""
        B, N, M = batch_size, self.n_pairs, self.n_queries
        rng = dict(generator=generator, device=generator.device)
        keys = torch.rand(B, self.key_vocab, **rng).argsort(dim=1)[:, :N]
        values = self.key_vocab + torch.randint(self.value_vocab, (B, N), **rng)
        picked = torch.rand(B, N, **rng).argsort(dim=1)[:, :M]
        queries, answers = keys.gather(1, picked), values.gather(1, picked)
        tokens = torch.cat([torch.stack([keys, values], dim=2).flatten(1), queries], dim=1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, 2 * N :] = answers
        return tokens, targets
