"""Train one small HybridLM on MQAR and measure its recall on a fixed held-out set.

Every pattern is trained on the same stream of fresh random rows (seeded) and scored on
the same held-out rows, so patterns differ only in their sequence mixers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titan_hybrid.models.hybrid import HybridLM, HybridModelArgs

from .mqar import IGNORE, MQARTask


@dataclass
class RecallConfig:
    pattern: str = "gggA"
    """Layer mixers; tiled to ``n_layers`` when its length divides it."""
    n_pairs: int = 64
    n_queries: int = 64
    key_vocab: int = 64
    """Keys are drawn out of this many; equal to ``n_pairs``, every row holds every key, so each
    key embedding is trained on every row and the lookup is learned sooner (measured)."""
    value_vocab: int = 64
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 8
    """16 dims per head: a GLA layer's state is 8 heads x 16 x 16, far too few key directions
    for 64 keys, while attention keeps every pair."""
    ffn_dim: int = 256
    gla_gate_logit_normalizer: float = 1.0
    """fla's default of 16 starts GLA with a decay near 1 per token; learning the fast decay that
    ties each value to the key just before it then takes thousands of steps more (measured)."""
    steps: int = 5000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    eval_size: int = 1000
    eval_every: int = 500
    stop_at_recall: float | None = None
    """End training at the first evaluation with at least this recall."""
    seed: int = 0
    device: str = "cpu"

    @property
    def task(self) -> MQARTask:
        return MQARTask(self.n_pairs, self.n_queries, self.key_vocab, self.value_vocab)

    def model_args(self) -> HybridModelArgs:
        pattern = self.pattern
        if self.n_layers % len(pattern) == 0:
            pattern *= self.n_layers // len(pattern)
        return HybridModelArgs(
            dim=self.dim,
            n_layers=self.n_layers,
            pattern=pattern,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            vocab_size=self.task.vocab_size,
            ffn_dim=self.ffn_dim,
            max_seq_len=self.task.seq_len,
            gla_gate_logit_normalizer=self.gla_gate_logit_normalizer,
            document_masking=False,
        )


def value_loss_and_hits(
    logits: torch.Tensor, targets: torch.Tensor, task: MQARTask
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the value tokens at the scored positions, and how many are exact.

    Only value logits compete: with tied embeddings, a softmax over the whole vocabulary
    would push every key embedding away from each answer, towards one shared direction,
    which blurs the keys that the lookup must tell apart.
    """
    scored = targets != IGNORE
    logits = logits[scored][:, task.key_vocab :].float()
    values = targets[scored] - task.key_vocab
    return F.cross_entropy(logits, values), (logits.argmax(-1) == values).sum()


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def recall(
    model: HybridLM, task: MQARTask, tokens: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> float:
    """Exact-match accuracy over all scored positions of the held-out rows."""
    model.eval()
    hits = 0
    for i in range(0, len(tokens), batch_size):
        with autocast(tokens.device):
            logits = model(tokens[i : i + batch_size])
        hits += value_loss_and_hits(logits, targets[i : i + batch_size], task)[1].item()
    model.train()
    return hits / (targets != IGNORE).sum().item()


def train(cfg: RecallConfig, log: Callable[[str], None] = print) -> dict[str, float | int | str]:
    """Train ``cfg.pattern`` and return its record: pattern, params, steps, recall, chance, seconds."""
    device = torch.device(cfg.device)
    task = cfg.task
    model_args = cfg.model_args()
    torch.manual_seed(cfg.seed)
    model = HybridLM(model_args).to(device)
    model.init_weights()
    params = sum(p.numel() for p in model.parameters())
    log(f"{model_args.pattern}: {params:,} parameters")

    train_gen = torch.Generator(device).manual_seed(cfg.seed)
    eval_tokens, eval_targets = task.sample(cfg.eval_size, torch.Generator(device).manual_seed(cfg.seed + 1))
    # No weight decay: every row is fresh, so there is nothing to overfit.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_factor(step: int) -> float:
        """Linear warmup, then cosine decay to zero."""
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.perf_counter()
    score = 0.0
    for step in range(1, cfg.steps + 1):
        tokens, targets = task.sample(cfg.batch_size, train_gen)
        with autocast(device):
            loss, _ = value_loss_and_hits(model(tokens), targets, task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            score = recall(model, task, eval_tokens, eval_targets, cfg.batch_size)
            log(
                f"{model_args.pattern} step {step:6d}  loss {loss.item():.4f}  recall {score:.4f}"
                f"  {time.perf_counter() - start:.0f}s"
            )
            if cfg.stop_at_recall is not None and score >= cfg.stop_at_recall:
                break
    return {
        "pattern": model_args.pattern,
        "params": params,
        "steps": step,
        "recall": score,
        "chance": task.chance,
        "seconds": time.perf_counter() - start,
    }
