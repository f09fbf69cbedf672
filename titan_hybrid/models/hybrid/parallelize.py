"""Activation checkpointing, torch.compile and FSDP2 for the hybrid LM.

AC and the FSDP gradient-scaling convention come from TorchTitan as they are.
FSDP wrapping is our own because the output projection is tied to the token
embedding: the embedding must stay in the root FSDP unit so that it is
gathered for the final projection as well as for the lookup.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import disable_fsdp_gradient_division
from torchtitan.tools import utils as titan_utils
from torchtitan.tools.logging import logger

from titan_hybrid.ops.gated_delta import require_exact_gated_delta_backward

# Ops whose outputs selective op-level AC keeps instead of recomputing.
_OP_SAC_SAVE_LIST = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_attention_math.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}
# Dynamo cache entries one block may need: training and no-grad (validation) graphs, each with
# static and then dynamic shapes (after a validation seq_len that differs from training's).
_GRAPHS_PER_BLOCK = 4


def parallelize_hybrid(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    if "d" in model.model_args.pattern and titan_utils.device_type == "cuda":
        # fla refuses the Gated DeltaNet backward on some GPU/Triton pairs; say so before training starts.
        require_exact_gated_delta_backward()
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_model,
            op_sac_save_list=_OP_SAC_SAVE_LIST,
            base_folder=job_config.job.dump_folder,
        )
    if compile_model:
        apply_compile(model, job_config.compile.backend)
    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(
            model,
            parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            reshard_after_forward=job_config.parallelism.fsdp_reshard_after_forward != "never",
        )
    return model


def apply_compile(model: nn.Module, backend: str) -> None:
    """Compile each block; fla's Triton kernels stay outside the graph (see ops/gla.py).

    Blocks of one kind share one compiled graph: every block runs ``HybridBlock.forward`` (or
    AC's wrapper around it), whose guards check the mixer's type and settings, not which block it
    is (parameters are graph inputs), so a 24-block ``gggA`` model compiles 2 graphs, not 24
    (``tests/test_compile.py``)."""
    _fit_recompile_limit(len(model.layers))
    for layer_id, block in model.layers.named_children():
        model.layers.register_module(layer_id, torch.compile(block, backend=backend))
    logger.info(
        f"Compiled each hybrid block with torch.compile (one graph per block kind; "
        f"recompile_limit {torch._dynamo.config.recompile_limit})"
    )


def _fit_recompile_limit(n_blocks: int) -> None:
    """All kinds' graphs are cache entries of one code object, and Dynamo runs a code object
    eagerly (with a warning) once it holds ``recompile_limit`` (8) of them: five mixer kinds
    trained and validated already need 10. Allow each block its training and no-grad graphs, each
    twice (static, then dynamic shapes), as if every block were a kind of its own."""
    limit = max(torch._dynamo.config.recompile_limit, _GRAPHS_PER_BLOCK * n_blocks)
    torch._dynamo.config.recompile_limit = limit


def apply_fsdp(
    model: nn.Module,
    mesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool,
) -> None:
    """One FSDP unit per block; the root unit holds the tied embedding and final norm."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    disable_fsdp_gradient_division(model)
    if mesh.device_type == "cpu":
        # gloo has no PREMUL_SUM reduce-scatter; use SUM (gradients are not
        # divided by FSDP here anyway: the loss is normalised by global tokens).
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    logger.info("Applied FSDP2 to the hybrid model")
