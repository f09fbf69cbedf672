"""Model arguments: the reference sizes, model-level options, and clear errors for bad configurations."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.config import ConfigManager

from titan_hybrid.models.hybrid import HybridLM, HybridModelArgs, ModelConfigError, hybrid_flavors
from titan_hybrid.models.hybrid.model import ReLU2


def test_308m_parameter_count_within_3_percent():
    args = hybrid_flavors["308M"]
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (1024, 24, 16, 4)
    assert args.pattern == "gggA" * 6
    with torch.device("meta"):
        model = HybridLM(args)
    nparams, flops = args.get_nparams_and_flops(model, 4096)
    assert abs(nparams - 308e6) / 308e6 <= 0.03, nparams
    assert flops > 6 * nparams  # the mixers' activation FLOPs are counted on top


def test_tied_embeddings_are_one_parameter():
    model = HybridLM(hybrid_flavors["debug"])
    logits = model(torch.randint(0, 100, (1, 8)))
    assert logits.shape[-1] == hybrid_flavors["debug"].vocab_size
    names = [n for n, _ in model.named_parameters()]
    assert "tok_embeddings.weight" in names and not any("output" in n for n in names)
    # The output projection is the embedding tensor: a row of a token absent from the input gets a
    # gradient (only the projection can give it one) and moves only that token's logit.
    tokens = torch.randint(0, 100, (1, 8))
    model(tokens)[..., 200].sum().backward()
    grad = model.tok_embeddings.weight.grad
    assert grad[200].abs().sum() > 0 and grad[300].abs().sum() == 0
    with torch.no_grad():
        before = model(tokens)
        model.tok_embeddings.weight[200] += 1.0
        moved = (model(tokens) - before).abs().amax(dim=(0, 1)) > 0
    assert moved.nonzero().flatten().tolist() == [200]


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"pattern": "ggxA"}, "pattern"),
        ({"pattern": "ggA", "n_layers": 4}, "pattern"),
        ({"dim": 130, "n_heads": 4}, "n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"gla_expand_k": 0.3}, "gla_expand_k"),
        ({"ffn_dim": 0}, "ffn_dim"),
        ({"rope_dims": 7}, "rope_dims"),
        ({"rope_dims": 64}, "rope_dims"),
        ({"attn_window": -1}, "attn_window"),
        ({"output_softcap": -1.0}, "output_softcap"),
        ({"mlp": "gelu"}, "mlp"),
        ({"delta_head_dim": -8}, "delta_head_dim"),
        ({"delta_expand_v": 0.3}, "delta_expand_v"),
        ({"conv_size": 0}, "conv_size"),
        ({"kla_eps": 0.0}, "kla_eps"),
        ({"attn_type": "varlen"}, "attn_type"),
        ({"attn_type": "flex", "attn_sink": True}, "attn_type"),
    ],
)
def test_bad_configs_name_the_field(changes, field):
    base = dict(dim=128, n_layers=4, pattern="gggA", n_heads=4, n_kv_heads=2, ffn_dim=256)
    with pytest.raises(ModelConfigError, match=f"field '{field}'"):
        HybridModelArgs(**{**base, **changes})


def test_unknown_mixer_letter_lists_the_known_ones():
    with pytest.raises(ModelConfigError, match="field 'pattern'") as error:
        HybridModelArgs(dim=128, n_layers=4, pattern="gdx2", n_heads=4, n_kv_heads=2)
    for letter in "gAd2k":
        assert f"'{letter}'" in str(error.value)


def test_gdn2_kla_1p3b_parameter_count_within_3_percent():
    args = hybrid_flavors["gdn2_kla_1.3B"]
    assert args.pattern == "k" * args.n_layers and args.vocab_size == 32000
    with torch.device("meta"):
        model = HybridLM(args)
    nparams, flops = args.get_nparams_and_flops(model, 4096)
    assert abs(nparams - 1.3e9) / 1.3e9 <= 0.03, nparams
    assert flops > 6 * nparams


def test_gdn2_kla_1p3b_config_tokens_per_step_and_tokenizer(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the TOML's paths are relative to the repo
    config = ConfigManager().parse_args(["--job.config_file", "train_configs/gdn2_kla_1p3b_8gpu.toml"])
    assert config.training.global_batch_size * config.training.seq_len == 1_048_576
    assert config.training.global_batch_size % (8 * config.training.local_batch_size) == 0
    tokenizer = build_hf_tokenizer(config)
    assert tokenizer.get_vocab_size() == hybrid_flavors[config.model.flavor].vocab_size == 32000
    assert tokenizer.eos_id == tokenizer.token_to_id("</s>") == 2


def _tiny(**changes) -> HybridModelArgs:
    base = dict(dim=64, n_layers=4, pattern="d2kA", n_heads=4, n_kv_heads=2, vocab_size=96, ffn_dim=128)
    return HybridModelArgs(**{**base, **changes})


def test_output_softcap_bounds_logits_and_equals_cap_tanh():
    torch.manual_seed(0)
    plain = HybridLM(_tiny(pattern="gggA"))
    plain.init_weights()
    with torch.no_grad():
        plain.tok_embeddings.weight.mul_(400.0)  # logits far beyond the cap
    capped = HybridLM(_tiny(pattern="gggA", output_softcap=5.0))
    capped.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 96, (2, 10))
    raw, out = plain(tokens), capped(tokens)
    assert raw.abs().max() > 5.0 and out.abs().max() <= 5.0
    torch.testing.assert_close(out, 5.0 * torch.tanh(raw / 5.0))


def test_relu2_mlp_equals_formula():
    torch.manual_seed(0)
    mlp = ReLU2(16, 40)
    x = torch.randn(3, 16)
    h = F.leaky_relu(x @ mlp.w1.weight.T, negative_slope=0.5) ** 2
    torch.testing.assert_close(mlp(x), h @ mlp.w2.weight.T)
    model = HybridLM(_tiny(pattern="gA", n_layers=2, mlp="relu2"))
    assert all(isinstance(block.mlp, ReLU2) for block in model.layers.values())


def test_tiny_delta_hybrid_trains_on_cpu():
    """Every new mixer (d, 2, k) plus attention with its options, packed documents: loss falls."""
    torch.manual_seed(0)
    model = HybridLM(_tiny(rope_dims=8, attn_sink=True, attn_window=8, output_softcap=30.0, mlp="relu2"))
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 96, (4, 33))
    positions = torch.cat([torch.arange(12), torch.arange(20)]).expand(4, 32)
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1], positions)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
