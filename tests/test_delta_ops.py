"""CPU paths of Gated DeltaNet, GDN-2 and GDN-2 KLA against fla's naive recurrent references.

Forward and gradients of every input, T not a multiple of the chunk size,
document resets (= each document run on its own), fla-style qk l2norm, and the
Hopper guard for fla's gated-delta-rule backward.
"""

import fla.utils
import pytest
import torch
import torch.nn.functional as F
import triton
from fla.ops.common.backends.tilelang import CommonTileLangBackend
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from fla.ops.gdn2.naive import naive_recurrent_gdn2

from titan_hybrid.ops.common import call_fla
from titan_hybrid.ops.gated_delta import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_torch,
    require_exact_gated_delta_backward,
)
from titan_hybrid.ops.gdn2 import chunk_gdn2, chunk_gdn2_kla, chunk_gdn2_torch, kaczmarz_gates

SHAPES = [(2, 37, 3, 8, 16, 16), (1, 64, 2, 16, 8, 32), (2, 100, 2, 32, 32, 64), (1, 5, 1, 4, 4, 16)]


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def gdr_inputs(B, T, H, K, V, seed=0, decay_scale=1.0):
    """q, k (unit keys, as the layer feeds them), v, g [B,T,H] log decay, beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), _unit(torch.randn(B, T, H, K, generator=gen))
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2) * decay_scale
    beta = torch.randn(B, T, H, generator=gen).sigmoid()
    return q, k, v, g, beta


def gdn2_inputs(B, T, H, K, V, seed=0, decay_scale=1.0, unit_keys=True):
    """q, k, v, g [B,T,H,K] per-channel log decay, b [K] and w [V] gates in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    k = _unit(k) if unit_keys else k
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) + 2) * decay_scale
    b = torch.randn(B, T, H, K, generator=gen).sigmoid()
    w = torch.randn(B, T, H, V, generator=gen).sigmoid()
    return q, k, v, g, b, w


def naive_gdr(q, k, v, g, beta):
    return naive_recurrent_gated_delta_rule(q, k, v, beta, g)[0]  # fla's order is (beta, g)


def naive_gdn2(q, k, v, g, b, w):
    return naive_recurrent_gdn2(q, k, v, g, b, w)[0]


def assert_same_fwd_and_grads(ours_fn, ref_fn, inputs, atol=1e-5, grad_atol=1e-4):
    ours = [x.clone().requires_grad_() for x in inputs]
    ref = [x.clone().requires_grad_() for x in inputs]
    o, o_ref = ours_fn(*ours), ref_fn(*ref)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, atol=atol, rtol=1e-4)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(123))
    (o * do).sum().backward()
    (o_ref * do).sum().backward()
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a.grad, b.grad, atol=grad_atol, rtol=1e-4, msg=lambda m: f"input {i}: {m}")


def by_document(ref_fn, starts_per_row, T):
    """Run ``ref_fn`` on every document of every row separately (fla varlen semantics)."""

    def run(*inputs):
        rows = []
        for row, starts in enumerate(starts_per_row):
            bounds = [*starts, T]
            rows.append(torch.cat([ref_fn(*(x[row : row + 1, a:z] for x in inputs)) for a, z in zip(bounds, bounds[1:])], 1))
        return torch.cat(rows, 0)

    return run


def resets_from(starts_per_row, T):
    resets = torch.zeros(len(starts_per_row), T, dtype=torch.bool)
    for row, starts in enumerate(starts_per_row):
        resets[row, starts] = True
    return resets


# Document starts mid-chunk, on a chunk boundary (16, 32), back to back (20, 21), one-token docs.
DOCS = [[0, 5, 16, 20, 21, 33], [0, 31, 32, 47, 49]]


@pytest.mark.parametrize("B,T,H,K,V,chunk", SHAPES)
def test_gated_delta_matches_naive(B, T, H, K, V, chunk):
    assert_same_fwd_and_grads(
        lambda *x: chunk_gated_delta_rule_torch(*x, chunk_size=chunk), naive_gdr, gdr_inputs(B, T, H, K, V)
    )


