"""The fla functions the ops call on CUDA tensors, in one module that is imported on first use.

Importing fla costs seconds per process: its ``__init__`` pulls in all its layers, models
and ``transformers``. CPU runs (CI's gloo ranks among them) never call its Triton kernels, so
the ops import this module inside their CUDA branches only, and a CPU process never imports
fla. fla is a hard dependency: on CUDA a missing fla is an ImportError, not a slow fallback.
The import logs its duration: it lands in a run's first step (3.8 s on the 2-core CPU).
"""

import logging
import time

_import_start = time.perf_counter()  # before fla's imports: their time is what is logged

from fla.modules.l2norm import l2norm_bwd, l2norm_fwd
from fla.ops.common.fused_recurrent import _fused_recurrent_tiling as fused_recurrent_tiling
from fla.ops.common.fused_recurrent import fused_recurrent_fwd_kernel
from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_bwd, chunk_gated_delta_rule_fwd
from fla.ops.gdn2 import chunk_gdn2
from fla.ops.gdn2.chunk_bwd import chunk_gdn2_bwd
from fla.ops.gdn2.chunk_fwd import chunk_gdn2_fwd
from fla.ops.gdn2.fused_recurrent import fused_recurrent_gdn2_fwd
from fla.ops.gla import chunk_gla, fused_recurrent_gla
from fla.ops.gla.chunk import chunk_gla_bwd, chunk_gla_fwd
from fla.ops.utils.constant import RCP_LN2
from fla.ops.utils.cumsum import chunk_local_cumsum
from fla.utils import custom_device_ctx, tensor_cache

from titan_hybrid.ops.fla_host_splits import chunk_indices, remember_host_copy  # and registers its fla backend

logging.getLogger(__name__).info("imported fla in %.1f s (on the first fla call)", time.perf_counter() - _import_start)

__all__ = [
    "RCP_LN2",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_bwd",
    "chunk_gated_delta_rule_fwd",
    "chunk_gdn2",
    "chunk_gdn2_bwd",
    "chunk_gdn2_fwd",
    "chunk_gla",
    "chunk_gla_bwd",
    "chunk_gla_fwd",
    "chunk_indices",
    "chunk_local_cumsum",
    "custom_device_ctx",
    "fused_recurrent_fwd_kernel",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gdn2_fwd",
    "fused_recurrent_gla",
    "fused_recurrent_tiling",
    "l2norm_bwd",
    "l2norm_fwd",
    "remember_host_copy",
    "tensor_cache",
]
