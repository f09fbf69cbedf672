"""GrokAdamW on FSDP2-sharded (DTensor) parameters equals GrokAdamW on the full tensors.

Two gloo ranks on CPU; the shapes split unevenly so each rank's share of the cautious mask
differs, which a per-shard mask mean would get wrong.
"""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from titan_hybrid.optim import GrokAdamW, param_groups

WORLD_SIZE = 2
STEPS = 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 13), nn.LayerNorm(13), nn.Tanh(), nn.Linear(13, 5))


def run_steps(model: nn.Module) -> None:
    opt = GrokAdamW(param_groups(model, 0.1, decay_embeddings=True), lr=1e-2,
                    cautious=True, grokfast=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(16, 6, generator=gen)  # every rank sees the same batch
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        reference = make_model()
        run_steps(reference)
        sharded = make_model()
        for layer in (sharded[0], sharded[3]):
            fully_shard(layer)
        fully_shard(sharded)
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
        run_steps(sharded)
        for (name, p), ref in zip(sharded.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.full_tensor(), ref.detach(), rtol=1e-5, atol=1e-6,
                                       msg=name)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_sharded_step_equals_unsharded() -> None:
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD_SIZE, join=True)
