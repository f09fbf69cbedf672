"""The chunked linear + cross-entropy against TorchTitan's loss on materialised logits."""

import pytest
import torch
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss

from titan_hybrid.ops.linear_cross_entropy import linear_cross_entropy


def reference(hidden, weight, labels, softcap):
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return cross_entropy_loss(logits, labels)


@pytest.mark.parametrize("chunk_tokens,softcap", [(7, 0.0), (16, 0.0), (64, 0.0), (5, 3.0)])
def test_loss_and_gradients_match_materialised_logits(chunk_tokens, softcap):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 19, 32, generator=gen, requires_grad=True)
    weight = torch.randn(50, 32, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (2, 19), generator=gen)
    labels[0, :4] = IGNORE_INDEX  # an unsupervised prompt
    grads = []
    for fn in (reference, lambda h, w, y, c: linear_cross_entropy(h, w, y, chunk_tokens, c)):
        loss = fn(hidden, weight, labels, softcap)
        loss.mul(0.7).backward()  # a non-unit upstream gradient, as in loss / global tokens
        grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_gradient_work_without_grad():
    hidden, weight = torch.randn(3, 8, 16), torch.randn(40, 16)
    labels = torch.randint(0, 40, (3, 8))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=5)
    torch.testing.assert_close(loss, reference(hidden, weight, labels, 0.0))
