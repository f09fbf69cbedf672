"""Cached decoding against the full forward: prefill + one token at a time gives the training
forward's logits at every position, for every mixer letter and for a mixed pattern with an
attention sink, partial RoPE and a sliding window that wraps its ring buffer, and for one with
XSA, depth-scaled norms, soft-capped scores and depth recurrence; batched prompts of different
lengths are left-padded."""

import pytest
import torch

from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors
from titan_hybrid.models.hybrid.attention import decode_sdpa, kv_cache_write
from titan_hybrid.ops.common import chunk_recurrence_torch, recurrent_step_torch
from titan_hybrid.generate import DecodeStep
from titan_hybrid.ops.gated_delta import fused_recurrent_gated_delta_rule, gated_delta_step
from titan_hybrid.ops.gdn2 import fused_recurrent_gdn2, gdn2_step
from titan_hybrid.ops.gla import fused_recurrent_gla, gla_step

BASE = hybrid_flavors["debug"].replace(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64)
CASES = {
    "g": dict(pattern="gg"),
    "A": dict(pattern="AA"),
    "d": dict(pattern="dd"),
    "2": dict(pattern="22"),
    "k": dict(pattern="kk"),
    "mixed": dict(pattern="gAd2kA", attn_sink=True, rope_dims=8, attn_window=5, delta_expand_v=1.5),
    # The parameter-golf options: the decode state follows the unrolled depth (blocks 1..3 twice).
    "pgolf": dict(
        pattern="2AAgA", attn_sink=True, rope_dims=8, xsa=True, ln_scale=True, attn_softcap=3.0,
        mlp="relu2", output_softcap=5.0, recur_layers=[1, 3],
    ),
}
PROMPTS = [5, 9, 1]  # prompt lengths of the three rows
NEW = 8  # decoded tokens per row, past the window of 5 (its ring buffer wraps)


def _model(**changes) -> HybridLM:
    args = BASE.replace(n_layers=len(changes["pattern"]), **changes)
    torch.manual_seed(0)
    model = HybridLM(args)
    model.init_weights()
    with torch.no_grad():  # larger than the training init, so every path contributes visibly
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(5)
    return model.eval()


def _left_pad(rows: list[torch.Tensor], pad_id: int = 3) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([torch.full((width - len(r),), pad_id), r]) for r in rows])


@pytest.mark.parametrize("case", CASES)
def test_prefill_then_decode_matches_full_forward(case):
    model = _model(**CASES[case])
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, BASE.vocab_size, (n + NEW,), generator=gen) for n in PROMPTS]
    with torch.no_grad():
        full = [model(r.unsqueeze(0))[0] for r in rows]  # each row alone, no padding: [n + NEW, vocab]

    lengths = torch.tensor(PROMPTS)
    prompts = _left_pad([r[:n] for r, n in zip(rows, PROMPTS)])
    logits, state = model.prefill(prompts, lengths, capacity=max(PROMPTS) + NEW, all_logits=True)
    width = prompts.shape[1]
    for b, n in enumerate(PROMPTS):
        torch.testing.assert_close(logits[b, width - n :], full[b][:n], rtol=1e-4, atol=1e-5)
    for t in range(NEW - 1):
        step_logits = model.decode_step(torch.stack([r[n + t] for r, n in zip(rows, PROMPTS)]), state)
        for b, n in enumerate(PROMPTS):
            torch.testing.assert_close(step_logits[b], full[b][n + t], rtol=1e-4, atol=1e-5)
    assert state.positions.tolist() == [n + NEW - 1 for n in PROMPTS]


