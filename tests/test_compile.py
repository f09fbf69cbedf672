"""torch.compile as apply_compile applies it: Dynamo compiles one graph per kind of block, not per block."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from titan_hybrid.models.hybrid import HybridLM, HybridModelArgs
from titan_hybrid.models.hybrid.parallelize import apply_compile


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own graphs; apply_compile's recompile_limit does not leak out."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        yield
    torch._dynamo.reset()


def compiled_model(pattern: str) -> HybridLM:
    args = HybridModelArgs(
        dim=64, n_layers=len(pattern), pattern=pattern, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256,
        max_seq_len=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = HybridLM(args)
    model.init_weights()
    apply_compile(model, "aot_eager")  # graphs and guards are the backend's input; aot_eager keeps it fast
    return model


def train_then_validate(model: HybridLM, backward: bool = True) -> None:
    """A training step's forward (and backward), then a no-grad validation forward."""
    tokens = torch.randint(0, 256, (2, 32))
    loss = model(tokens).float().square().mean()
    if backward:
        loss.backward()
    model.eval()
    with torch.no_grad():
        model(tokens)


def test_blocks_of_a_kind_share_one_graph():
    train_then_validate(compiled_model("gAgAgA"))
    # 2 kinds x (training, no-grad): 4 graphs for 6 blocks; every frame compiled, none left eager.
    assert counters["stats"]["unique_graphs"] == 4
    assert counters["frames"]["ok"] == counters["frames"]["total"] == 4


def test_many_kinds_stay_under_the_recompile_limit():
    # 5 kinds x (training, no-grad) = 10 entries of HybridBlock.forward: over Dynamo's default
    # limit of 8, which would run the last two eagerly. (Forward only: enough to compile each.)
    train_then_validate(compiled_model("gdA2k"), backward=False)
    assert counters["stats"]["unique_graphs"] == 10
    assert counters["frames"]["ok"] == counters["frames"]["total"] == 10
