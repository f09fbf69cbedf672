"""What a model carries from one generated token to the next, and what its prefill is told.

Each recurrent mixer (``g``, ``d``, ``2``, ``k``) keeps an fp32 matrix state per head (and the
delta-rule mixers the last ``conv_size - 1`` inputs of their short convolutions): its size does
not grow with the sequence. Attention keeps a KV cache, bounded by ``attn_window`` when set.
Every tensor is allocated once and updated in place, so a decode step can be captured in a
CUDA graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Prompt:
    """A batch of left-padded prompts, described as packed documents.

    Row ``b`` holds ``lengths[b]`` real tokens at its end. The padding is a document of its
    own and the prompt starts a new one, so the training code's document masking keeps the
    padding out of every attention score, recurrent state and short convolution.
    """

    positions: Tensor  # [B, T]: 0 at the prompt's first token (and at the row start)
    lengths: Tensor  # [B]
    capacity: int  # tokens the KV caches must hold: longest prompt + new tokens
    rope: Tensor  # RoPE table for ``capacity`` positions

    @classmethod
    def left_padded(cls, lengths: Tensor, width: int, capacity: int, rope: Tensor) -> Prompt:
        if int(lengths.min()) < 1 or int(lengths.max()) > width:
            raise ValueError(f"prompt lengths must be in [1, {width}], got {lengths.tolist()}")
        if capacity < width or rope.shape[0] < capacity:
            raise ValueError(f"capacity {capacity} must hold the prompts ({width}) and the RoPE table ({rope.shape[0]})")
        idx = torch.arange(width, device=lengths.device).expand(lengths.shape[0], width)
        pad = (width - lengths).unsqueeze(1)
        positions = torch.where(idx < pad, idx, idx - pad)
        return cls(positions=positions, lengths=lengths, capacity=capacity, rope=rope)

    @property
    def resets(self) -> Tensor:
        return self.positions == 0

    @property
    def doc_ids(self) -> Tensor:
        return self.resets.cumsum(dim=1)

    @property
    def in_prompt(self) -> Tensor:
        """``[B, T]``: True at the real (non-padding) tokens."""
        width = self.positions.shape[1]
        return torch.arange(width, device=self.positions.device) >= (width - self.lengths).unsqueeze(1)


@dataclass
class RecurrentState:
    """A linear-attention mixer's state: ``ssm [B, H, K, V]`` fp32, and for the delta-rule
    mixers the q / k / v convolution windows ``[B, conv_size - 1, channels]``."""

    ssm: Tensor
    conv: list[Tensor] = field(default_factory=list)

    def tensors(self) -> list[Tensor]:
        return [self.ssm, *self.conv]


@dataclass
class KVCache:
    """Rotated keys and values ``[B, KV, slots, D]``, stacked in one buffer ``kv [2, B, KV, slots, D]``
    so that a decode step writes both with one kernel. Position ``p`` lives in slot ``p % slots``:
    with a window the slots are a ring of ``attn_window`` entries, otherwise ``slots`` is the
    capacity and never wraps. With an attention sink, slot 0 before them holds the sink key
    (value 0), so one masked attention over the cache includes it."""

    kv: Tensor

    @property
    def k(self) -> Tensor:
        return self.kv[0]

    @property
    def v(self) -> Tensor:
        return self.kv[1]

    def tensors(self) -> list[Tensor]:
        """Views with the batch first (what snapshots, beam reordering and byte counts walk)."""
        return [self.k, self.v]


@dataclass
class DecodeState:
    """Per layer its state, plus each row's next position and the RoPE table."""

    layers: list[RecurrentState | KVCache]
    positions: Tensor  # [B]: position of the next token
    rope: Tensor

    def tensors(self) -> Iterator[Tensor]:
        yield self.positions
        for layer in self.layers:
            yield from layer.tensors()

    def nbytes(self) -> int:
        """Bytes of what grows or is carried per sequence (the layers' states, not the RoPE table)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def snapshot(self) -> list[Tensor]:
        return [t.clone() for t in self.tensors()]

    def restore(self, snapshot: list[Tensor]) -> None:
        for t, saved in zip(self.tensors(), snapshot, strict=True):
            t.copy_(saved)

    @property
    def capacity(self) -> int:
        """Positions the state can hold (the RoPE table's length; the KV caches are sized to it)."""
        return self.rope.shape[0]

    def reorder_cache(self, rows: Tensor) -> None:
        """Keep row ``rows[i]`` as row ``i`` (Hugging Face beam search calls this after each step)."""
        for t in self.tensors():
            t.copy_(t.index_select(0, rows.to(t.device)))
