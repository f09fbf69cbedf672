"""Grokking on modular addition (a + b mod p) with GrokAdamW.

A one-layer transformer reads ``a b =`` and predicts ``(a + b) mod p`` at ``=``. Trained on half
of all p*p pairs, it fits the training set within a few hundred steps and only later, pushed by
weight decay (and sped up by the Grokfast filter), generalises to the other half.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from titan_hybrid.optim import GrokAdamW, param_groups


@dataclass
class GrokkingConfig:
    p: int = 97
    train_fraction: float = 0.5
    dim: int = 128
    n_layers: int = 1
    n_heads: int = 4
    batch_size: int = 512
    steps: int = 10_000
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 1.0
    warmup_steps: int = 10
    cautious: bool = True
    grokfast: bool = True
    grokfast_alpha: float = 0.98
    grokfast_lambda: float = 2.0
    eval_every: int = 50
    stop_at_val_acc: float | None = None
    """Stop at the first evaluation with validation accuracy at least this."""
    seed: int = 0


def modular_addition_split(
    p: int, train_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs (a, b) as ``[a, b, =]`` token rows with label (a+b) mod p, split at random."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)  # token p is "="
    y = (a + b) % p
    perm = torch.randperm(p * p, generator=generator)
    n_train = round(train_fraction * p * p)
    train, val = perm[:n_train], perm[n_train:]
    return x[train], y[train], x[val], y[val]


class TinyTransformer(nn.Module):
    """Pre-norm transformer encoder over three tokens; logits are read at the last one."""

    def __init__(self, vocab: int, n_classes: int, dim: int, n_layers: int, n_heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(3, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, n_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.tok(x) + self.pos)
        return self.head(self.norm(h[:, -1]))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


def train(cfg: GrokkingConfig, log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train and return one record per evaluation: step, train/val accuracy, loss, seconds."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_tr, y_tr, x_va, y_va = modular_addition_split(cfg.p, cfg.train_fraction, gen)
    model = TinyTransformer(cfg.p + 1, cfg.p, cfg.dim, cfg.n_layers, cfg.n_heads)
    opt = GrokAdamW(
        param_groups(model, cfg.weight_decay, decay_embeddings=True),
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        cautious=cfg.cautious,
        grokfast=cfg.grokfast,
        grokfast_alpha=cfg.grokfast_alpha,
        grokfast_lambda=cfg.grokfast_lambda,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1))
    )
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(x_tr), (cfg.batch_size,), generator=gen)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec = {
                "step": step,
                "loss": loss.item(),
                "train_acc": accuracy(model, x_tr, y_tr),
                "val_acc": accuracy(model, x_va, y_va),
                "seconds": time.perf_counter() - start,
            }
            history.append(rec)
            log(
                f"step {step:6d}  loss {rec['loss']:.4f}  train_acc {rec['train_acc']:.4f}"
                f"  val_acc {rec['val_acc']:.4f}  {rec['seconds']:.0f}s"
            )
            if cfg.stop_at_val_acc is not None and rec["val_acc"] >= cfg.stop_at_val_acc:
                break
    return history
