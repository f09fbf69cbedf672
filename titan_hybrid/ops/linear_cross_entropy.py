"""Output projection + cross-entropy without materialising the logits.

The LM head of the 308M model turns 8 x 4096 hidden states into 8 x 4096 x 49280
logits: 3.2 GB in bf16, 6.5 GB again in fp32 for the softmax, and as much for
their gradient. ``linear_cross_entropy`` walks the tokens in chunks; for each it
forms the chunk's logits, the loss and, when gradients are needed, the logits'
gradient ``softmax - onehot`` at once, and folds it into the gradients of the
hidden states and the weight. Backward then only scales those by the incoming
gradient. Same matmul FLOPs as the plain path, no recomputation, and peak memory
of one chunk of fp32 logits instead of the whole batch's.
"""

from __future__ import annotations

import torch
from torchtitan.components.loss import IGNORE_INDEX


def _chunk_loss_and_grad(
    logits: torch.Tensor, labels: torch.Tensor, softcap: float, grad_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of one chunk and d(loss)/d(logits) (before soft-capping), in ``grad_dtype``."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 softmax, or better
    if softcap:
        tanh = torch.tanh(z / softcap)
        z = softcap * tanh
    valid = labels != IGNORE_INDEX
    target = labels.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(z, dim=-1)
    loss = ((lse - z.gather(1, target).squeeze(1)) * valid).sum()
    grad = (z - lse.unsqueeze(1)).exp()
    grad = grad.scatter_add(1, target, -torch.ones_like(grad[:, :1])) * valid.unsqueeze(1)
    if softcap:
        grad = grad * (1 - tanh * tanh)
    return loss, grad.to(grad_dtype)


_compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, softcap):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        chunk_fn = _compiled_chunk if hidden.is_cuda else _chunk_loss_and_grad
        loss = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
            chunk_loss, grad_logits = chunk_fn(h @ weight.t(), y, softcap, hidden.dtype)
            loss += chunk_loss
            if needs_grad:
                grad_hidden[start : start + chunk_tokens] = grad_logits @ weight
                grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int, softcap: float = 0.0
) -> torch.Tensor:
    """Summed cross-entropy of ``softcap(hidden @ weight.T)`` against ``labels`` (``IGNORE_INDEX`` skipped).

    ``hidden`` ``[..., D]``, ``weight`` ``[V, D]``, ``labels`` ``[...]``. Equals
    TorchTitan's ``cross_entropy_loss`` (sum reduction, fp32 softmax) on the logits.
    """
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk_tokens, softcap
    )
