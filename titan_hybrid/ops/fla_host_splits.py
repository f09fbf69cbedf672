"""fla's varlen bookkeeping for packed documents from the host copy of ``cu_seqlens``: no
device-to-host sync per call.

fla 0.6.0's ``chunk_fwd_h`` and ``chunk_bwd_dh`` (GLA's inter-chunk states, forward, recomputed in
the backward, and their gradients) size their output with ``split_offsets[-1].item()`` when given
``cu_seqlens``: a sync that drains the GPU's queue, 3 per GLA layer and micro-batch (432 a step of
the 308M model, the masked path's idle time in BENCHMARKS.md). The document boundaries are already
on the host once per micro-batch (``resets_to_cu_seqlens`` finds them there), so this backend,
registered through fla's own backend registry for its ``common`` functions (as fla's Ascend backend
is), counts the splits on the host and launches fla's own kernels with exactly fla's arguments.
It accepts only ``cu_seqlens`` whose host copy ``remember_host_copy`` was given; any other call
falls through to fla's function. On by default (``TITAN_HYBRID_HOST_SPLITS=0`` turns it off): on one
H100 it took 18 GLA layers' forward + backward on one micro-batch from 55 syncs to none besides the
micro-batch's own (finding its documents), bitwise equal, and the shipped masked 308M run from
137.0-139.4k to 143.6k tokens/s (BENCHMARKS.md, "Host split counts").

The varlen chunk indices every chunk kernel takes (``chunk_indices``) come from the host copy too:
fla's ``prepare_chunk_indices`` on the device runs a ``repeat_interleave`` whose output size it
reads back (a sync per micro-batch); on the host copy it needs none, and the result is copied over
non-blocking.
"""

from __future__ import annotations

import torch
import triton
from fla.backends import BaseBackend, register
from fla.ops.common.chunk_h import chunk_bwd_kernel_dh, chunk_fwd_kernel_h
from fla.ops.utils import prepare_chunk_indices, prepare_chunk_offsets
from torch.utils.weak import WeakIdKeyDictionary

from titan_hybrid.ops.common import to_device_async

_host_copies = WeakIdKeyDictionary()
_chunk_indices = WeakIdKeyDictionary()  # cu_seqlens -> {chunk size: its chunk indices, on its device}


def remember_host_copy(cu_seqlens: torch.Tensor, cu_seqlens_cpu: torch.Tensor) -> None:
    """Record the host copy of a device ``cu_seqlens`` (kept as long as the device tensor lives)."""
    _host_copies[cu_seqlens] = cu_seqlens_cpu


def host_split_count(cu_seqlens: torch.Tensor, split_size: int) -> int | None:
    """``prepare_chunk_offsets(cu_seqlens, split_size)[-1]`` from the host copy (fla's function on
    it, memoised by fla like the device one, so each layer's call after the first is a lookup);
    None without one."""
    host = _host_copies.get(cu_seqlens)
    if host is None:
        return None
    return int(prepare_chunk_offsets(host, split_size)[-1])


def chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``prepare_chunk_indices(cu_seqlens, chunk_size)``: from the host copy when there is one (fla's
    function on it, copied over without a sync, once per ``cu_seqlens`` and chunk size), else
    fla's function on the device."""
    host = _host_copies.get(cu_seqlens)
    if host is None:
        return prepare_chunk_indices(cu_seqlens, chunk_size)
    by_size = _chunk_indices.setdefault(cu_seqlens, {})
    if chunk_size not in by_size:
        by_size[chunk_size] = to_device_async(prepare_chunk_indices(host, chunk_size), cu_seqlens.device)
    return by_size[chunk_size]


def _accepts(cu_seqlens: torch.Tensor | None) -> tuple[bool, str | None]:
    if cu_seqlens is None or cu_seqlens not in _host_copies:
        return False, "no host copy of cu_seqlens"
    return True, None


