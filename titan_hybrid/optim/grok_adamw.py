"""GrokAdamW: AdamW with a cautious update and an optional Grokfast gradient filter.

Per parameter, with g its gradient at step t:

- Grokfast (optional): ``mu <- alpha*mu + (1-alpha)*g;  g <- g + lambda*mu``. Amplifying the slow
  (EMA) component of the gradient speeds up generalisation on algorithmic tasks (Lee et al., 2024).
- Adam moments of g, bias-corrected update ``u = m_hat / (sqrt(v_hat) + eps)``.
- Cautious (optional): ``mask = 1[u*g > 0];  u <- u*mask / mean(mask)``, keeping only the
  components whose sign agrees with the (filtered) gradient and rescaling to the same average
  step size (Liang et al., 2024). ``mean`` is over the whole parameter, not a shard.
- Decoupled weight decay, as ``torch.optim.AdamW``: ``p <- p*(1 - lr*wd) - lr*u``.

All tensor math is done with ``torch._foreach_*`` ops on the local tensors of FSDP2 (DTensor)
parameters; the only cross-rank step is one all-reduce of the cautious mask counts per
(device mesh, placements) group, so a sharded step equals the unsharded one.
"""

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.optim import Optimizer

__all__ = ["GrokAdamW"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class GrokAdamW(Optimizer):
    """AdamW with cautious masking and Grokfast EMA filtering, both switchable.

    With ``cautious=False`` and ``grokfast=False`` it is ``torch.optim.AdamW`` (amsgrad off).
    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` and, with Grokfast, ``grok_ema``;
    state tensors are created like the parameter (DTensors under FSDP2) so DCP can reshard them.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        cautious: bool = True,
        grokfast: bool = False,
        grokfast_alpha: float = 0.98,
        grokfast_lambda: float = 2.0,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if not 0.0 <= grokfast_alpha < 1.0:
            raise ValueError(f"grokfast_alpha must lie in [0, 1), got {grokfast_alpha}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            cautious=cautious,
            grokfast=grokfast,
            grokfast_alpha=grokfast_alpha,
            grokfast_lambda=grokfast_lambda,
        )
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], ...]:
        """Collect the parameters with gradients and their state, creating state on first use."""
        params, grads, exp_avgs, exp_avg_sqs, emas, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("GrokAdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["grokfast"] and "grok_ema" not in state:
                state["grok_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
            if group["grokfast"]:
                emas.append(state["grok_ema"])
        return params, grads, exp_avgs, exp_avg_sqs, emas, steps

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, emas, steps = self._init_group(group)
            if params:
                self._update_group(group, params, grads, exp_avgs, exp_avg_sqs, emas, steps)
        return loss

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        emas: list[torch.Tensor],
        steps: list[torch.Tensor],
    ) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        # Elementwise math on local shards: no DTensor dispatch per op, identical numerics.
        p_l, m_l, v_l = (list(map(_local, ts)) for ts in (params, exp_avgs, exp_avg_sqs))
        g_l = list(map(_local, grads))

        if group["grokfast"]:
            ema_l = list(map(_local, emas))
            torch._foreach_lerp_(ema_l, g_l, 1.0 - group["grokfast_alpha"])
            g_l = torch._foreach_add(g_l, ema_l, alpha=group["grokfast_lambda"])

        torch._foreach_add_(steps, 1.0)
        bias_c1 = [1.0 - beta1 ** s.item() for s in steps]
        bias_c2_sqrt = [math.sqrt(1.0 - beta2 ** s.item()) for s in steps]

        torch._foreach_lerp_(m_l, g_l, 1.0 - beta1)
        torch._foreach_mul_(v_l, beta2)
        torch._foreach_addcmul_(v_l, g_l, g_l, 1.0 - beta2)

        denom = torch._foreach_sqrt(v_l)
        torch._foreach_div_(denom, bias_c2_sqrt)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(m_l, denom)
        torch._foreach_div_(update, bias_c1)

        if group["cautious"]:
            self._apply_cautious_mask(params, update, g_l)

        if wd != 0.0:
            torch._foreach_mul_(p_l, 1.0 - lr * wd)
        torch._foreach_add_(p_l, update, alpha=-lr)

    @staticmethod
    def _apply_cautious_mask(
        params: list[torch.Tensor], update: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> None:
        """``u <- u * mask / mean(mask)`` in place, ``mask = 1[u*g > 0]`` over the full tensor."""
        mask = torch._foreach_mul(update, grads)
        torch._foreach_sign_(mask)
        torch._foreach_clamp_min_(mask, 0.0)  # 1 where u*g > 0, else 0
        counts = torch.stack(torch._foreach_norm(mask, 1)).to(torch.float64)
        _all_reduce_shard_counts(params, counts)
        numels = torch.tensor([p.numel() for p in params], dtype=torch.float64, device=counts.device)
        # mean(mask) = count/numel; an all-zero mask zeroes u whatever the scale, hence clamp.
        scale = (numels / counts.clamp_min(1.0)).to(update[0].dtype)
        torch._foreach_mul_(mask, list(scale.unbind()))
        torch._foreach_mul_(update, mask)


def _all_reduce_shard_counts(params: list[torch.Tensor], counts: torch.Tensor) -> None:
    """Sum the local mask counts of sharded DTensor params over their shard mesh dims, in place.

    One all-reduce per (mesh, placements, mesh dim): FSDP2 puts all parameters on the same
    mesh with the same placements, so that is a single collective per step and param group.
    """
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if isinstance(p, DTensor):
            groups.setdefault((p.device_mesh, p.placements), []).append(i)
    for (mesh, placements), idx in groups.items():
        shard_dims = [d for d, pl in enumerate(placements) if isinstance(pl, Shard)]
        if not shard_dims:
            continue
        index = torch.tensor(idx, device=counts.device)
        sub = counts.index_select(0, index)
        for d in shard_dims:
            dist.all_reduce(sub, group=mesh.get_group(d))
        counts.index_copy_(0, index, sub)
