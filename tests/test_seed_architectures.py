"""The parameter-golf options against explicit references: XSA, ln_scale, depth recurrence and the
attention-score soft-cap (SDPA and FlexAttention paths), their FLOP count and their config errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_attention import eager_flex, flex_positions  # noqa: F401 (a fixture)

from titan_hybrid.export import args_at_step
from titan_hybrid.models.hybrid import HybridLM, ModelConfigError, hybrid_flavors
from titan_hybrid.models.hybrid.attention import (
    Attention,
    attention_mask,
    exclusive_self_attention,
    flex_block_mask,
    rope_cache,
)

SMALL = hybrid_flavors["debug"].replace(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64)
T = 24


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, SMALL.dim, generator=gen)
    positions = torch.cat([torch.arange(15), torch.arange(T - 15)]).expand(2, T)  # two documents per row
    return x, positions, (positions == 0).cumsum(1), rope_cache(SMALL.head_dim, 64, SMALL.rope_theta)


def _attention(seed: int = 0, **changes) -> Attention:
    torch.manual_seed(seed)
    layer = Attention(SMALL.replace(**{k: v for k, v in changes.items() if k != "xsa"}), xsa=changes.get("xsa", False))
    layer.init_weights(0.3, 0.3)  # large enough that the scores reach the soft-cap
    return layer


def _heads(layer: Attention, x, positions, doc_ids, rope):
    """The layer's per-head outputs ``[B, H, T, D]`` before W_o, and its values ``[B, KV, T, D]``."""
    q, k, v = layer._qkv(x, rope, positions)
    mask = attention_mask(T, doc_ids, 0, False, x.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), v