@register("common")
class HostSplitCountBackend(BaseBackend):
    """``chunk_fwd_h`` / ``chunk_bwd_dh`` with the split count from the host (fla 0.6.0's bodies otherwise)."""

    backend_type = "titan_hybrid_host_splits"
    env_var = "TITAN_HYBRID_HOST_SPLITS"  # "0" turns it off
    default_enable = True

    def chunk_fwd_h_verifier(self, *args, cu_seqlens: torch.Tensor | None = None, **kwargs) -> tuple[bool, str | None]:
        return _accepts(cu_seqlens)

    def chunk_bwd_dh_verifier(self, *args, cu_seqlens: torch.Tensor | None = None, **kwargs) -> tuple[bool, str | None]:
        return _accepts(cu_seqlens)

    def chunk_fwd_h(
        self, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
        gk: torch.Tensor | None = None, gv: torch.Tensor | None = None, h0: torch.Tensor | None = None,
        output_final_state: bool = False, state_v_first: bool = False, cu_seqlens: torch.Tensor | None = None,
        chunk_size: int = 64, split_size: int | None = None, states_in_fp32: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        B, T, H, K, V = *k.shape, v.shape[-1]
        BS = chunk_size if split_size is None else split_size
        N, NS = len(cu_seqlens) - 1, host_split_count(cu_seqlens, BS)
        state_shape = (V, K) if state_v_first else (K, V)
        h = k.new_empty(B, NS, H, *state_shape, dtype=torch.float if states_in_fp32 else k.dtype)
        ht = k.new_empty(N, H, *state_shape, dtype=torch.float) if output_final_state else None

        def grid(meta):
            return (triton.cdiv(K, meta["BK"]) * triton.cdiv(V, meta["BV"]) * N * H,)

        chunk_fwd_kernel_h[grid](
            k=k, v=v, h=h, g=g, g_gamma=g_gamma, gk=gk, gv=gv, h0=h0, ht=ht, cu_seqlens=cu_seqlens,
            split_offsets=prepare_chunk_offsets(cu_seqlens, BS), T=T, H=H, K=K, V=V, BT=chunk_size, BS=BS,
            USE_G=g is not None, USE_G_GAMMA=g_gamma is not None, USE_GK=gk is not None, USE_GV=gv is not None,
            STATE_V_FIRST=state_v_first,
        )  # fmt: skip
        return h, ht

    def chunk_bwd_dh(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, h0: torch.Tensor | None,
        dht: torch.Tensor | None, scale: float, g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
        gk: torch.Tensor | None = None, gv: torch.Tensor | None = None, state_v_first: bool = False,
        cu_seqlens: torch.Tensor | None = None, chunk_size: int = 64, split_size: int | None = None,
        states_in_fp32: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        B, T, H, K, V = *k.shape, v.shape[-1]
        HQ = q.shape[2]
        BS = chunk_size if split_size is None else split_size
        N, NS = len(cu_seqlens) - 1, host_split_count(cu_seqlens, BS)
        state_shape = (V, K) if state_v_first else (K, V)
        dh = k.new_empty(B, NS, HQ, *state_shape, dtype=torch.float if states_in_fp32 else k.dtype)
        dh0 = torch.empty_like(h0, dtype=torch.float) if h0 is not None else None

        def grid(meta):
            return (triton.cdiv(K, meta["BK"]) * triton.cdiv(V, meta["BV"]) * N * H,)

        chunk_bwd_kernel_dh[grid](
            q=q, g=g, g_gamma=g_gamma, gk=gk, gv=gv, do=do, dh=dh, dht=dht, dh0=dh0, cu_seqlens=cu_seqlens,
            split_offsets=prepare_chunk_offsets(cu_seqlens, BS), scale=scale, T=T, HQ=HQ, H=H, K=K, V=V,
            BT=chunk_size, BS=BS, NG=HQ // H, USE_G=g is not None, USE_G_GAMMA=g_gamma is not None,
            USE_GK=gk is not None, USE_GV=gv is not None, STATE_V_FIRST=state_v_first,
        )  # fmt: skip
        return dh, dh0
