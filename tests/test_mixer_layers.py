"""Delta-rule mixer layers (d, 2, k) on CPU: document isolation, gradients, the short convolution."""

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import logged_losses, run_cmd
from titan_hybrid.models.hybrid import HybridModelArgs, hybrid_flavors, parallelize
from titan_hybrid.models.hybrid.delta import ShortConv, tokens_since_doc_start
from titan_hybrid.models.hybrid.model import MIXER_LAYERS

ARGS = hybrid_flavors["debug"].replace(dim=64, n_heads=4, n_kv_heads=2, delta_expand_v=1.5)
DELTA = ["d", "2", "k"]


def _layer(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = MIXER_LAYERS[kind](ARGS)
    layer.init_weights(std=0.1, out_std=0.1)
    return layer


@pytest.mark.parametrize("kind", DELTA)
def test_output_shape(kind):
    x = torch.randn(2, 13, ARGS.dim)
    assert _layer(kind)(x, None).shape == x.shape


@pytest.mark.parametrize("kind", DELTA)
def test_packed_documents_match_separate_runs(kind):
    """Conv and recurrent state restart at the document start: packed = each document alone."""
    layer = _layer(kind)
    lengths = (7, 18)
    x = torch.randn(1, sum(lengths), ARGS.dim)
    resets = torch.zeros(1, sum(lengths), dtype=torch.bool)
    resets[0, [0, lengths[0]]] = True
    packed = layer(x, resets)
    first, second = x.split(lengths, dim=1)
    torch.testing.assert_close(packed[:, : lengths[0]], layer(first, None), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[:, lengths[0] :], layer(second, None), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", DELTA)
def test_gradients_reach_every_parameter(kind):
    layer = _layer(kind)
    resets = torch.zeros(2, 20, dtype=torch.bool)
    resets[:, 0] = resets[0, 9] = True
    layer(torch.randn(2, 20, ARGS.dim), resets).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_short_conv_matches_conv1d_without_resets():
    torch.manual_seed(0)
    conv = ShortConv(6, 4)
    conv.init_weights()
    x = torch.randn(2, 11, 6)
    ref = F.conv1d(x.transpose(1, 2), conv.weight.unsqueeze(1), padding=3, groups=6)[..., :11]
    torch.testing.assert_close(conv(x, None), F.silu(ref.transpose(1, 2)))


def test_short_conv_never_mixes_documents():
    """No output of a document depends on any input of another one."""
    torch.manual_seed(0)
    conv = ShortConv(3, 4)
    conv.init_weights()
    resets = torch.tensor([[True, False, True, False, False, True, False, False, False]])
    doc = resets.cumsum(1)[0]
    x = torch.randn(1, 9, 3)
    jac = torch.autograd.functional.jacobian(lambda t: conv(t, tokens_since_doc_start(resets)), x)
    dep = jac.abs().sum(dim=(0, 2, 3, 5)) > 0  # [T_out, T_in]
    same_doc = doc[:, None] == doc[None, :]
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    assert not (dep & ~same_doc).any()
    assert (dep == (same_doc & causal & (torch.arange(9)[:, None] - torch.arange(9)[None, :] < 4))).all()


def test_gated_deltanet_on_cuda_checks_the_backward_up_front(monkeypatch):
    """With a ``d`` layer on CUDA, parallelize raises the op's error before any setup."""

    def refuse():
        raise RuntimeError("fla refuses the gated delta backward here")

    monkeypatch.setattr(parallelize, "require_exact_gated_delta_backward", refuse)
    monkeypatch.setattr(parallelize.titan_utils, "device_type", "cuda")
    model = torch.nn.Module()
    model.model_args = HybridModelArgs(dim=64, n_layers=2, pattern="dA", n_heads=4, n_kv_heads=2)
    with pytest.raises(RuntimeError, match="refuses"):
        parallelize.parallelize_hybrid(model, parallel_dims=None, job_config=None)


CPU_WITHOUT_FLA = """
import sys
import torch
import titan_hybrid.generate, titan_hybrid.trainer
from torchtitan.config import ConfigManager
from torchtitan.distributed import ParallelDims
from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors, parallelize
from titan_hybrid.platform.cpu import configure_platform

configure_platform()  # as titan_hybrid.train does
model = HybridLM(hybrid_flavors["debug"].replace(pattern="gd2kA", n_layers=5, vocab_size=97))
model.init_weights()
job_config = ConfigManager().parse_args(["--job.config_file", "train_configs/debug_cpu.toml"])
one_rank = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
model = parallelize.parallelize_hybrid(model, one_rank, job_config)
tokens, positions = torch.randint(0, 97, (2, 20)), torch.cat([torch.arange(7), torch.arange(13)]).expand(2, 20)
model(tokens, positions, labels=tokens).backward()
logits, state = model.prefill(tokens, torch.tensor([20, 9]), capacity=21)
model.decode_step(logits.argmax(-1), state)
assert "fla" not in sys.modules, "a CPU run imported fla"
"""


def test_cpu_runs_never_import_fla():
    """Importing fla costs seconds a process (CI starts ~80 CPU ranks) and its kernels run on CUDA only:
    a CPU rank's and generate's imports, parallelize and every mixer's training and decoding leave it out."""
    result = run_cmd([sys.executable, "-c", CPU_WITHOUT_FLA], env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.distributed
def test_delta_mixers_train_under_torchrun_with_fsdp(run_train):
    """2 gloo ranks, FSDP2: d, 2, k and an attention layer with every option set from the command line.

    Half the debug config's sequence and batch, and the in-thread loader: a quarter of the tokens
    per step, the same properties. 128 tokens a row still span several chunks of each delta rule
    (64 or 16 tokens) and exceed the 64-token attention window; the loss falls by ~1.7 in 10 steps."""
    result = run_train(
        "train_configs/debug_cpu.toml",
        "--training.steps", "10",
        "--training.seq_len", "128",
        "--training.local_batch_size", "2",
        "--hybrid_data.loader", "thread",
        "--hybrid_model.pattern", "d2kA",
        "--hybrid_model.rope_dims", "16",
        "--hybrid_model.attn_sink", "True",
        "--hybrid_model.attn_window", "64",
        "--hybrid_model.mlp", "relu2",
        "--hybrid_model.output_softcap", "30",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = logged_losses(result.stdout + result.stderr)
    assert sorted(losses) == list(range(1, 11)), sorted(losses)
    assert losses[10] < losses[1] - 1.0, losses