def test_padding_does_not_reach_the_prompt():
    """Same prompt, different padding tokens and amounts: same logits and state."""
    model = _model(**CASES["mixed"])
    prompt = torch.randint(0, BASE.vocab_size, (6,), generator=torch.Generator().manual_seed(2))
    other = torch.randint(0, BASE.vocab_size, (10,), generator=torch.Generator().manual_seed(3))
    batch = _left_pad([prompt, other], pad_id=7)
    alone, state_alone = model.prefill(prompt.unsqueeze(0), torch.tensor([6]), capacity=12)
    padded, state_padded = model.prefill(batch, torch.tensor([6, 10]), capacity=12)
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-4, atol=1e-5)
    token = torch.tensor([5])
    torch.testing.assert_close(
        model.decode_step(torch.tensor([5, 5]), state_padded)[0], model.decode_step(token, state_alone)[0],
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip


def test_state_size_is_constant_for_recurrent_mixers_and_bounded_by_the_window():
    recurrent = _model(pattern="g2k")
    windowed = _model(pattern="AA", attn_window=5)
    full = _model(pattern="AA")
    tokens = torch.zeros(2, 4, dtype=torch.long)
    lengths = torch.tensor([4, 4])
    sizes = {}
    for name, model in [("recurrent", recurrent), ("windowed", windowed), ("full", full)]:
        sizes[name] = [model.prefill(tokens, lengths, capacity=c)[1].nbytes() for c in (16, 64)]
    assert sizes["recurrent"][0] == sizes["recurrent"][1]
    assert sizes["windowed"][0] == sizes["windowed"][1]
    # Full attention: 2 layers x (k, v) x 2 rows x 2 KV heads x capacity x 16 dims x 4 bytes.
    assert sizes["full"] == [2 * 2 * 2 * 2 * c * 16 * 4 for c in (16, 64)]


def test_recurrent_step_continues_the_chunked_recurrence():
    """The decode reference: a chunked prefill's final state, then single steps, equals one chunked run."""
    gen = torch.Generator().manual_seed(4)
    B, T, H, K, V = 2, 21, 2, 8, 6
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=gen))
    b, w = torch.rand(B, T, H, K, generator=gen), torch.rand(B, T, H, V, generator=gen)
    full = chunk_recurrence_torch(q, k, v, g, b=b, w=w)
    split = 13
    o, state = chunk_recurrence_torch(q[:, :split], k[:, :split], v[:, :split], g[:, :split], b=b[:, :split],
                                      w=w[:, :split], output_final_state=True)  # fmt: skip
    steps = [recurrent_step_torch(*(x[:, t : t + 1] for x in (q, k, v, g)), state, b=b[:, t : t + 1], w=w[:, t : t + 1])
             for t in range(split, T)]  # fmt: skip
    torch.testing.assert_close(torch.cat([o, *steps], dim=1), full, rtol=1e-4, atol=1e-5)


def test_cpu_decode_ops_update_the_state_in_place():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 2, 4, generator=gen) for _ in range(3))
    for op, extra in [
        (fused_recurrent_gla, [torch.full((1, 1, 2, 4), -0.1)]),
        (fused_recurrent_gated_delta_rule, [torch.full((1, 1, 2), -0.1), torch.full((1, 1, 2), 0.5)]),
        (fused_recurrent_gdn2, [torch.full((1, 1, 2, 4), -0.1), torch.full((1, 1, 2, 4), 0.5), torch.ones(1, 1, 2, 4)]),
    ]:
        state = torch.zeros(1, 2, 4, 4)
        op(q, k, v, *extra, state)
        assert state.abs().sum() > 0, op.__name__


