"""Loss, perplexity and bits per byte of scored text: the accounting validation and evaluation share.

``bpb = summed target-token NLL (nats) / ln 2 / UTF-8 bytes of the targets' text``. Bits per
byte compares models with different tokenizers, which loss per token cannot. The bytes of a
target token come from the vocabulary: a byte-level BPE token stands for exactly the bytes its
symbols map back to (GPT-2's byte <-> unicode table), so over a text's encoding they add up to
``len(text.encode("utf-8"))`` (the tokenizer has no normalizer); an added token found in the
text (``<think>``) stands for its content; the EOS the packer appends after each document
stands for no text, 0 bytes, while its NLL still counts (ending a document is part of the text's
model, and this keeps one NLL sum for loss and bpb). Prompt tokens (``IGNORE_INDEX`` labels)
are not scored: neither their NLL nor their bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss


def _byte_of_symbol() -> dict[str, int]:
    """GPT-2's table from the printable symbol of each byte back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[chr(b)] = b
        else:
            symbols[chr(256 + extra)] = b
            extra += 1
    return symbols


def token_byte_lengths(tokenizer: Tokenizer, eos_id: int, size: int | None = None) -> torch.Tensor:
    """UTF-8 bytes each token id stands for, ``LongTensor[size]`` (ids past the vocabulary: 0)."""
    symbols = _byte_of_symbol()
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    lengths = torch.zeros(max(size or 0, max(vocab.values()) + 1), dtype=torch.long)
    for token, i in vocab.items():
        if token in added:
            lengths[i] = len(token.encode("utf-8"))
        elif all(c in symbols for c in token):
            lengths[i] = len(token)  # one symbol per byte
        else:
            raise ValueError(f"bits per byte needs a byte-level BPE tokenizer; token {i} {token!r} is not byte-level")
    lengths[eos_id] = 0
    return lengths


def batch_totals(nll_sum: torch.Tensor, labels: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """``[summed NLL, scored tokens, scored bytes]`` of a batch, float64, so ranks reduce it in one call."""
    scored = labels[labels != IGNORE_INDEX]
    return torch.stack([nll_sum.detach().double(), scored.new_tensor(scored.numel()).double(),
                        token_bytes.to(labels.device)[scored].sum().double()])  # fmt: skip


@dataclass(frozen=True)
class Totals:
    nll: float
    """Summed NLL in nats."""
    tokens: int
    bytes: int

    @classmethod
    def of(cls, totals: torch.Tensor) -> Totals:
        nll, tokens, n_bytes = totals.tolist()
        return cls(nll, int(tokens), int(n_bytes))

    @classmethod
    def total(cls, parts: list[Totals]) -> Totals:
        return cls(sum(t.nll for t in parts), sum(t.tokens for t in parts), sum(t.bytes for t in parts))

    def metrics(self) -> dict[str, float]:
        loss = self.nll / self.tokens if self.tokens else math.nan
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bpb": self.nll / math.log(2) / self.bytes if self.bytes else math.nan,
        }


def summed_nll(model: torch.nn.Module, input_dict: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """A batch's summed target NLL as training computes it: the fused output projection + loss when the
    model has ``loss_chunk_tokens``, else TorchTitan's cross-entropy on the logits."""
    kwargs = {k: v for k, v in input_dict.items() if k != "input"}
    if getattr(model, "model_args", None) is not None and model.model_args.loss_chunk_tokens:
        return model(input_dict["input"], labels=labels, **kwargs)
    return cross_entropy_loss(model(input_dict["input"], **kwargs), labels)
