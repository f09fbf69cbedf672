"""Gated Linear Attention layer (Yang et al., 2024) around ``titan_hybrid.ops.gla``.

Same structure as fla's ``GatedLinearAttention`` layer (low-rank data-dependent
decay, swish output gate, per-head RMSNorm), but calling the op directly so the
CPU path works: fla's layers need a GPU. No RoPE: the decay carries position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titan_hybrid.ops.decode_linear import GatedHeads, PreNormed, norm_eps
from titan_hybrid.ops.gla import chunk_gla, fused_recurrent_gla

from .args import HybridModelArgs
from .decode_state import Prompt, RecurrentState
from .fused import LinearGroup, apply


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
        self.input_group: LinearGroup | None = None  # fuse_projections()
        self.output_group: LinearGroup | None = None

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.gk_down, self.gk_up):
            nn.init.trunc_normal_(linear.weight, std=std)
        nn.init.zeros_(self.gk_up.bias)
        self.o_norm.reset_parameters()
        nn.init.trunc_normal_(self.o_proj.weight, std=out_std)

    def fuse_projections(self) -> None:
        """Inference: q, k, v, the output gate and the decay's logits as one GEMM, the decay's
        low-rank pair multiplied out (``gk_up.weight @ gk_down.weight``, computed in fp32): a
        latency-bound decode step runs one GEMM per layer fewer for 1 MB more weights (308M dims).
        Both groups run the decode GEMM, whose q/k/v blocks come out contiguous for fla's kernel,
        and the log-decay's ``logsigmoid`` runs in its epilogue."""
        decay = self.gk_up.weight.float() @ self.gk_down.weight.float()
        self.input_group = LinearGroup(
            [self.q_proj, self.k_proj, self.v_proj, self.g_proj], extra=decay,
            decay=(self.gk_up.bias, 1.0 / self.gate_logit_normalizer),
        )  # fmt: skip
        self.output_group = LinearGroup([self.o_proj])

    def _inputs(self, x: torch.Tensor | PreNormed) -> tuple[torch.Tensor, ...]:
        """q, k, v, the log-decay ``gk`` (fp32) and the output gate as ``[B, T, H, K|V]`` heads
        (of ``RMSNorm(x)`` for a ``PreNormed`` decode stream, which takes the fused GEMM)."""
        B, T, _ = x.shape
        heads = lambda t: t.view(B, T, self.n_heads, -1)  # noqa: E731
        if self.input_group is None:
            q, k, v, gate, down = (lin(x) for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.gk_down))
            gk = F.logsigmoid(self.gk_up(down).float()) / self.gate_logit_normalizer
        else:
            q, k, v, gate, gk = self.input_group(x)
        return heads(q), heads(k), heads(v), heads(gk), heads(gate)

    def _heads(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The output projection's input ``[B, T, value_dim]``: normed, gated heads."""
        B, T = o.shape[:2]
        return (self.o_norm(o) * F.silu(gate)).reshape(B, T, self.value_dim)

    def _output(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return apply(self._heads(o, gate), self.o_proj, self.output_group)

    def forward(self, x: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
        *qkvg, gate = self._inputs(x)
        return self._output(chunk_gla(*qkvg, resets=resets), gate)

    def prefill(self, x: torch.Tensor, prompt: Prompt) -> tuple[torch.Tensor, RecurrentState]:
        """The training forward over left-padded prompts, keeping each row's final state."""
        *qkvg, gate = self._inputs(x)
        o, ssm = chunk_gla(*qkvg, resets=prompt.resets, output_final_state=True)
        return self._output(o, gate), RecurrentState(ssm=ssm)

    def empty_state(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> RecurrentState:
        H = self.n_heads
        return RecurrentState(ssm=torch.zeros(batch, H, self.key_dim // H, self.value_dim // H, device=device))

    def step(self, x: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """One token per row ``x [B, 1, dim]``; the state advances in place."""
        heads = self.step_heads(x, state)
        return apply(self._heads(heads.o, heads.gate), self.o_proj, self.output_group)

    def step_heads(self, x: torch.Tensor | PreNormed, state: RecurrentState) -> GatedHeads:
        """``step`` up to the output projection: the recurrent output before its norm and gate,
        which a fused block's output projection applies as it loads them."""
        q, k, v, gk, gate = self._inputs(x)
        # fla's kernel wants contiguous heads: the fused decode GEMM writes them so (no copy); unfused,
        # the copies happen here, where a compiled step folds them into Inductor's kernels.
        o = fused_recurrent_gla(q.contiguous(), k.contiguous(), v.contiguous(), gk, state.ssm)
        return GatedHeads(o, gate, self.o_norm.weight, norm_eps(self.o_norm))
