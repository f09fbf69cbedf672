"""Delta-rule mixers: Gated DeltaNet (``d``), GDN-2 (``2``) and GDN-2 with a Kaczmarz step (``k``).

Structured like fla's ``GatedDeltaNet`` / ``GatedDeltaNet2`` layers (q/k/v
projections, short causal convolutions with SiLU, data-dependent decay and
write gates, per-head RMSNorm output gated by SiLU(g_proj(x))), but calling
``titan_hybrid.ops`` directly, so the CPU path works: fla's layers need a GPU.
The short convolutions restart at document boundaries, like the recurrent
state (fla's ``cu_seqlens`` varlen mode). No RoPE: the decay carries position.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titan_hybrid.ops.common import l2norm
from titan_hybrid.ops.gated_delta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from titan_hybrid.ops.gdn2 import chunk_gdn2, chunk_gdn2_kla, fused_recurrent_gdn2, fused_recurrent_gdn2_kla

from .args import HybridModelArgs
from .decode_state import Prompt, RecurrentState


def tokens_since_doc_start(resets: Tensor) -> Tensor:
    """``[B, T]`` offset of each token from the start of its document (row start counts as one)."""
    idx = torch.arange(resets.shape[1], device=resets.device).expand_as(resets)
    starts = torch.where(resets, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - starts


class ShortConv(nn.Module):
    """Causal depthwise convolution + SiLU over ``[B, T, C]``, never reaching into a previous document.

    Written as a sum of shifted copies (one per tap, masked where the tap would
    cross a document start) rather than ``F.conv1d``, because the mask depends
    on both the output position and the tap.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))  # tap j sees x[t - (K - 1) + j]

    def init_weights(self) -> None:
        bound = 1 / math.sqrt(self.weight.shape[1])  # nn.Conv1d's default, as fla's ShortConvolution
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, since_start: Tensor | None) -> Tensor:
        T, K = x.shape[1], self.weight.shape[1]
        padded = F.pad(x, (0, 0, K - 1, 0))
        out = padded[:, K - 1 :] * self.weight[:, K - 1]
        for lag in range(1, K):
            tap = padded[:, K - 1 - lag : K - 1 - lag + T] * self.weight[:, K - 1 - lag]
            if since_start is not None:
                tap = tap * (since_start >= lag).unsqueeze(-1).to(tap.dtype)
            out = out + tap
        return F.silu(out)

    def prompt_window(self, x: Tensor, prompt: Prompt) -> Tensor:
        """The last ``K - 1`` inputs of each prompt ``[B, K - 1, C]``, zeros before its start
        (a tap that crosses the document start is masked, i.e. sees a zero)."""
        T, K = x.shape[1], self.weight.shape[1]
        x = x * prompt.in_prompt.unsqueeze(-1).to(x.dtype)
        return F.pad(x, (0, 0, K - 1, 0))[:, T:].clone()

    def step(self, x: Tensor, window: Tensor) -> Tensor:
        """One token ``x [B, 1, C]`` after the ``window [B, K - 1, C]`` before it (shifted in place)."""
        taps = torch.cat([window, x], dim=1)  # tap j holds x[t - (K - 1) + j]
        window.copy_(taps[:, 1:])
        return F.silu((taps * self.weight.t()).sum(dim=1, keepdim=True))


