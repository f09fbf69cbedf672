"""Shared pieces of the sequence-mixer ops: the chunked PyTorch recurrence and fla plumbing.

All mixers here are special cases of one matrix-state recurrence per head
(state S is K x V, log-decay g <= 0 per key channel or per head):

    S_t = (I - k_t (b_t * k_t)^T) diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T,   o_t = scale * S_t^T q_t

GLA has no erase term (b = 0, w = 1), Gated DeltaNet has a per-head decay and
b = w = beta, GDN-2 has per-channel b and w. One chunked implementation serves
all of them on CPU. On CUDA, training runs fla's chunk forward / backward functions
as ``torch.library`` custom ops (``fla_layout`` and ``fla_qk_l2norm*`` here are their
shared plumbing), so torch.compile keeps a block in one graph; inference with a final
state calls fla's public functions through ``call_fla``. fla is reached only through
``titan_hybrid.ops.fla_kernels``, imported inside those CUDA paths: CPU runs never import it.

Inference (``titan_hybrid.generate``) uses the same recurrence two more ways, as
fla does: the chunked form returning each row's final state (the prompt's
prefill), and one token at a time from that state (``recurrent_step_torch``,
the readable reference of fla's ``fused_recurrent_*`` decode kernels).

Document boundaries are given as ``resets`` [B, T] (True where a token starts
a new document): the state is zeroed before such a token, exactly as fla's
``cu_seqlens`` varlen mode does on GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

# fla's in-kernel l2norm: x / sqrt(sum(x^2) + eps) (eps inside the root, unlike F.normalize).
L2NORM_EPS = 1e-6
# fla's chunk length for the gated delta rule (its default) and GDN-2 (the only one it takes).
FLA_DELTA_CHUNK = 64
# The chunk length of every fla chunk kernel here on packed rows of >= 64 tokens: the delta rules'
# and the cap of GLA's choice (ops.gla._chunk_size).
FLA_PACKED_CHUNK = FLA_DELTA_CHUNK


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dim in fp32 the way fla's ``use_qk_l2norm_in_kernel`` does."""
    x = x.float()
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + L2NORM_EPS)


