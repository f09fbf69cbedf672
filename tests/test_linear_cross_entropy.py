"""The chunked linear + cross-entropy against TorchTitan's loss on materialised logits, alone, in the model and in training."""

import pytest
import torch
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss

from _train_runs import STEPS, records, reference_run, train
from titan_hybrid.models.hybrid import HybridLM, HybridModelArgs
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


def test_model_with_labels_returns_the_loss_of_its_logits():
    args = HybridModelArgs(dim=64, n_layers=2, pattern="gA", n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=300,
                           loss_chunk_tokens=24, output_softcap=10.0)  # fmt: skip
    model = HybridLM(args)
    model.init_weights()
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = tokens.roll(-1, dims=1)
    fused = model(tokens, labels=labels)
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = cross_entropy_loss(model(tokens), labels)
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_training_with_the_fused_loss_follows_the_plain_run(tmp_path_factory):
    """2 gloo ranks, FSDP2, the same 20 steps (and LR schedule): the reference run's losses."""
    reference = records(reference_run(tmp_path_factory.getbasetemp()))
    dump = tmp_path_factory.mktemp("fused")
    train(dump, "--training.steps", str(STEPS), "--checkpoint.no-enable", "--hybrid_model.loss_chunk_tokens", "48")
    fused = records(dump)
    # The chunked softmax rounds differently; Adam amplifies that (as for a change of world size,
    # see test_checkpoint), while the gradients themselves are checked above. Since one web shard
    # is held out for validation the loss curve is bumpier and the amplified gap peaks at 3.0e-3
    # (step 16; it was ~1e-3 on the old data): 5e-3 bounds that, 1e-4 still holds up to step 6.
    assert fused[1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-6)
    for step in range(1, STEPS + 1):
        assert fused[step]["rows"] == reference[step]["rows"]
        assert fused[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4 if step <= 6 else 5e-3), step
