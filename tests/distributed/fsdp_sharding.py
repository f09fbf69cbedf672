"""Run under torchrun (2 gloo ranks): FSDP2 shards every parameter and matches the unsharded model,
for the debug model and for a parameter-golf-shaped one whose recurrent blocks run twice (each
block's FSDP unit all-gathers and reduce-scatters once per pass)."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors
from titan_hybrid.models.hybrid.parallelize import apply_fsdp
from titan_hybrid.platform.cpu import configure_platform


MODELS = {
    "debug": hybrid_flavors["debug"].replace(vocab_size=512),
    "pgolf_gdn_attn, recurrence on": hybrid_flavors["pgolf_gdn_attn"].replace(
        dim=64, ffn_dim=96, rope_dims=8, vocab_size=512, recur_start=0.0
    ),
}


def main() -> None:
    configure_platform()
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    for name, args in MODELS.items():
        check(name, args, mesh)
    dist.destroy_process_group()


def check(model_name: str, args, mesh) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = HybridLM(args)
    reference.init_weights()
    sharded = HybridLM(args)
    sharded.load_state_dict(reference.state_dict())
    assert sharded.recurrence_on == bool(args.recur_layers)
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
        print(f"SHARDED OK ({model_name}): {total_local} of {total} parameters on rank 0")


if __name__ == "__main__":
    main()