@pytest.mark.parametrize("B,T,H,K,V,chunk", SHAPES)
def test_gdn2_matches_naive(B, T, H, K, V, chunk):
    assert_same_fwd_and_grads(
        lambda *x: chunk_gdn2_torch(*x, chunk_size=chunk), naive_gdn2, gdn2_inputs(B, T, H, K, V)
    )


def test_strong_decay_stays_finite():
    """Cumulative in-chunk decay far beyond fp32's exp range (~88 nats) must not overflow."""
    assert_same_fwd_and_grads(
        lambda *x: chunk_gated_delta_rule_torch(*x, chunk_size=64), naive_gdr, gdr_inputs(1, 70, 2, 8, 8, decay_scale=40.0)
    )
    assert_same_fwd_and_grads(
        lambda *x: chunk_gdn2_torch(*x, chunk_size=64), naive_gdn2, gdn2_inputs(1, 70, 2, 8, 8, decay_scale=40.0)
    )


def test_gated_delta_resets_equal_separate_documents():
    inputs = gdr_inputs(2, 50, 2, 8, 8, seed=1)
    resets = resets_from(DOCS, 50)
    assert_same_fwd_and_grads(
        lambda *x: chunk_gated_delta_rule_torch(*x, resets=resets, chunk_size=16), by_document(naive_gdr, DOCS, 50), inputs
    )


def test_gdn2_resets_equal_separate_documents():
    inputs = gdn2_inputs(2, 50, 2, 8, 8, seed=1)
    resets = resets_from(DOCS, 50)
    assert_same_fwd_and_grads(
        lambda *x: chunk_gdn2_torch(*x, resets=resets, chunk_size=16), by_document(naive_gdn2, DOCS, 50), inputs
    )


def fla_l2norm(x):
    return x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6)


def test_qk_l2norm_equals_normalising_first():
    q, k, v, g, beta = gdr_inputs(2, 40, 2, 8, 8, seed=2)
    k = k * 3  # un-normalised keys
    assert_same_fwd_and_grads(
        lambda *x: chunk_gated_delta_rule(*x, use_qk_l2norm=True),
        lambda q, k, *x: naive_gdr(fla_l2norm(q), fla_l2norm(k), *x),
        (q, k, v, g, beta),
    )
    q, k, v, g, b, w = gdn2_inputs(2, 40, 2, 8, 8, seed=2, unit_keys=False)
    assert_same_fwd_and_grads(
        lambda *x: chunk_gdn2(*x, use_qk_l2norm=True),
        lambda q, k, *x: naive_gdn2(fla_l2norm(q), fla_l2norm(k), *x),
        (q, k, v, g, b, w),
    )


def kla_recurrence(q, k, v, g, b, w, eta, eps=1e-6):
    """S_t = (I - k_t (lam_t b_t * k_t)^T) D_t S_{t-1} + k_t (lam_t w_t * v_t)^T, lam_t = eta_t / (|k_t|^2 + eps)."""
    B, T, H, K = k.shape
    S = torch.zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):
        q_t, k_t, v_t, g_t, b_t, w_t = (x[:, t] for x in (q, k, v, g, b, w))
        lam = (eta[:, t] / ((k_t * k_t).sum(-1) + eps)).unsqueeze(-1)
        S = g_t.exp().unsqueeze(-1) * S
        erase = ((lam * b_t * k_t).unsqueeze(-1) * S).sum(-2)
        S = S + k_t.unsqueeze(-1) * (lam * w_t * v_t - erase).unsqueeze(-2)
        outs.append((q_t.unsqueeze(-1) * S).sum(-2) * K**-0.5)
    return torch.stack(outs, 1)


def kla_inputs(seed=3):
    q, k, v, g, b, w = gdn2_inputs(2, 45, 2, 16, 8, seed=seed, unit_keys=False)
    eta = torch.randn(2, 45, 2, generator=torch.Generator().manual_seed(seed)).sigmoid()
    return q, k * 2, v, g, b, w, eta