def test_xsa_output_is_orthogonal_to_each_tokens_own_value_and_equals_the_formula():
    x, positions, doc_ids, rope = _inputs()
    layer = _attention(xsa=True)
    o, v = _heads(layer, x, positions, doc_ids, rope)
    got = exclusive_self_attention(o, v)
    groups = SMALL.n_heads // SMALL.n_kv_heads
    for h in range(SMALL.n_heads):
        own = v[:, h // groups]  # GQA: head h reads KV head h // groups
        dot = (got[:, h] * own).sum(-1)
        assert dot.abs().max() < 1e-5 * own.norm(dim=-1).max() * got[:, h].norm(dim=-1).max()
        want = o[:, h] - ((o[:, h] * own).sum(-1, keepdim=True) / own.square().sum(-1, keepdim=True)) * own
        torch.testing.assert_close(got[:, h], want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = layer(x, rope, positions, doc_ids)
    torch.testing.assert_close(out, layer.wo(got.transpose(1, 2).flatten(2)), rtol=1e-5, atol=1e-6)


def test_xsa_and_softcap_on_the_flex_path_match_the_sdpa_path(eager_flex):
    positions = flex_positions([[70, 58], [128]])  # two documents in one row, one in the other
    gen = torch.Generator().manual_seed(0)
    x, doc_ids = torch.randn(2, 128, SMALL.dim, generator=gen), (positions == 0).cumsum(1)
    rope = rope_cache(SMALL.head_dim, 128, SMALL.rope_theta)
    block_mask = flex_block_mask(doc_ids, 0, 128)
    for changes in (dict(xsa=True), dict(attn_softcap=2.0), dict(xsa=True, attn_softcap=2.0)):
        layer = _attention(**changes)
        with torch.no_grad():  # FlexAttention has no backward on CPU
            flex, sdpa = layer(x, rope, positions, doc_ids, block_mask), layer(x, rope, positions, doc_ids)
        torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-5, msg=str(changes))


def test_softcapped_scores_equal_the_formula():
    x, positions, doc_ids, rope = _inputs()
    cap = 2.0
    layer = _attention(attn_softcap=cap)
    q, k, v = layer._qkv(x, rope, positions)
    k, v = (t.repeat_interleave(SMALL.n_heads // SMALL.n_kv_heads, dim=1) for t in (k, v))
    scores = cap * torch.tanh(q @ k.transpose(-1, -2) / math.sqrt(SMALL.head_dim) / cap)
    assert scores.abs().max() > 0.9 * cap, "the cap is never reached: the test would not see it"
    allowed = (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)) & torch.ones(T, T, dtype=torch.bool).tril()
    weights = scores.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(-1)
    want = layer.wo((weights @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(layer(x, rope, positions, doc_ids), want, rtol=1e-5, atol=1e-6)
    uncapped = _attention(attn_softcap=0.0)
    assert not torch.allclose(uncapped(x, rope, positions, doc_ids), want, atol=1e-3)


def _model(recurrence_on: bool | None = None, **changes) -> HybridLM:
    args = SMALL.replace(n_layers=len(changes.get("pattern", "gAgA")), **{"pattern": "gAgA", **changes})
    torch.manual_seed(0)
    model = HybridLM(args)
    model.init_weights()
    if recurrence_on is not None:
        model.recurrence_on = recurrence_on
    return model


def _by_hand(model: HybridLM, tokens: torch.Tensor, order: list[int], ln_scale: bool) -> torch.Tensor:
    """Embedding, the blocks in ``order`` (each pre-norm output scaled by 1/sqrt(depth + 1)), norm, logits."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    h = model.tok_embeddings(tokens)
    for depth, i in enumerate(order):
        block = model.layers[str(i)]
        scale = 1 / math.sqrt(depth + 1) if ln_scale else 1.0
        mixed = block.mixer_norm(h) * scale
        if block.mixer_kind == "A":
            h = h + block.mixer(mixed, model.rope, positions, None)
        else:
            h = h + block.mixer(mixed, None)
        h = h + block.mlp(block.mlp_norm(h) * scale)
    return F.linear(model.norm(h), model.tok_embeddings.weight)


TOKENS = torch.randint(0, SMALL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))


def test_ln_scale_scales_each_blocks_norm_outputs_by_its_depth():
    model = _model(ln_scale=True)
    torch.testing.assert_close(model(TOKENS), _by_hand(model, TOKENS, [0, 1, 2, 3], ln_scale=True))
    plain = _model(ln_scale=False)
    assert not torch.allclose(plain(TOKENS), model(TOKENS), atol=1e-4)


def test_recurrence_runs_the_segment_twice_with_shared_weights_and_unrolled_depth_scales():
    model = _model(pattern="2AgAA", ln_scale=True, recur_layers=[1, 3], recur_start=0.4)
    assert not model.recurrence_on, "recur_start > 0: off until the trainer switches it on"
    torch.testing.assert_close(model(TOKENS), _by_hand(model, TOKENS, [0, 1, 2, 3, 4], ln_scale=True))
    model.recurrence_on = True
    torch.testing.assert_close(model(TOKENS), _by_hand(model, TOKENS, [0, 1, 2, 3, 1, 2, 3, 4], ln_scale=True))
    assert len({p.data_ptr() for p in model.parameters()}) == len(list(model.parameters()))  # no copies


def test_recurrence_switches_on_after_the_fraction_of_steps():
    args = SMALL.replace(n_layers=4, pattern="gAgA", recur_layers=[1, 2], recur_start=0.4)
    assert [s for s in range(1, 21) if args.recurrence_on_at(s, 20)] == list(range(9, 21))
    assert all(args.replace(recur_start=0.0).recurrence_on_at(s, 20) for s in range(1, 21))
    assert not any(args.replace(recur_layers=[]).recurrence_on_at(s, 20) for s in range(1, 21))


@pytest.mark.parametrize(
    "pattern, segment, unrolled_pattern", [("gAdA", [1, 2], "gAdAdA"), ("gAdA", [0, 1], "gAgAdA")]
)
def test_recurrence_flops_count_the_segment_twice(pattern, segment, unrolled_pattern):
    """FLOPs with the segment run twice = those of a model that has its blocks twice (unique params
    aside); the second case's segment differs in size from the blocks after it."""
    seq = 64
    model = _model(pattern=pattern, recur_layers=segment)
    unrolled = _model(pattern=unrolled_pattern)
    _, off = model.model_args.get_nparams_and_flops(model, seq)
    _, on = model.model_args.get_nparams_and_flops(model, seq, recurrence_on=True)
    _, want = unrolled.model_args.get_nparams_and_flops(unrolled, seq)
    assert on == want and on > off


def test_a_checkpoint_loads_as_it_ran_at_its_step():
    args = SMALL.replace(n_layers=4, pattern="gAgA", recur_layers=[1, 2], recur_start=0.5)
    names = ("dim", "n_layers", "pattern", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "recur_layers", "recur_start")
    marker = {"model": {"args": {k: getattr(args, k) for k in names}}, "training_steps": 20}
    before, after = args_at_step({**marker, "step": 10}), args_at_step({**marker, "step": 11})
    assert not HybridLM(before).recurrence_on and before.recur_layers == []
    assert HybridLM(after).recurrence_on and after.recur_layers == [1, 2]


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(xsa=[0]), "xsa"),  # layer 0 is 'g'
        (dict(xsa=[7]), "xsa"),
        (dict(recur_layers=[2, 1]), "recur_layers"),
        (dict(recur_layers=[1]), "recur_layers"),
        (dict(recur_layers=[0, 4]), "recur_layers"),
        (dict(recur_start=1.0), "recur_start"),
        (dict(attn_softcap=-1.0), "attn_softcap"),
    ],
)
def test_bad_options_name_the_field(changes, field):
    with pytest.raises(ModelConfigError, match=f"field '{field}'"):
        SMALL.replace(n_layers=4, pattern="gAgA", **changes)
