"""The delta-rule custom ops (fla's chunk kernels behind ``d``, ``2``, ``k`` on CUDA), checked without a GPU.

fla's Triton kernels cannot run here, so: the ops are registered, and their fake implementations give
fla's shapes and dtypes on (fake) CUDA tensors. Then fla's forward / backward functions are swapped
for PyTorch stand-ins that take exactly their arguments (bound by name against fla's signatures),
and the ops' own implementations, registered for CPU tensors here, pass ``torch.library.opcheck``
(schema, autograd registration, fakes vs real outputs, AOT dispatch) and match the CPU path under
``torch.compile(fullgraph=True)``, gradients included. Last, the delta-rule layers themselves (pure
PyTorch on CPU) compile whole and match eager.
"""

import inspect

import pytest
import torch
from fla.modules.l2norm import l2norm_bwd, l2norm_fwd
from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_bwd, chunk_gated_delta_rule_fwd
from fla.ops.gdn2.chunk_bwd import chunk_gdn2_bwd
from fla.ops.gdn2.chunk_fwd import chunk_gdn2_fwd
from fla.ops.utils import prepare_chunk_indices
from torch._subclasses.fake_tensor import FakeTensorMode

from test_delta_ops import gdn2_inputs, gdr_inputs, kla_inputs, resets_from
from test_mixer_layers import _layer
from titan_hybrid.ops import common, fla_kernels, gated_delta, gdn2
from titan_hybrid.ops.gated_delta import chunk_gated_delta_rule_torch, fla_chunk_gated_delta_rule
from titan_hybrid.ops.gdn2 import chunk_gdn2_torch, fla_chunk_gdn2, kaczmarz_gates

C = common.FLA_DELTA_CHUNK
OPS = [fla_chunk_gated_delta_rule, gated_delta.fla_chunk_gated_delta_rule_bwd, fla_chunk_gdn2, gdn2.fla_chunk_gdn2_bwd]


def test_ops_are_registered_for_cuda_with_fakes():
    for name in ("fla_chunk_gated_delta_rule", "fla_chunk_gdn2"):
        for op in (name, f"{name}_bwd"):
            for key in ("CUDA", "Meta"):
                assert torch._C._dispatch_has_kernel_for_dispatch_key(f"titan_hybrid::{op}", key), (op, key)


def _fake_cuda(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="cuda")


def _signature(outputs) -> list[tuple]:
    return [(tuple(o.shape), o.dtype, o.device.type) for o in outputs]


def _cuda(expected: list[tuple]) -> list[tuple]:
    return [(shape, dtype, "cuda") for shape, dtype in expected]