def test_decode_step_ops_declare_their_state_mutation():
    """The decode step's custom ops (the recurrent mixers' ``*_step``, fla's kernels on CUDA; the KV
    cache write and attention): schema, fake and mutation checks."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 1, 2, 4, generator=gen) for _ in range(3))
    gk, b, w, state = torch.full((2, 1, 2, 4), -0.1), torch.rand(2, 1, 2, 4), torch.rand(2, 1, 2, 4), torch.randn(2, 2, 4, 4)
    torch.library.opcheck(gla_step, (q, k, v, gk, state, 0.5))
    torch.library.opcheck(gated_delta_step, (q, k, v, gk[..., 0], b[..., 0], state, 0.5, True))
    torch.library.opcheck(gdn2_step, (q, k, v, gk, b, w, state, 0.5, True))
    cache = torch.randn(2, 2, 1, 6, 4, generator=gen)  # KVCache.kv
    index = torch.tensor([2, 5])[None, :, None, None, None].expand(2, 2, 1, 1, 4)
    new = torch.stack([k[:, :, :1], v[:, :, :1]])
    expected = cache.clone()
    expected[:, 0, :, 2], expected[:, 1, :, 5] = new[:, 0, :, 0], new[:, 1, :, 0]
    torch.library.opcheck(kv_cache_write, (cache, index, new))
    kv_cache_write(cache, index, new)
    torch.testing.assert_close(cache, expected)
    mask = torch.arange(6) <= torch.tensor([2, 5]).unsqueeze(1)
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[:, None, None, :]
    torch.library.opcheck(decode_sdpa, (q.transpose(1, 2), cache[0], cache[1], bias, True))


def test_compiled_decode_step_matches_eager():
    """``DecodeStep(compile_mode=...)``: the whole step as one graph (fullgraph), every mixer kind, over
    several steps, so a state update lost inside the compiled graph would show; with the projections
    fused (as ``generate`` runs it: the fused blocks' norms and residuals inside the decode GEMM ops)
    against the plain eager step."""
    model = _model(**CASES["mixed"])
    tokens = torch.randint(0, BASE.vocab_size, (3, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        _, state = model.prefill(tokens[:, :3], torch.tensor([3, 2, 1]), capacity=12)
        saved = state.snapshot()
        eager = [model.decode_step(tokens[:, i], state) for i in range(3, 7)]
        state.restore(saved)
        model.fuse_projections()
        step = DecodeStep(model, state, compile_mode="default")
        for i, expected in zip(range(3, 7), eager):
            torch.testing.assert_close(step(tokens[:, i]), expected, rtol=1e-4, atol=1e-5)
    assert state.positions.tolist() == [7, 6, 5]


def test_empty_state_has_the_prefill_state_layout():
    model = _model(**CASES["mixed"])
    _, prefilled = model.prefill(torch.zeros(2, 5, dtype=torch.long), torch.tensor([5, 2]), capacity=9)
    empty = model.empty_decode_state(2, capacity=9)
    assert [(t.shape, t.dtype) for t in empty.tensors()] == [(t.shape, t.dtype) for t in prefilled.tensors()]


def test_fused_projections_keep_weights_and_logits():
    """fuse_projections: the same parameters (as views of one matrix per group), the same logits (to
    fp32 reassociation: GLA's decay runs as one matrix, its low-rank pair multiplied out)."""
    model = _model(**CASES["mixed"])
    tokens = torch.randint(0, BASE.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(tokens)
    _, state = model.prefill(tokens[:, :6], torch.tensor([6, 4]), capacity=12)
    ref_step = model.decode_step(tokens[:, 6], state)
    model.fuse_projections()
    attn = model.layers["1"].mixer
    assert attn.wk.weight.data_ptr() == attn.qkv_group.weight.data_ptr() + attn.wq.weight.numel() * 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref, rtol=1e-4, atol=1e-5)
    _, state = model.prefill(tokens[:, :6], torch.tensor([6, 4]), capacity=12)
    torch.testing.assert_close(model.decode_step(tokens[:, 6], state), ref_step, rtol=1e-4, atol=1e-5)
    gla = model.layers["0"].mixer
    torch.testing.assert_close(gla.input_group.weight[-gla.key_dim :], gla.gk_up.weight @ gla.gk_down.weight)


def test_fla_gla_step_launches_fla_kernel_on_narrow_state_tiles_in_place(monkeypatch):
    """On CUDA the GLA decode step is fla's ``fused_recurrent_fwd_kernel`` on state tiles of
    ``STEP_BLOCK_V`` columns (twice fla's programs for head size 64), the new state written over the
    old one; a shape's first call lets fla's autotuner run on a scratch state. The kernel is swapped
    for a recorder: no GPU here."""
    import contextlib

    from titan_hybrid.ops import fla_kernels, gla

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda **kwargs: launches.append((grid, kwargs))

    monkeypatch.setattr(fla_kernels, "fused_recurrent_fwd_kernel", Recorder())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(gla, "_TUNED_STEPS", set())
    B, H, K, V = 3, 2, 64, 64
    q, k, v = (torch.randn(B, 1, H, n, dtype=torch.bfloat16) for n in (K, K, V))
    gk, state = torch.full((B, 1, H, K), -0.1), torch.randn(B, H, K, V)
    for _ in range(2):
        o = gla.fla_gla_step_in_place(q, k, v, gk, state, 0.125)
    assert o.shape == v.shape and o.dtype == torch.bfloat16
    assert gla.STEP_BLOCK_V == 32 and fla_kernels.fused_recurrent_tiling(K, V)[1] == 64
    (tune_grid, tune), *runs = launches
    assert len(runs) == 2 and tune["ht"] is not state and tune["h0"] is state
    for grid, kwargs in runs:
        assert grid == (2 * B * H,) and (kwargs["BK"], kwargs["BV"]) == (64, 32)
        assert kwargs["h0"] is state and kwargs["ht"] is state and kwargs["o"].dtype == torch.bfloat16
