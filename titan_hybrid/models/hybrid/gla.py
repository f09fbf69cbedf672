"""Gated Linear Attention layer (Yang et al., 2024) around ``titan_hybrid.ops.gla``.

Same structure as fla's ``GatedLinearAttention`` layer (low-rank data-dependent
decay, swish output gate, per-head RMSNorm), but calling the op directly so the
CPU path works: fla's layers need a GPU. No RoPE: the decay carries position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titan_hybrid.ops.gla import chunk_gla, fused_recurrent_gla

from .args import HybridModelArgs
from .decode_state import Prompt, RecurrentState


class GatedLinearAttention(nn.Module):
    def __init__(self, args: HybridModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.key_dim, self.value_dim = args.gla_key_dim, args.gla_value_dim
        self.gate_logit_normalizer = args.gla_gate_logit_normalizer
        self.q_proj = nn.Linear(args.dim, self.key_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, self.key_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, self.value_dim, bias=False)
        self.g_proj = nn.Linear(args.dim, self.value_dim, bias=False)
        self.gk_down = nn.Linear(args.dim, args.gla_gate_low_rank_dim, bias=False)
        self.gk_up = nn.Linear(args.gla_gate_low_rank_dim, self.key_dim, bias=True)
        self.o_norm = nn.RMSNorm(self.value_dim // self.n_heads, eps=args.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, args.dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.gk_down, self.gk_up):
            nn.init.trunc_normal_(linear.weight, std=std)
        nn.init.zeros_(self.gk_up.bias)
        self.o_norm.reset_parameters()
        nn.init.trunc_normal_(self.o_proj.weight, std=out_std)

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v and the log-decay ``gk`` (fp32) as ``[B, T, H, K|V]`` heads."""
        B, T, _ = x.shape
        heads = lambda t: t.view(B, T, self.n_heads, -1)  # noqa: E731
        gk = F.logsigmoid(self.gk_up(self.gk_down(x)).float()) / self.gate_logit_normalizer
        return heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), heads(gk)

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        o = self.o_norm(o) * F.silu(self.g_proj(x).view(B, T, self.n_heads, -1))
        return self.o_proj(o.reshape(B, T, self.value_dim))

    def forward(self, x: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
        return self._output(chunk_gla(*self._inputs(x), resets=resets), x)

    def prefill(self, x: torch.Tensor, prompt: Prompt) -> tuple[torch.Tensor, RecurrentState]:
        """The training forward over left-padded prompts, keeping each row's final state."""
        o, ssm = chunk_gla(*self._inputs(x), resets=prompt.resets, output_final_state=True)
        return self._output(o, x), RecurrentState(ssm=ssm)

    def empty_state(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> RecurrentState:
        H = self.n_heads
        return RecurrentState(ssm=torch.zeros(batch, H, self.key_dim // H, self.value_dim // H, device=device))

    def step(self, x: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """One token per row ``x [B, 1, dim]``; the state advances in place."""
        return self._output(fused_recurrent_gla(*self._inputs(x), state.ssm), x)