@pytest.mark.parametrize("use_qk_l2norm", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_fakes_give_fla_shapes_and_dtypes(use_qk_l2norm, packed):
    """16-bit q, k, v and gates, fp32 log decays, as the layers pass them; outputs in the input rows."""
    B, T, H, K, V = 2, 70, 3, 32, 48
    bf16, f32 = torch.bfloat16, torch.float32
    with FakeTensorMode():
        q, k, v = _fake_cuda(B, T, H, K), _fake_cuda(B, T, H, K), _fake_cuda(B, T, H, V)
        g, beta = _fake_cuda(B, T, H, dtype=f32), _fake_cuda(B, T, H)
        resets = _fake_cuda(B, T, dtype=torch.bool) if packed else None
        gdr = fla_chunk_gated_delta_rule(q, k, v, g, beta, 0.1, resets, use_qk_l2norm)
        o, q_n, k_n, q_rstd, k_rstd, g_cumsum, A = gdr
        if not use_qk_l2norm:  # the backward then gets the raw q, k
            q_n, k_n = q, k
        gdr_grads = gated_delta.fla_chunk_gated_delta_rule_bwd(
            q_n, k_n, v, g_cumsum, beta, A, q_rstd, k_rstd, o, 0.1, resets, use_qk_l2norm
        )
        g, b, w = _fake_cuda(B, T, H, K, dtype=f32), _fake_cuda(B, T, H, K), _fake_cuda(B, T, H, V)
        g2 = fla_chunk_gdn2(q, k, v, g, b, w, 0.1, resets, use_qk_l2norm)
        o, _, _, q_rstd, k_rstd, g_cumsum, Aqk, Akk = g2
        g2_grads = gdn2.fla_chunk_gdn2_bwd(
            q_n, k_n, v, g_cumsum, b, w, Aqk, Akk, q_rstd, k_rstd, o, 0.1, resets, use_qk_l2norm
        )
    qkv = [((B, T, H, K), bf16)] * 2 + [((B, T, H, V), bf16)]
    qk_norm = [((B, T, H, K), bf16)] * 2 + [((B, T, H), f32)] * 2 if use_qk_l2norm else [((0,), bf16)] * 4
    assert _signature(gdr) == _cuda([((B, T, H, V), bf16), *qk_norm, ((B, T, H), f32), ((B, T, H, C), bf16)])
    assert _signature(gdr_grads) == _cuda([*qkv, ((B, T, H), f32), ((B, T, H), bf16)])
    A = ((B, T, H, C), bf16)
    assert _signature(g2) == _cuda([((B, T, H, V), bf16), *qk_norm, ((B, T, H, K), f32), A, A])
    assert _signature(g2_grads) == _cuda([*qkv, ((B, T, H, K), f32), ((B, T, H, K), bf16), ((B, T, H, V), bf16)])


# PyTorch stand-ins for fla's functions: same signatures, same returns, the CPU path's numbers.
# g's "chunk cumsum" is g itself, which the backward stand-in reads back (the ops pass it through).


def _args(real, args, kwargs) -> dict:
    """The arguments as fla's ``real`` would take them (an unknown or missing one fails), checked for
    fla's layout: contiguous tensors and, when packed, the chunk indices of its chunk length."""
    bound = inspect.signature(real).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    assert all(t.is_contiguous() for t in a.values() if isinstance(t, torch.Tensor))
    if a.get("cu_seqlens") is not None:
        assert torch.equal(a["chunk_indices"], prepare_chunk_indices(a["cu_seqlens"], a["chunk_size"]))
    return a


def _resets(a: dict) -> torch.Tensor | None:
    """fla's packed documents back as ``resets`` of the one packed row."""
    if a["cu_seqlens"] is None:
        return None
    resets = torch.zeros(1, a["q"].shape[1], dtype=torch.bool)
    resets[0, a["cu_seqlens"][:-1].long()] = True
    return resets


def _grads(fn, inputs, do) -> list[torch.Tensor]:
    """torch.func, since a kernel runs below autograd (it records nothing there); fla's are fresh buffers."""
    _, vjp = torch.func.vjp(fn, *inputs)
    return [d.contiguous() for d in vjp(do)]


def _gdr(a: dict, *x):
    return chunk_gated_delta_rule_torch(*x, scale=a["scale"], resets=_resets(a), chunk_size=C).contiguous()


def _gdn2(a: dict, *x):
    return chunk_gdn2_torch(*x, scale=a["scale"], resets=_resets(a)).contiguous()


def stand_in_gdr_fwd(*args, **kwargs):
    a = _args(chunk_gated_delta_rule_fwd, args, kwargs)
    o = _gdr(a, *(a[n] for n in ("q", "k", "v", "g", "beta")))
    return a["g"].float().clone(), o, a["k"].new_zeros(*a["beta"].shape, C), None, None, None


def stand_in_gdr_bwd(*args, **kwargs):
    a = _args(chunk_gated_delta_rule_bwd, args, kwargs)
    dq, dk, dv, dg, db = _grads(lambda *x: _gdr(a, *x), [a[n] for n in ("q", "k", "v", "g", "beta")], a["do"])
    return dq, dk, dv, db, dg, None, None, None


def stand_in_gdn2_fwd(*args, **kwargs):
    a = _args(chunk_gdn2_fwd, args, kwargs)
    o = _gdn2(a, *(a[n] for n in ("q", "k", "v", "g", "b", "w_gate")))
    Aqk, Akk = (a["k"].new_zeros(*a["k"].shape[:3], C) for _ in range(2))
    return o, None, a["g"].float().clone(), Aqk, Akk, None, None, None, None, None, None, None


def stand_in_gdn2_bwd(*args, **kwargs):
    a = _args(chunk_gdn2_bwd, args, kwargs)
    inputs = [a[n] for n in ("q", "k", "v", "g", "b", "w_gate")]
    dq, dk, dv, dg, db, dw = _grads(lambda *x: _gdn2(a, *x), inputs, a["do"])
    return dq, dk, dv, db, dw, dg, None, None, None


def stand_in_l2norm_fwd(*args, **kwargs):
    a = inspect.signature(l2norm_fwd).bind(*args, **kwargs).arguments
    x = a["x"]
    assert x.is_contiguous()
    rstd = torch.rsqrt(x.float().square().sum(-1) + common.L2NORM_EPS)
    return (x.float() * rstd.unsqueeze(-1)).to(x.dtype), rstd


def stand_in_l2norm_bwd(*args, **kwargs):
    """fla's kernel: every row of the flattened y, dy with its rstd."""
    a = inspect.signature(l2norm_bwd).bind(*args, **kwargs).arguments
    y, rstd, dy = a["y"], a["rstd"], a["dy"]
    assert y.is_contiguous() and dy.is_contiguous() and rstd.numel() == y.numel() // y.shape[-1]
    y2, dy2, r = y.float().reshape(-1, y.shape[-1]), dy.float().reshape(-1, y.shape[-1]), rstd.reshape(-1, 1)
    return (dy2 * r - (dy2 * y2).sum(-1, keepdim=True) * y2 * r).reshape(y.shape).to(y.dtype)


@pytest.fixture(scope="module")
def cpu_kernels():
    """The ops' own (CUDA-only) implementations registered for CPU tensors too, for this process."""
    for op in OPS:
        op.register_kernel("cpu", op._init_fn)


@pytest.fixture
def fla_stand_ins(cpu_kernels, monkeypatch):
    for name, fn in [
        ("chunk_gated_delta_rule_fwd", stand_in_gdr_fwd), ("chunk_gated_delta_rule_bwd", stand_in_gdr_bwd),
        ("chunk_gdn2_fwd", stand_in_gdn2_fwd), ("chunk_gdn2_bwd", stand_in_gdn2_bwd),
        ("l2norm_fwd", stand_in_l2norm_fwd), ("l2norm_bwd", stand_in_l2norm_bwd),
    ]:  # fmt: skip
        monkeypatch.setattr(fla_kernels, name, fn)


def _kla(q, k, v, g, b, w, eta):
    """The ``k`` mixer's call of the GDN-2 op: Kaczmarz gates, raw keys, no in-kernel l2norm."""
    return (q, k, v, g, *kaczmarz_gates(k, b, w, eta))


# mixer: (inputs, op, use_qk_l2norm, CPU path); the KLA rows are the gate-scaled GDN-2 inputs.
CASES = {
    "d": (gdr_inputs(2, 50, 2, 8, 8, seed=1), fla_chunk_gated_delta_rule, True,
          lambda *x, resets: chunk_gated_delta_rule_torch(*x, resets=resets, use_qk_l2norm=True)),
    "2": (gdn2_inputs(2, 50, 2, 8, 8, seed=1, unit_keys=False), fla_chunk_gdn2, True,
          lambda *x, resets: chunk_gdn2_torch(*x, resets=resets, use_qk_l2norm=True)),
    "k": (_kla(*kla_inputs()), fla_chunk_gdn2, False, lambda *x, resets: chunk_gdn2_torch(*x, resets=resets)),
}  # fmt: skip


def _packed(T: int) -> torch.Tensor:
    """Documents starting mid-row and back to back."""
    return resets_from([[0, 17], [0, 31, 32]], T)


def _op_args(mixer: str, resets: torch.Tensor | None) -> tuple:
    """The op's arguments, the tensors fresh leaves that require grad."""
    inputs, _, use_qk_l2norm, _ = CASES[mixer]
    x = [t.clone().requires_grad_() for t in inputs]
    return (*x, x[1].shape[-1] ** -0.5, resets, use_qk_l2norm)


@pytest.mark.parametrize("mixer", list(CASES))
def test_opcheck(fla_stand_ins, mixer):
    torch.library.opcheck(CASES[mixer][1], _op_args(mixer, _packed(CASES[mixer][0][0].shape[1])))


@pytest.mark.parametrize("mixer", list(CASES))
@pytest.mark.parametrize("packed", [False, True])
def test_compiled_op_matches_cpu_path(fla_stand_ins, mixer, packed):
    """Forward and every gradient through the op in one fullgraph-compiled graph = the CPU path."""
    inputs, op, _, reference = CASES[mixer]
    resets = _packed(inputs[0].shape[1]) if packed else None
    compiled = torch.compile(lambda *a: op(*a)[0], fullgraph=True, backend="aot_eager")
    args = _op_args(mixer, resets)
    ref = [t.clone().requires_grad_() for t in inputs]
    o, o_ref = compiled(*args), reference(*ref, resets=resets)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(0))
    (o * do).sum().backward()
    (o_ref * do).sum().backward()
    for i, (a, b) in enumerate(zip(args, ref)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"input {i}: {m}")


@pytest.mark.parametrize("kind", ["d", "2", "k"])
def test_layer_compiles_whole_on_cpu(kind):
    """A delta-rule layer is one graph under torch.compile(fullgraph=True) and matches eager.

    ``aot_eager_decomp_partition`` is Inductor's AOT pipeline (decompositions, partitioner) without its
    C++ code generation (minutes on a small CPU). Plain ``aot_eager`` fails on ``d`` with torch 2.13:
    the fake ``softplus_backward`` lays out its output unlike the CPU kernel does.
    """
    layer = _layer(kind)
    x = torch.randn(2, 20, layer.o_proj.out_features, generator=torch.Generator().manual_seed(1))
    resets = resets_from([[0, 9], [0]], 20)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager_decomp_partition")
    x_c, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(x_c, resets)
    grads = torch.autograd.grad(out.square().sum(), [x_c, *layer.parameters()])
    ref = layer(x_e, resets)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_e, *layer.parameters()])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
