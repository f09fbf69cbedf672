"""GrokAdamW against a by-hand reference, against torch.optim.AdamW, and through checkpoints."""

import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from titan_hybrid.optim import GrokAdamW, GrokAdamWContainer, param_groups

LR, BETAS, EPS, WD, ALPHA, LAMBDA = 1e-2, (0.9, 0.95), 1e-8, 0.1, 0.98, 2.0


def reference_steps(
    p: torch.Tensor, grads: list[torch.Tensor], cautious: bool, grokfast: bool
) -> torch.Tensor:
    """The update rules written out for one tensor, one step at a time."""
    p, m, v, mu = p.clone(), torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    b1, b2 = BETAS
    for t, g in enumerate(grads, start=1):
        if grokfast:
            mu = ALPHA * mu + (1 - ALPHA) * g
            g = g + LAMBDA * mu
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + EPS)
        if cautious:
            mask = (u * g > 0).to(u.dtype)
            u = u * mask / mask.mean()
        p = p * (1 - LR * WD) - LR * u
    return p


def grads_for(shape: tuple[int, ...], n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("grokfast", [False, True])
@pytest.mark.parametrize("n_steps", [1, 4])
def test_steps_match_reference(cautious: bool, grokfast: bool, n_steps: int) -> None:
    shapes = [(7, 5), (5,), (3, 4, 2)]
    params = [torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
              for i, s in enumerate(shapes)]
    all_grads = [grads_for(s, n_steps, seed=10 + i) for i, s in enumerate(shapes)]
    expected = [reference_steps(p, g, cautious, grokfast) for p, g in zip(params, all_grads)]

    ps = [nn.Parameter(p.clone()) for p in params]
    opt = GrokAdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, cautious=cautious,
                    grokfast=grokfast, grokfast_alpha=ALPHA, grokfast_lambda=LAMBDA)
    for t in range(n_steps):
        for p, g in zip(ps, all_grads):
            p.grad = g[t].clone()
        opt.step()
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_cautious_mask_changes_the_update() -> None:
    """GrokAdamW itself: a component whose momentum disagrees with its gradient's sign is not moved."""
    flipped = torch.arange(64) % 2 == 0
    grads = [torch.ones(64), torch.where(flipped, -0.01, 1.0)]  # step 2: half the signs flip, weakly
    after = {}
    for cautious in (True, False):
        p = nn.Parameter(torch.ones(64, dtype=torch.float64))
        opt = GrokAdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, cautious=cautious)
        steps = []
        for g in grads:
            p.grad = g.to(torch.float64)
            opt.step()
            steps.append(p.detach().clone())
        after[cautious] = steps
    first, second = after[True]
    assert torch.equal(second[flipped], first[flipped]), "masked components moved"
    assert (second[~flipped] < first[~flipped]).all()
    plain_first, plain_second = after[False]
    assert (plain_second[flipped] < plain_first[flipped]).all(), "without the mask they move on their momentum"


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(),
                         nn.Linear(16, 11))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(11, (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), (x * 3) % 11)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_adamw_parity_when_cautious_and_grokfast_off() -> None:
    ours, theirs = tiny_model(), tiny_model()
    kwargs = dict(lr=3e-3, betas=BETAS, eps=EPS, weight_decay=WD)
    train_steps(ours, GrokAdamW(ours.parameters(), cautious=False, grokfast=False, **kwargs), 6, 1)
    train_steps(theirs, torch.optim.AdamW(theirs.parameters(), foreach=False, **kwargs), 6, 1)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ours[2].weight, tiny_model()[2].weight)  # it did train


def test_param_groups_exempt_1d_and_optionally_embeddings() -> None:
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1, decay_embeddings=False)
    assert {id(p) for p in decay["params"]} == {id(model[2].weight), id(model[4].weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 5  # embedding, LayerNorm weight and bias, two Linear biases
    decay, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert id(model[0].weight) in {id(p) for p in decay["params"]}


def test_state_round_trips_through_state_dict() -> None:
    kwargs = dict(lr=3e-3, cautious=True, grokfast=True)
    model = tiny_model()
    opt = GrokAdamW(param_groups(model, WD, False), **kwargs)
    train_steps(model, opt, 3, seed=2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert set(saved_opt["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "grok_ema"}
    train_steps(model, opt, 3, seed=3)

    resumed = tiny_model(seed=5)
    resumed.load_state_dict(saved_model)
    resumed_opt = GrokAdamW(param_groups(resumed, WD, False), **kwargs)
    resumed_opt.load_state_dict(saved_opt)
    train_steps(resumed, resumed_opt, 3, seed=3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_container_state_round_trips_through_dcp(tmp_path) -> None:
    """TorchTitan's checkpointer saves the container with DCP; resuming must continue exactly."""
    kwargs = dict(lr=3e-3, betas=BETAS, eps=EPS, weight_decay=WD, cautious=True, grokfast=True,
                  grokfast_alpha=ALPHA, grokfast_lambda=LAMBDA)
    model = tiny_model()
    opts = GrokAdamWContainer([model], kwargs, decay_embeddings=False)
    train_steps(model, opts, 3, seed=2)
    dcp.save({"model": model.state_dict(), "optimizer": opts}, checkpoint_id=tmp_path)
    train_steps(model, opts, 3, seed=3)

    resumed = tiny_model(seed=5)
    resumed_opts = GrokAdamWContainer([resumed], kwargs, decay_embeddings=False)
    state = {"model": resumed.state_dict(), "optimizer": resumed_opts}
    dcp.load(state, checkpoint_id=tmp_path)
    resumed.load_state_dict(state["model"])
    train_steps(resumed, resumed_opts, 3, seed=3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