def chunk_recurrence_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    scale: float | None = None,
    resets: torch.Tensor | None = None,
    chunk_size: int = 16,
    output_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The recurrence above, chunked; returns ``[B, T, H, V]`` in ``v.dtype``, and with
    ``output_final_state`` also the fp32 state ``[B, H, K, V]`` after each row's last token
    (the state of the row's last document).

    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K or 1]; erase gate b
    [B, T, H, K or 1] (None: no erase, i.e. GLA); write gate w [B, T, H, V or 1]
    (None: 1). A trailing 1 broadcasts (per-head decay / gate) and takes a
    cheaper path for the decay.

    Inside a chunk the delta-rule writes are resolved with the WY form (one
    unit-lower-triangular solve per chunk, as in fla's ``naive_chunk_*``); a
    Python loop runs only over chunks. Pairwise decays ``exp(G_i - G_j)``
    (j <= i) are formed explicitly instead of as ``exp(G_i) * exp(-G_j)``: the
    factorised form overflows in fp32 once a chunk's cumulative decay passes
    ~88 nats, and every exponent here is <= 0. Computation runs in fp32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    C = chunk_size
    pad = (-T) % C
    N = (T + pad) // C

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> fp32 [B, H, N, C, D]
        x = F.pad(x.float(), (0, 0, 0, 0, 0, pad))
        return x.transpose(1, 2).reshape(B, H, N, C, x.shape[-1])

    dtype = v.dtype
    q, k, v = chunks(q) * scale, chunks(k), chunks(v)
    G = chunks(g).cumsum(dim=3)
    if resets is None:
        resets = torch.zeros(B, T, dtype=torch.bool, device=q.device)
    # Segment index of each token inside its chunk: tokens interact only within a segment.
    seg = F.pad(resets, (0, pad)).reshape(B, 1, N, C).long().cumsum(dim=3)
    same_seg = seg.unsqueeze(-1) == seg.unsqueeze(-2)  # [B, 1, N, C, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    mask = same_seg & causal
    # Masked entries get a 0 exponent (never inf - inf).
    decay = (G.unsqueeze(4) - G.unsqueeze(3)).masked_fill(~mask.unsqueeze(-1), 0.0).exp()  # [B,H,N,Ci,Cj,K|1]

    def decayed_scores(a: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """sum_d a_id k_jd exp(G_id - G_jd) where ``keep``, else 0."""
        if decay.shape[-1] == 1:
            s = (a @ k.transpose(-1, -2)) * decay.squeeze(-1)
        else:
            s = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", a, k, decay)
        return s.masked_fill(~keep, 0.0)

    # A token sees the carried state only if no document starts between the
    # chunk start and itself; the carried state survives a chunk only if no
    # document starts in it, and only the last segment writes the next state.
    sees_state = (seg == 0).unsqueeze(-1).float()  # [B, 1, N, C, 1]
    chunk_keeps_state = (seg[..., -1] == 0).float()  # [B, 1, N]
    in_last_seg = (seg == seg[..., -1:]).unsqueeze(-1).float()
    G_last = G[:, :, :, -1]  # [B, H, N, K|1]

    u = v if w is None else v * chunks(w)
    if b is not None:
        # (I + tril(-1) of (b*k) k^T decayed) [u | w_wy] = [w*v | b*k*exp(G)]: the
        # new values are u - w_wy @ S for the state S carried into the chunk.
        # The solve reads only the strict lower triangle of kk (unit diagonal).
        bk = k * chunks(b)
        kk = decayed_scores(bk, mask)
        rhs = torch.cat([u, bk * G.exp() * sees_state], dim=-1)
        u, w_wy = torch.linalg.solve_triangular(kk, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)
    q_from_start = q * G.exp() * sees_state
    k_to_end = k * (G_last.unsqueeze(3) - G).exp() * in_last_seg
    state_decay = (G_last.exp() * chunk_keeps_state.unsqueeze(-1)).unsqueeze(-1)  # [B, H, N, K|1, 1]

    S = q.new_zeros(B, H, K, V)
    o_inter, v_new = [], []
    for n in range(N):
        o_inter.append(q_from_start[:, :, n] @ S)
        v_n = u[:, :, n] if b is None else u[:, :, n] - w_wy[:, :, n] @ S
        v_new.append(v_n)
        S = state_decay[:, :, n] * S + k_to_end[:, :, n].transpose(-1, -2) @ v_n
    o = torch.stack(o_inter, dim=2) + decayed_scores(q, mask) @ torch.stack(v_new, dim=2)
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(dtype)
    return (o, S) if output_final_state else o


def recurrent_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    b: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One token of the recurrence: inputs ``[B, 1, H, *]`` as in ``chunk_recurrence_torch``,
    ``state`` fp32 ``[B, H, K, V]``, updated in place; returns ``o [B, 1, H, V]`` in ``v.dtype``.

    Written as fla's recurrent kernels do: decay, then ``v_new = w * v - (b * k)^T S``
    (the erase read from the decayed state), then the rank-one write ``S += k v_new^T``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = v.dtype
    q, k, v, g = (t[:, 0].float() for t in (q, k, v, g))  # [B, H, *]
    S = state * g.exp().unsqueeze(-1)
    u = v if w is None else v * w[:, 0].float()
    if b is not None:
        u = u - ((b[:, 0].float() * k).unsqueeze(-2) @ S).squeeze(-2)
    S = S + k.unsqueeze(-1) * u.unsqueeze(-2)
    state.copy_(S)
    return (scale * (q.unsqueeze(-2) @ S)).transpose(1, 2).to(dtype)


def resets_to_cu_seqlens(resets: torch.Tensor) -> torch.Tensor:
    """Document starts ``[B, T]`` -> fla's ``cu_seqlens`` over the flattened ``B*T`` tokens.

    The ``cu_seqlens`` a ``HostDocuments`` was bound to ``resets`` with, when there is one (no
    sync). Otherwise found from ``resets`` and memoised by its identity (fla's ``tensor_cache``):
    every layer's forward and backward gets the same ``cu_seqlens`` object, so finding the
    documents (a host sync) runs once per micro-batch instead of once per fla call, and the chunk
    indices memoised for that object (``fla_host_splits.chunk_indices``) hit too. Measured:
    BENCHMARKS.md.
    """
    bound = _bound_cu_seqlens.get(resets)
    return bound if bound is not None else _memoised_cu_seqlens()(resets)


@functools.cache
def _memoised_cu_seqlens() -> Callable[[torch.Tensor], torch.Tensor]:
    """``_cu_seqlens`` under fla's ``tensor_cache``, wrapped once (one cache) on first use."""
    from titan_hybrid.ops import fla_kernels

    return fla_kernels.tensor_cache(_cu_seqlens)


def _cu_seqlens(resets: torch.Tensor) -> torch.Tensor:
    """``resets_to_cu_seqlens`` unbound and uncached: the documents are found on the host (one copy
    of the ``[B, T]`` booleans: the micro-batch's one sync)."""
    host = host_cu_seqlens(resets)
    return _on_device(host, resets.device)


def host_cu_seqlens(resets: torch.Tensor) -> torch.Tensor:
    """fla's ``cu_seqlens`` (int32, on the host) of ``resets [B, T]``: every row's start, every
    document's start, and the total."""
    flat = resets.to("cpu", copy=True)
    flat[:, 0] = True  # every row starts a sequence
    flat = flat.reshape(-1)
    return torch.cat([flat.nonzero().squeeze(-1), torch.tensor([flat.numel()])]).to(torch.int32)


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the GPU: a non-blocking copy, which the
    driver stages from pageable memory at once (a blocking copy waits for the queue to drain).
    Not through ``pin_memory()``: its ``cudaHostAlloc`` stalled the trainer 5-8 ms a micro-batch on
    an H100 (BENCHMARKS.md)."""
    return host.to(device, non_blocking=True)


def _on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` cu_seqlens on ``device``, its host copy kept for fla's varlen bookkeeping
    (``fla_host_splits``: the chunk states' split counts and the chunk indices). The chunk indices
    of ``FLA_PACKED_CHUNK`` go over with it: here the GPU's queue is short (the batch's copy has
    just drained it), so if the driver waits for it to stage a copy, it waits for little."""
    from titan_hybrid.ops import fla_kernels

    cu_seqlens = to_device_async(host, device)
    fla_kernels.remember_host_copy(cu_seqlens, host)
    fla_kernels.chunk_indices(cu_seqlens, FLA_PACKED_CHUNK)
    return cu_seqlens


# resets -> the cu_seqlens a HostDocuments bound to it (kept as long as the resets tensor lives).
_bound_cu_seqlens = WeakIdKeyDictionary()


@dataclass(frozen=True)
class HostDocuments:
    """A micro-batch's documents found on the host, before its tensors go to the GPU.

    The trainer makes one per batch from the loader's ``positions`` (``HybridTrainer.
    batch_generator``); the model binds it to the ``resets`` its forward derives from the same
    positions on the GPU, so that the forward's first fla call does not copy them back to find the
    documents (a device-to-host sync that drains the GPU's queue once per micro-batch)."""

    cu_seqlens: torch.Tensor  # int32, on the host: ``host_cu_seqlens`` of the batch's resets

    @classmethod
    def of_positions(cls, positions: torch.Tensor) -> HostDocuments:
        """From the host ``positions [B, T]`` (a document starts where its position is 0)."""
        return cls(host_cu_seqlens(positions == 0))

    def bind(self, resets: torch.Tensor) -> None:
        """Make these documents ``resets_to_cu_seqlens(resets)``: copied to ``resets``' device
        without a sync. ``resets`` must describe the same documents (it is derived from the same
        positions); a batch of another shape is refused."""
        if self.cu_seqlens[-1].item() != resets.numel():
            raise ValueError(
                f"HostDocuments of {self.cu_seqlens[-1].item()} tokens bound to resets of shape {tuple(resets.shape)}"
            )
        # Off CUDA no fla call reads them (and fla is not imported there): the host tensor will do.
        _bound_cu_seqlens[resets] = _on_device(self.cu_seqlens, resets.device) if resets.is_cuda else self.cu_seqlens


def pack_rows(resets: torch.Tensor | None, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """fla's varlen layout: ``[B, T, ...]`` rows flattened into one packed sequence (fla's varlen
    mode wants batch 1) with its ``cu_seqlens``, the row starts plus the document starts; without
    ``resets`` the tensors as they are and no ``cu_seqlens``."""
    if resets is None:
        return list(tensors), None
    B, T = tensors[0].shape[:2]
    return [x.reshape(1, B * T, *x.shape[2:]) for x in tensors], resets_to_cu_seqlens(resets)


def unpack_rows(rows: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``pack_rows`` undone: ``[1, B*T, ...]`` (or already ``[B, T, ...]``) tensors back to the rows of ``rows``."""
    B, T = rows.shape[:2]
    return [x.reshape(B, T, *x.shape[2:]) for x in tensors]


def fla_layout(
    resets: torch.Tensor | None, chunk_size: int, *tensors: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """``pack_rows``' layout made contiguous (what fla's ``input_guard`` does), its ``cu_seqlens``,
    and the varlen chunk indices that fla's autograd Functions prepare for ``chunk_size`` (from the
    host copy of ``cu_seqlens``: ``fla_host_splits.chunk_indices``)."""
    from titan_hybrid.ops import fla_kernels

    flat, cu_seqlens = pack_rows(resets, *tensors)
    chunk_indices = None if cu_seqlens is None else fla_kernels.chunk_indices(cu_seqlens, chunk_size)
    return [t.contiguous() for t in flat], cu_seqlens, chunk_indices


def qk_norm_placeholders(q: torch.Tensor) -> list[torch.Tensor]:
    """Four empty stand-ins for ``fla_qk_l2norm``'s saved tensors when it is off: a custom op
    returns neither None nor one of its inputs."""
    return [q.new_empty(0) for _ in range(4)]


def fla_qk_l2norm(
    q: torch.Tensor, k: torch.Tensor, enabled: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """fla's ``use_qk_l2norm_in_kernel`` forward (its Triton ``l2norm_fwd``, per row, so on any layout):
    the q and k the kernels take, and what the backward needs, ``[q, k, q_rstd, k_rstd]`` (the
    normalised q, k and their fp32 ``[B, T, H]`` reciprocal norms), or placeholders when off."""
    if not enabled:
        return q, k, qk_norm_placeholders(q)
    from titan_hybrid.ops import fla_kernels

    (q, q_rstd), (k, k_rstd) = fla_kernels.l2norm_fwd(q.contiguous()), fla_kernels.l2norm_fwd(k.contiguous())
    return q, k, [q, k, q_rstd, k_rstd]


def fla_qk_l2norm_fake(q: torch.Tensor, k: torch.Tensor, enabled: bool) -> list[torch.Tensor]:
    """``fla_qk_l2norm``'s saved tensors, as fake (meta) tensors."""
    if not enabled:
        return qk_norm_placeholders(q)
    rstd = [x.new_empty(x.shape[:-1], dtype=torch.float) for x in (q, k)]
    return [q.new_empty(q.shape), k.new_empty(k.shape), *rstd]


def fla_qk_l2norm_bwd(
    q: torch.Tensor, k: torch.Tensor, q_rstd: torch.Tensor, k_rstd: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
    enabled: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of the raw q, k from those of the normalised ones (fla's ``l2norm_bwd``); ``q``,
    ``k``, ``dq``, ``dk`` contiguous in one layout (``pack_rows`` keeps every row's memory order)."""
    if not enabled:
        return dq, dk
    from titan_hybrid.ops import fla_kernels

    return fla_kernels.l2norm_bwd(q, q_rstd.contiguous(), dq), fla_kernels.l2norm_bwd(k, k_rstd.contiguous(), dk)


def call_fla_step(kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]], *tensors: torch.Tensor, state: torch.Tensor,
                  **kwargs) -> torch.Tensor:  # fmt: skip
    """Run an fla ``fused_recurrent_*`` function for one token from ``state`` and copy the fresh
    final state it returns into ``state`` (a CUDA graph replays on fixed buffers): for the kernels
    fla offers no in-place final state for (Gated DeltaNet's; GLA's with key dims above 64).
    Called inside the mixers' ``*_step`` custom ops, which keep it out of torch.compile's tracing."""
    o, new_state = kernel(*tensors, initial_state=state, output_final_state=True, **kwargs)
    state.copy_(new_state)
    return o


def last_document_of_rows(resets: torch.Tensor) -> torch.Tensor:
    """Index, among ``pack_rows``' varlen segments, of each row's last segment ``[B]``."""
    segments = resets.clone()
    segments[:, 0] = True
    return segments.sum(dim=1).cumsum(dim=0) - 1


@torch.compiler.disable
def call_fla(
    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    *tensors: torch.Tensor,
    resets: torch.Tensor | None = None,
    output_final_state: bool = False,
    **kwargs,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run an fla chunk kernel on ``[B, T, H, ...]`` tensors, resets as varlen ``cu_seqlens`` (``pack_rows``).

    With ``output_final_state`` also each row's final state ``[B, H, K, V]`` (of its last
    document: fla returns one per varlen segment). Kept out of torch.compile graphs:
    Triton autotuned kernels are opaque to Dynamo.
    """
    flat, cu_seqlens = pack_rows(resets, *tensors)
    if output_final_state:
        kwargs["output_final_state"] = True
    o, final_state = kernel(*flat, cu_seqlens=cu_seqlens, **kwargs)
    o = o.reshape(*tensors[0].shape[:2], *o.shape[2:])
    if not output_final_state:
        return o
    if cu_seqlens is not None:
        final_state = final_state[last_document_of_rows(resets)]
    return o, final_state
