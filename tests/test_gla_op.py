"""The CPU GLA path against fla's naive recurrent reference (forward and gradients)."""

import pytest
import torch
import torch.nn.functional as F
from fla.ops.gla.naive import naive_recurrent_gla

from titan_hybrid.ops.common import resets_to_cu_seqlens
from titan_hybrid.ops.gla import chunk_gla_torch


def _inputs(B, T, H, K, V, seed=0, decay_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) * decay_scale
    return q, k, v, g


@pytest.mark.parametrize(
    "B,T,H,K,V,chunk",
    [(2, 37, 3, 8, 16, 16), (1, 64, 2, 16, 8, 16), (2, 100, 2, 32, 32, 32), (1, 5, 1, 4, 4, 16)],
)
def test_forward_and_grads_match_naive(B, T, H, K, V, chunk):
    inputs = _inputs(B, T, H, K, V)
    ours = [x.clone().requires_grad_() for x in inputs]
    ref = [x.clone().requires_grad_() for x in inputs]
    o = chunk_gla_torch(*ours, chunk_size=chunk)
    o_ref, _ = naive_recurrent_gla(*ref)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    do = torch.randn_like(o)
    (o * do).sum().backward()
    (o_ref * do).sum().backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_strong_decay_stays_finite():
    """Cumulative in-chunk decay far beyond fp32's exp range (~88 nats) must not overflow."""
    q, k, v, g = _inputs(1, 64, 2, 8, 8, decay_scale=40.0)
    o = chunk_gla_torch(q, k, v, g, chunk_size=64)
    o_ref, _ = naive_recurrent_gla(q, k, v, g)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)


def test_document_resets_equal_separate_sequences():
    """State resets at document starts = running each document on its own (fla varlen semantics)."""
    q, k, v, g = _inputs(2, 50, 2, 8, 8, seed=1)
    starts = [0, 5, 20, 21, 33]
    resets = torch.zeros(2, 50, dtype=torch.bool)
    resets[:, starts] = True
    inputs = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o = chunk_gla_torch(*inputs, resets=resets, chunk_size=16)
    ref_inputs = [x.clone().requires_grad_() for x in (q, k, v, g)]
    bounds = starts + [50]
    o_ref = torch.cat(
        [naive_recurrent_gla(*(x[:, a:b] for x in ref_inputs))[0] for a, b in zip(bounds[:-1], bounds[1:])],
        dim=1,
    )
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    do = torch.randn_like(o)
    (o * do).sum().backward()
    (o_ref * do).sum().backward()
    for a, b in zip(inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_resets_to_cu_seqlens():
    resets = torch.tensor([[False, False, True, False], [True, False, False, True]])
    assert resets_to_cu_seqlens(resets).tolist() == [0, 2, 4, 7, 8]


def test_cu_seqlens_is_found_once_per_batch():
    """Every layer gets the same cu_seqlens object for one batch's resets (one host sync), a new batch its own."""
    resets = torch.tensor([[False, True, False, False]])
    first = resets_to_cu_seqlens(resets)
    assert resets_to_cu_seqlens(resets) is first
    next_batch = torch.tensor([[False, False, False, True]])
    assert resets_to_cu_seqlens(next_batch).tolist() == [0, 3, 4]
    assert first.tolist() == [0, 1, 4]


def test_host_documents_are_the_cu_seqlens_the_mixers_get(monkeypatch):
    """Documents found on the host from the loader's positions, bound to the resets the forward
    derives from them, are what every fla call gets: equal to finding them from the resets, and
    without finding them again (the device-to-host sync the binding removes)."""
    from titan_hybrid.ops import common

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [5, 6, 0, 1, 2, 3, 0, 1]])
    expected = resets_to_cu_seqlens(positions == 0)
    documents = common.HostDocuments.of_positions(positions)
    assert documents.cu_seqlens.dtype == torch.int32 and documents.cu_seqlens.tolist() == expected.tolist()

    def found_again(resets):
        raise AssertionError("bound documents were looked for again")

    monkeypatch.setattr(common, "_cu_seqlens", found_again)
    resets = positions == 0
    documents.bind(resets)
    bound = resets_to_cu_seqlens(resets)
    assert bound.tolist() == expected.tolist() and resets_to_cu_seqlens(resets) is bound
    with pytest.raises(ValueError, match=r"HostDocuments of 16 tokens bound to resets of shape \(1, 8\)"):
        documents.bind(positions[:1] == 0)
