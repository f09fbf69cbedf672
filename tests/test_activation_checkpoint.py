"""Activation checkpointing (TorchTitan's apply_ac, as parallelize_hybrid applies it) changes memory, not math."""

from __future__ import annotations

import copy

import pytest
import torch
from _one_rank import DEBUG_CONFIG, ONE_RANK, loss_and_grads
from torchtitan.config import ConfigManager

from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors
from titan_hybrid.models.hybrid.parallelize import parallelize_hybrid


@pytest.mark.parametrize("mode, option", [("full", "2"), ("selective", "1"), ("selective", "2"), ("selective", "op")])
def test_ac_gives_the_loss_and_grads_of_none(mode, option):
    torch.manual_seed(0)
    plain = HybridLM(hybrid_flavors["debug"])
    tokens = torch.randint(0, 1000, (2, 65))
    job_config = ConfigManager().parse_args([
        "--job.config_file", str(DEBUG_CONFIG), "--activation_checkpoint.mode", mode,
        "--activation_checkpoint.selective_ac_option", option,
    ])  # fmt: skip
    checkpointed = parallelize_hybrid(copy.deepcopy(plain), ONE_RANK, job_config)
    wrapped = [n for n, _ in checkpointed.named_modules() if n.endswith("_checkpoint_wrapped_module")]
    every = 1 if mode == "full" or option == "op" else int(option)
    assert len(wrapped) == len(range(0, plain.model_args.n_layers, every)), wrapped

    want_loss, want_grads = loss_and_grads(plain, tokens)
    got_loss, got_grads = loss_and_grads(checkpointed, tokens)

    assert torch.equal(got_loss, want_loss)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name


def test_depth_recurrence_under_ac_and_compile_gives_the_eager_loss_and_grads():
    """The recurrent blocks run twice inside their checkpoint wrappers and compiled graphs."""
    torch.manual_seed(0)
    args = hybrid_flavors["debug"].replace(
        n_layers=3, pattern="gAA", recur_layers=[1, 2], ln_scale=True, xsa=True, attn_sink=True, mlp="relu2"
    )
    plain = HybridLM(args)
    plain.init_weights()
    assert plain.recurrence_on
    tokens = torch.randint(0, 1000, (2, 33))
    job_config = ConfigManager().parse_args([
        "--job.config_file", str(DEBUG_CONFIG), "--activation_checkpoint.mode", "full", "--compile.enable",
    ])  # fmt: skip
    fast = parallelize_hybrid(copy.deepcopy(plain), ONE_RANK, job_config)

    want_loss, want_grads = loss_and_grads(plain, tokens)
    got_loss, got_grads = loss_and_grads(fast, tokens)

    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
