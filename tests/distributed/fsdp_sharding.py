"""Run under torchrun (2 gloo ranks): FSDP2 shards every parameter and matches the unsharded model."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors
from titan_hybrid.models.hybrid.parallelize import apply_fsdp
from titan_hybrid.platform.cpu import configure_platform


def main() -> None:
    configure_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    args = hybrid_flavors["debug"].replace(vocab_size=512)
    torch.manual_seed(0)
    reference = HybridLM(args)
    reference.init_weights()
    sharded = HybridLM(args)
    sharded.load_state_dict(reference.state_dict())
    apply_fsdp(sharded, mesh, torch.float32, torch.float32, reshard_after_forward=True)

    total_local = 0
    for name, param in sharded.named_parameters():
        assert isinstance(param, DTensor), f"{name} is not a DTensor"
        assert param.placements == (Shard(0),), f"{name}: {param.placements}"
        total_local += param.to_local().numel()
    total = sum(p.numel() for p in reference.parameters())
    assert total_local < total / world + 1024 * world, (total_local, total)

    # Every rank sees the full batch; FSDP sums gradients (no division), so compare to world * grad.
    tokens = torch.randint(0, args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    for model in (reference, sharded):
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for (name, p_ref), p in zip(reference.named_parameters(), sharded.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), world * p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)
    if rank == 0:
        print(f"SHARDED OK: {total_local} of {total} parameters on rank 0")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