def test_kla_matches_explicit_recurrence():
    inputs = kla_inputs()
    resets = resets_from([[0], [0, 17]], 45)
    assert_same_fwd_and_grads(chunk_gdn2_kla, kla_recurrence, inputs)
    assert_same_fwd_and_grads(
        lambda *x: chunk_gdn2_kla(*x, resets=resets), by_document(kla_recurrence, [[0], [0, 17]], 45), inputs
    )


def test_kla_equals_gdn2_with_prescaled_gates():
    q, k, v, g, b, w, eta = kla_inputs(seed=4)
    lam = (eta / (k.square().sum(-1) + 1e-3)).unsqueeze(-1)
    torch.testing.assert_close(kaczmarz_gates(k, b, w, eta, eps=1e-3), (lam * b, lam * w))
    torch.testing.assert_close(chunk_gdn2_kla(q, k, v, g, b, w, eta, eps=1e-3), chunk_gdn2(q, k, v, g, lam * b, lam * w))


def test_low_precision_inputs_return_their_dtype():
    q, k, v, g, beta = gdr_inputs(1, 20, 2, 8, 8)
    o = chunk_gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta.bfloat16())
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), naive_gdr(q, k, v, g, beta), atol=5e-2, rtol=5e-2)


def test_call_fla_packs_documents_as_varlen():
    """The CUDA plumbing: rows flattened to batch 1, documents and rows as cu_seqlens segments."""
    inputs = gdn2_inputs(2, 50, 2, 8, 8, seed=5)
    resets = resets_from(DOCS, 50)

    def fake_varlen_kernel(*xs, cu_seqlens, scale):
        assert all(x.shape[0] == 1 for x in xs)
        bounds = cu_seqlens.tolist()
        o = torch.cat([naive_gdn2(*(x[:, a:z] for x in xs)) for a, z in zip(bounds, bounds[1:])], 1)
        return o, None

    o = call_fla(fake_varlen_kernel, *inputs, resets=resets, scale=None)
    torch.testing.assert_close(o, chunk_gdn2_torch(*inputs, resets=resets), atol=1e-5, rtol=1e-4)


@pytest.fixture
def hopper(monkeypatch):
    """Pretend to run on a Hopper GPU with Triton 3.6 and no usable TileLang."""
    monkeypatch.setattr(fla.utils, "IS_NVIDIA_HOPPER", True)
    monkeypatch.setattr(fla.utils, "TRITON_ABOVE_3_4_0", True)
    monkeypatch.setattr(fla.utils, "TRITON_ABOVE_3_7_1", False)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(CommonTileLangBackend, "is_available", classmethod(lambda cls: False))
    monkeypatch.delenv("FLA_TILELANG", raising=False)
    return monkeypatch


def test_guard_refuses_hopper_with_old_triton(hopper):
    with pytest.raises(RuntimeError) as err:
        require_exact_gated_delta_backward()
    message = str(err.value)
    for needle in ("Triton 3.6.0", "#640", "wrong gradients", "triton>=3.7.1", "pip install tilelang"):
        assert needle in message


def test_guard_passes_with_new_triton_or_tilelang(hopper):
    hopper.setattr(fla.utils, "TRITON_ABOVE_3_7_1", True)
    assert require_exact_gated_delta_backward() is None
    hopper.setattr(fla.utils, "TRITON_ABOVE_3_7_1", False)
    hopper.setattr(CommonTileLangBackend, "is_available", classmethod(lambda cls: True))
    hopper.setattr(CommonTileLangBackend, "default_enable", True)  # fla enables it by default on Hopper
    assert require_exact_gated_delta_backward() is None
    hopper.setenv("FLA_TILELANG", "0")
    with pytest.raises(RuntimeError):
        require_exact_gated_delta_backward()


def test_guard_passes_off_hopper():
    assert require_exact_gated_delta_backward() is None
