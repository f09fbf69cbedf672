"""Sampling and the generate CLI: greedy decoding equals recomputing the full forward per token,
sampling is reproducible per seed, top-k / top-p restrict the choice, and
``python -m titan_hybrid.generate`` runs end to end on a checkpoint of the debug CPU run."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from _train_runs import reference_run
from conftest import run_cmd
from titan_hybrid.generate import Sampling, generate
from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors

ARGS = hybrid_flavors["debug"].replace(
    pattern="gAkA", dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=101, attn_window=6, attn_sink=True
)


@pytest.fixture(scope="module")
def model() -> HybridLM:
    torch.manual_seed(0)
    m = HybridLM(ARGS)
    m.init_weights()
    with torch.no_grad():  # stronger than the training init, so the mixers steer the greedy choice
        for name, p in m.named_parameters():
            if p.ndim >= 2:
                p.mul_(3 if name == "tok_embeddings.weight" else 8)
    return m.eval()


@pytest.mark.parametrize("compile_mode", [None, "default"])
def test_greedy_generation_equals_recomputing_the_whole_sequence(model, compile_mode):
    prompts = [[5, 17, 3], [9], [1, 2, 3, 4, 5, 6, 7]]
    outputs = generate(model, prompts, max_new_tokens=10, sampling=Sampling(temperature=0), compile_mode=compile_mode)
    assert len({t for out in outputs for t in out}) > 10  # not one repeated token
    for prompt, out in zip(prompts, outputs):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out == seq[len(prompt) :]


def test_sampling_is_reproducible_per_seed(model):
    prompts = [[5, 17, 3], [9, 9]]
    sampling = Sampling(temperature=1.0)
    first = generate(model, prompts, 12, sampling, seed=7)
    assert generate(model, prompts, 12, sampling, seed=7) == first
    assert generate(model, prompts, 12, sampling, seed=8) != first


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).expand(200, 4)
    gen = torch.Generator().manual_seed(0)
    assert set(Sampling(top_k=2)(logits, gen).tolist()) == {1, 2}
    assert set(Sampling(top_k=1)(logits, gen).tolist()) == {1}
    # p(1) ~ 0.50, p(2) ~ 0.45: top_p 0.5 keeps token 1 alone, 0.9 keeps both.
    assert set(Sampling(top_p=0.4)(logits, gen).tolist()) == {1}
    assert set(Sampling(top_p=0.9)(logits, gen).tolist()) == {1, 2}
    assert set(Sampling(temperature=1.0)(logits, gen).tolist()) == {0, 1, 2, 3}


def test_generation_stops_at_eos(model):
    greedy = generate(model, [[5, 17, 3]], 10, Sampling(temperature=0))[0]
    eos = greedy[2]
    stopped = generate(model, [[5, 17, 3]], 10, Sampling(temperature=0), eos_id=eos)[0]
    assert stopped == greedy[: greedy.index(eos) + 1]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).replace("_", "-")):
        Sampling(**bad)


def test_generate_cli_on_a_debug_run_checkpoint(tmp_path_factory):
    run = reference_run(tmp_path_factory.getbasetemp())
    cmd = [sys.executable, "-m", "titan_hybrid.generate", "--model", str(run), "--prompt", "The king said",
           "--max-new-tokens", "12", "--seed", "3", "--top-k", "20"]  # fmt: skip
    # A batch of prompts, greedy, from an older checkpoint; --think opens the reasoning block.
    batch_cmd = [sys.executable, "-m", "titan_hybrid.generate", "--model", str(run), "--step", "10", "--think",
                 "--prompt", "What is 2 + 2?", "--prompt", "def f(x):", "--temperature", "0",
                 "--max-new-tokens", "6"]  # fmt: skip
    # Three independent processes, run side by side: each is one thread, mostly importing.
    with ThreadPoolExecutor(3) as pool:
        first, again, batch = pool.map(lambda c: run_cmd(c, timeout=300), [cmd, cmd, batch_cmd])
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("The king said") and len(first.stdout) > len("The king said\n")
    assert again.stdout == first.stdout  # same seed, same text
    assert batch.returncode == 0, batch.stderr[-3000:]
    assert batch.stdout.count("<think>") == 2 and "What is 2 + 2?" in batch.stdout


def test_generate_cli_names_a_missing_model(tmp_path):
    missing = tmp_path / "nope"
    result = run_cmd([sys.executable, "-m", "titan_hybrid.generate", "--model", str(missing), "--prompt", "x"])
    assert result.returncode != 0
    assert str(missing) in result.stderr.strip().splitlines()[-1]
