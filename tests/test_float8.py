"""float8 linears through TorchTitan's own converter (``--model.converters quantize.linear.float8``,
torchao), emulated on CPU: which of the hybrid's layers it swaps, that the loss and gradients stay
those of the high-precision model up to float8 rounding, and that the state dict (checkpoints,
exports) keeps its names and shapes."""

from __future__ import annotations

import copy

import torch
from _one_rank import DEBUG_CONFIG, ONE_RANK, loss_and_grads
from torchtitan.config import ConfigManager
from torchtitan.protocols.model_converter import build_model_converters

from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors


def test_float8_converter_swaps_the_block_linears_and_keeps_loss_grads_and_state_dict():
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    plain = HybridLM(hybrid_flavors["debug"])
    plain.init_weights()
    job_config = ConfigManager().parse_args([
        "--job.config_file", str(DEBUG_CONFIG), "--model.converters", "quantize.linear.float8",
        "--quantize.linear.float8.emulate", "--quantize.linear.float8.filter_fqns", "mixer.gk_",
    ])  # fmt: skip
    converted = copy.deepcopy(plain)
    build_model_converters(job_config, ONE_RANK).convert(converted)

    linears = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    swapped = {n for n, m in converted.named_modules() if isinstance(m, Float8Linear)}
    assert swapped == {n for n in linears if ".mixer.gk_" not in n} and len(swapped) == 3 * 8 + 7, sorted(swapped)
    state, plain_state = converted.state_dict(), plain.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == {k: (v.shape, v.dtype) for k, v in plain_state.items()}

    tokens = torch.randint(0, 1000, (2, 65))
    want_loss, want_grads = loss_and_grads(plain, tokens)
    got_loss, got_grads = loss_and_grads(converted, tokens)
    assert not torch.equal(got_loss, want_loss), "the swapped layers must compute in float8"
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=0)
    # Gradients pass through e5m2 (2 mantissa bits, one scale a tensor): 7-47 % apart elementwise
    # in this small random model, yet pointing the same way.
    for name, grad in want_grads.items():
        cosine = torch.nn.functional.cosine_similarity(got_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.85, (name, cosine)
