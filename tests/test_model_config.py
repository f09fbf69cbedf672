"""Model arguments: the 308M reference size, and clear errors for bad configurations."""

import pytest
import torch

from titan_hybrid.models.hybrid import HybridLM, HybridModelArgs, ModelConfigError, hybrid_flavors


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


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"pattern": "ggxA"}, "pattern"),
        ({"pattern": "ggA", "n_layers": 4}, "pattern"),
        ({"dim": 130, "n_heads": 4}, "n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"gla_expand_k": 0.3}, "gla_expand_k"),
        ({"ffn_dim": 0}, "ffn_dim"),
    ],
)
def test_bad_configs_name_the_field(changes, field):
    base = dict(dim=128, n_layers=4, pattern="gggA", n_heads=4, n_kv_heads=2, ffn_dim=256)
    with pytest.raises(ModelConfigError, match=f"field '{field}'"):
        HybridModelArgs(**{**base, **changes})