def _init_decay(A_log: nn.Parameter, dt_bias: nn.Parameter, a_min: float) -> None:
    """fla's init: A ~ U(a_min, 16) per head; softplus(dt_bias) log-uniform in [1e-3, 0.1]."""
    with torch.no_grad():
        A_log.copy_(torch.empty_like(A_log).uniform_(a_min, 16).log())
        dt = torch.exp(torch.rand_like(dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


class DeltaRuleMixer(nn.Module, ABC):
    """What the three delta-rule layers share; subclasses build the gates and call their op in ``mix``."""

    def __init__(self, args: HybridModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.key_dim = args.n_heads * args.delta_key_head_dim
        self.value_dim = args.n_heads * args.delta_value_head_dim
        self.q_proj = nn.Linear(args.dim, self.key_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, self.key_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, self.value_dim, bias=False)
        self.q_conv = ShortConv(self.key_dim, args.conv_size)
        self.k_conv = ShortConv(self.key_dim, args.conv_size)
        self.v_conv = ShortConv(self.value_dim, args.conv_size)
        self.g_proj = nn.Linear(args.dim, self.value_dim, bias=False)
        self.o_norm = nn.RMSNorm(args.delta_value_head_dim, eps=args.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, args.dim, bias=False)

    @abstractmethod
    def gate_projections(self) -> list[nn.Linear]:
        """Linear layers that compute gates from x; initialised like the q/k/v projections."""

    @abstractmethod
    def init_decay(self) -> None:
        """Initialise the decay parameters (``A_log``, ``dt_bias``)."""

    @abstractmethod
    def mix(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, resets: Tensor | None, output_final_state: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The recurrence on ``[B, T, H, K|V]`` heads (after the convolutions); gates come from ``x``.
        With ``output_final_state`` also each row's final state (the prompt's prefill)."""

    @abstractmethod
    def mix_step(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, ssm: Tensor) -> Tensor:
        """One token of the recurrence from ``ssm [B, H, K, V]`` (updated in place)."""

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, *self.gate_projections()):
            nn.init.trunc_normal_(linear.weight, std=std)
        for conv in (self.q_conv, self.k_conv, self.v_conv):
            conv.init_weights()
        self.init_decay()
        self.o_norm.reset_parameters()
        nn.init.trunc_normal_(self.o_proj.weight, std=out_std)

    def heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.n_heads, -1))

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        o = self.o_norm(o) * F.silu(self.heads(self.g_proj(x)))
        return self.o_proj(o.flatten(-2))

    def _convolved(self, x: Tensor, resets: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
        """The q / k / v projections of ``x``, and their convolved heads ``[B, T, H, K|V]``."""
        since_start = None if resets is None else tokens_since_doc_start(resets)
        projected = [proj(x) for proj in (self.q_proj, self.k_proj, self.v_proj)]
        convs = (self.q_conv, self.k_conv, self.v_conv)
        return projected, [self.heads(conv(p, since_start)) for conv, p in zip(convs, projected)]

    def forward(self, x: Tensor, resets: Tensor | None) -> Tensor:
        _, (q, k, v) = self._convolved(x, resets)
        return self._output(self.mix(x, q, k, v, resets), x)

    def prefill(self, x: Tensor, prompt: Prompt) -> tuple[Tensor, RecurrentState]:
        """The training forward over left-padded prompts, keeping each row's final recurrent state
        and the inputs its convolutions need next."""
        projected, (q, k, v) = self._convolved(x, prompt.resets)
        o, ssm = self.mix(x, q, k, v, prompt.resets, output_final_state=True)
        convs = (self.q_conv, self.k_conv, self.v_conv)
        windows = [conv.prompt_window(p, prompt) for conv, p in zip(convs, projected)]
        return self._output(o, x), RecurrentState(ssm=ssm, conv=windows)

    def empty_state(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> RecurrentState:
        H, taps = self.n_heads, self.q_conv.weight.shape[1] - 1
        ssm = torch.zeros(batch, H, self.key_dim // H, self.value_dim // H, device=device)
        conv = [torch.zeros(batch, taps, c, dtype=dtype, device=device) for c in (self.key_dim, self.key_dim, self.value_dim)]
        return RecurrentState(ssm=ssm, conv=conv)

    def step(self, x: Tensor, state: RecurrentState) -> Tensor:
        """One token per row ``x [B, 1, dim]``; the states advance in place."""
        convs = (self.q_conv, self.k_conv, self.v_conv)
        projs = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (self.heads(c.step(p(x), w)) for c, p, w in zip(convs, projs, state.conv))
        return self._output(self.mix_step(x, q, k, v, state.ssm), x)


class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet (Yang et al., 2025): per-head decay g = -exp(A_log) softplus(a_proj(x) + dt_bias),
    write strength beta = sigmoid(b_proj(x)); q and k L2-normalised."""

    def __init__(self, args: HybridModelArgs):
        super().__init__(args)
        self.a_proj = nn.Linear(args.dim, args.n_heads, bias=False)
        self.b_proj = nn.Linear(args.dim, args.n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(args.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(args.n_heads))

    def gate_projections(self) -> list[nn.Linear]:
        return [self.a_proj, self.b_proj]

    def init_decay(self) -> None:
        _init_decay(self.A_log, self.dt_bias, a_min=0.0)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head log-decay g (fp32) and write strength beta ``[B, T, H]``."""
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return g, self.b_proj(x).sigmoid()

    def mix(self, x, q, k, v, resets, output_final_state=False):
        return chunk_gated_delta_rule(
            q, k, v, *self.gates(x), resets=resets, use_qk_l2norm=True, output_final_state=output_final_state
        )

    def mix_step(self, x, q, k, v, ssm):
        return fused_recurrent_gated_delta_rule(q, k, v, *self.gates(x), ssm, use_qk_l2norm=True)


class GatedDeltaNet2(DeltaRuleMixer):
    """GDN-2: per-channel decay g = -exp(A_log[h]) softplus(f(x) + dt_bias) through a low-rank
    (head value dim) bottleneck, erase gate b = sigmoid(b_proj(x)) per key channel, write gate
    w = sigmoid(w_proj(x)) per value channel; q and k L2-normalised (fla's ``GatedDeltaNet2``)."""

    def __init__(self, args: HybridModelArgs):
        super().__init__(args)
        rank = args.delta_value_head_dim
        self.f_down = nn.Linear(args.dim, rank, bias=False)
        self.f_up = nn.Linear(rank, self.key_dim, bias=False)
        self.b_proj = nn.Linear(args.dim, self.key_dim, bias=False)
        self.w_proj = nn.Linear(args.dim, self.value_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(args.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.key_dim))

    def gate_projections(self) -> list[nn.Linear]:
        return [self.f_down, self.f_up, self.b_proj, self.w_proj]

    def init_decay(self) -> None:
        _init_decay(self.A_log, self.dt_bias, a_min=1.0)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Log-decay g and erase gate b ``[B, T, H, K]``, write gate w ``[B, T, H, V]``."""
        g = self.heads(F.softplus(self.f_up(self.f_down(x)).float() + self.dt_bias.float()))
        g = -self.A_log.float().exp().unsqueeze(-1) * g
        return g, self.heads(self.b_proj(x).sigmoid()), self.heads(self.w_proj(x).sigmoid())

    def mix(self, x, q, k, v, resets, output_final_state=False):
        return chunk_gdn2(q, k, v, *self.gates(x), resets=resets, use_qk_l2norm=True, output_final_state=output_final_state)

    def mix_step(self, x, q, k, v, ssm):
        return fused_recurrent_gdn2(q, k, v, *self.gates(x), ssm, use_qk_l2norm=True)


class KaczmarzGDN2(GatedDeltaNet2):
    """GDN-2 whose erase and write gates are scaled by eta / (||k||^2 + kla_eps), eta = sigmoid(eta_proj(x))
    per head: each write is a relaxed Kaczmarz projection onto k -> v. Keys stay raw (the step needs
    their norm); queries are L2-normalised as in GDN-2."""

    def __init__(self, args: HybridModelArgs):
        super().__init__(args)
        self.eta_proj = nn.Linear(args.dim, args.n_heads, bias=False)
        self.eps = args.kla_eps

    def gate_projections(self) -> list[nn.Linear]:
        return [*super().gate_projections(), self.eta_proj]

    def mix(self, x, q, k, v, resets, output_final_state=False):
        eta = self.eta_proj(x).sigmoid()
        return chunk_gdn2_kla(
            l2norm(q).type_as(q), k, v, *self.gates(x), eta, eps=self.eps, resets=resets,
            output_final_state=output_final_state,
        )  # fmt: skip

    def mix_step(self, x, q, k, v, ssm):
        eta = self.eta_proj(x).sigmoid()
        return fused_recurrent_gdn2_kla(l2norm(q).type_as(q), k, v, *self.gates(x), eta, ssm, eps=self.eps)
