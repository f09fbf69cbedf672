"""``--format fla``: our GLA + attention models as fla's GLAForCausalLM. fla's layers do not run
on CPU (its attention needs flash-attn, its GLA Triton kernels), so this checks what CPU can:
fla loads the folder with every weight in place, and the one weight transform (RoPE rows) keeps
every attention score; docs/hf_export.md compares the remaining ops from the code."""

from __future__ import annotations

import fla.layers.attn
import pytest
import torch
from fla.models import GLAForCausalLM
from fla.modules.rotary.ops import rotary_embedding_ref

from titan_hybrid.export import load_exported, save_fla
from titan_hybrid.hf.fla_gla import FlaGLAStateDictAdapter, fla_mismatches
from titan_hybrid.models.hybrid import HybridLM, HybridModelArgs, hybrid_flavors
from titan_hybrid.models.hybrid.attention import apply_rope

ARGS = HybridModelArgs(
    dim=32, n_layers=4, pattern="gAgA", n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=256, attn_window=6
)


@pytest.fixture(scope="module")
def ours() -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(ARGS)
    model.init_weights()
    return model.eval()


def test_which_configurations_map():
    assert fla_mismatches(hybrid_flavors["308M"]) == [] and fla_mismatches(hybrid_flavors["debug"]) == []
    found = " ".join(fla_mismatches(ARGS.replace(pattern="gAd2", rope_dims=4, attn_sink=True, mlp="relu2")))
    for reason in ("pattern 'gAd2'", "rope_dims = 4", "attn_sink", "mlp = 'relu2'"):
        assert reason in found
    with pytest.raises(ValueError, match="not expressible as fla's GLAForCausalLM"):
        save_fla(HybridLM(ARGS.replace(output_softcap=30.0)), "unused")


def test_fla_loads_every_weight(ours, tmp_path, monkeypatch):
    # fla's Attention refuses to be built without flash-attn; nothing here runs it.
    monkeypatch.setattr(fla.layers.attn, "flash_attn_func", object())
    save_fla(ours, str(tmp_path))
    model, info = GLAForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert model.lm_head.weight is model.model.embeddings.weight  # tied, as ours
    assert [type(layer.attn).__name__ for layer in model.model.layers] == ["GatedLinearAttention", "Attention"] * 2
    assert model.model.layers[1].attn.window_size == ARGS.attn_window
    assert model.model.layers[1].attn.num_kv_heads == ARGS.n_kv_heads
    # And back: the adapter's inverse gives our weights exactly.
    back = FlaGLAStateDictAdapter(ARGS).from_hf(model.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(ValueError, match="not a titan_hybrid export"):
        load_exported(str(tmp_path))


def test_rope_row_permutation_keeps_attention_scores(ours):
    """Our interleaved RoPE on our q/k equals fla's half-split RoPE (its reference op) on the
    permuted projections: the same q . k for every pair of positions and head."""
    attn = ours.layers["1"].mixer
    fla_weights = FlaGLAStateDictAdapter(ARGS).to_hf(ours.state_dict())
    x = torch.randn(2, 12, ARGS.dim, generator=torch.Generator().manual_seed(1))
    T, d = x.shape[1], ARGS.head_dim
    positions = torch.arange(T).expand(2, T)
    q = apply_rope(attn.wq(x).view(2, T, -1, d), ours.rope, positions)
    k = apply_rope(attn.wk(x).view(2, T, -1, d), ours.rope, positions)
    cos, sin = ours.rope[:T, :, 0], ours.rope[:T, :, 1]  # fla's table: cos/sin of t * theta^(-2i/d)
    q_fla = rotary_embedding_ref((x @ fla_weights["model.layers.1.attn.q_proj.weight"].T).view(2, T, -1, d), cos, sin)
    k_fla = rotary_embedding_ref((x @ fla_weights["model.layers.1.attn.k_proj.weight"].T).view(2, T, -1, d), cos, sin)
    scores = torch.einsum("bqhd,bkd->bhqk", q, k[:, :, 0])  # one KV head
    scores_fla = torch.einsum("bqhd,bkd->bhqk", q_fla, k_fla[:, :, 0])
    assert (scores - scores_fla).abs().max().item() <= 1e-5
    assert not torch.allclose(q, q_fla)  # the layouts do differ: the permutation is doing the work
