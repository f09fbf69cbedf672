"""The host-split-count backend for fla's chunk-state functions, checked without a GPU.

fla's kernels cannot run here, so both kernels are swapped for recorders: for the same inputs the
backend must launch exactly what fla's own ``chunk_fwd_h`` / ``chunk_bwd_dh`` launch (same grid,
same arguments, outputs of the same shapes and dtypes), with the split count taken from the host
copy instead of ``.item()``, and fla's dispatch must pick it only for ``cu_seqlens`` it knows.
"""

import pytest
import torch
from fla.ops.common import chunk_h
from fla.ops.utils import prepare_chunk_indices, prepare_chunk_offsets

from titan_hybrid.ops import fla_host_splits
from titan_hybrid.ops.fla_host_splits import host_split_count, remember_host_copy

META = {"BK": 32, "BV": 32}


class Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](**kwargs)`` records the grid and the arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda **kwargs: self.launches.append((grid(META), kwargs))


def _summary(kwargs: dict) -> dict:
    """Tensors by shape, dtype and (for inputs) identity; the rest by value."""
    return {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


@pytest.fixture
def recorders(monkeypatch):
    monkeypatch.delenv("TITAN_HYBRID_HOST_SPLITS", raising=False)  # the default: on
    ours, theirs = Recorder(), Recorder()
    for name in ("chunk_fwd_kernel_h", "chunk_bwd_kernel_dh"):
        monkeypatch.setattr(fla_host_splits, name, ours)
        monkeypatch.setattr(chunk_h, name, theirs)
    return ours, theirs


def _documents(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("split_size", [64, 128, 256])
def test_host_split_count_is_fla_chunk_offsets_total(split_size):
    gen = torch.Generator().manual_seed(split_size)
    for _ in range(20):
        cu_seqlens = _documents(torch.randint(1, 700, (int(torch.randint(1, 12, (1,), generator=gen)),),
                                              generator=gen).tolist())  # fmt: skip
        remember_host_copy(cu_seqlens, cu_seqlens.clone())
        assert host_split_count(cu_seqlens, split_size) == prepare_chunk_offsets(cu_seqlens, split_size)[-1].item()
    assert host_split_count(_documents([5, 6]), 64) is None  # no host copy given


def _inputs(T: int = 300, H: int = 2, K: int = 32, V: int = 48):
    k, v, q, do = torch.randn(1, T, H, K), torch.randn(1, T, H, V), torch.randn(1, T, H, K), torch.randn(1, T, H, V)
    gk = -torch.rand(1, T, H, K)
    return q, k, v, gk, do


@pytest.mark.parametrize("states_in_fp32", [False, True])
@pytest.mark.parametrize("output_final_state", [False, True])
def test_forward_states_launch_what_fla_launches(recorders, states_in_fp32, output_final_state):
    ours, theirs = recorders
    q, k, v, gk, _ = _inputs()
    known, unknown = _documents([100, 37, 163]), _documents([100, 37, 163])
    remember_host_copy(known, known.clone())
    args = dict(k=k, v=v, gk=gk, output_final_state=output_final_state, chunk_size=64, states_in_fp32=states_in_fp32)
    h, ht = chunk_h.chunk_fwd_h(**args, cu_seqlens=known)
    h_fla, ht_fla = chunk_h.chunk_fwd_h(**args, cu_seqlens=unknown)
    assert len(ours.launches) == 1 and len(theirs.launches) == 1, "dispatch: known cu_seqlens -> ours, others -> fla"
    (grid, kwargs), (grid_fla, kwargs_fla) = ours.launches[0], theirs.launches[0]
    assert grid == grid_fla
    kwargs_fla["cu_seqlens"] = known  # the one difference: which (equal) tensor was passed
    assert _summary(kwargs) == _summary(kwargs_fla)
    for name in ("k", "v", "gk", "cu_seqlens"):
        assert kwargs[name] is kwargs_fla[name]
    assert (h.shape, h.dtype) == (h_fla.shape, h_fla.dtype) and h.shape[1] == 2 + 1 + 3  # splits of 64
    assert (ht is None) == (ht_fla is None) == (not output_final_state)


def test_state_gradients_launch_what_fla_launches(recorders):
    ours, theirs = recorders
    q, k, v, gk, do = _inputs()
    known, unknown = _documents([64, 65, 171]), _documents([64, 65, 171])
    remember_host_copy(known, known.clone())
    h0, dht = torch.zeros(3, 2, 32, 48), torch.randn(3, 2, 32, 48)
    args = dict(q=q, k=k, v=v, do=do, h0=h0, dht=dht, scale=0.125, gk=gk, chunk_size=64, states_in_fp32=True)
    dh, dh0 = chunk_h.chunk_bwd_dh(**args, cu_seqlens=known)
    dh_fla, dh0_fla = chunk_h.chunk_bwd_dh(**args, cu_seqlens=unknown)
    assert len(ours.launches) == 1 and len(theirs.launches) == 1
    (grid, kwargs), (grid_fla, kwargs_fla) = ours.launches[0], theirs.launches[0]
    kwargs_fla["cu_seqlens"] = known
    assert grid == grid_fla and _summary(kwargs) == _summary(kwargs_fla)
    assert (dh.shape, dh.dtype, dh0.shape) == (dh_fla.shape, dh_fla.dtype, dh0_fla.shape) and dh.shape[1] == 1 + 2 + 3


@pytest.mark.parametrize("setting", [None, "1", "0"])
def test_on_unless_its_environment_variable_says_0(recorders, monkeypatch, setting):
    ours, theirs = recorders  # the fixture leaves the variable unset
    if setting is not None:
        monkeypatch.setenv("TITAN_HYBRID_HOST_SPLITS", setting)
    _, k, v, gk, _ = _inputs()
    known = _documents([100, 200])
    remember_host_copy(known, known.clone())
    chunk_h.chunk_fwd_h(k=k, v=v, gk=gk, cu_seqlens=known, chunk_size=64)
    launched = (ours if setting != "0" else theirs).launches
    assert len(launched) == 1 and len(ours.launches) + len(theirs.launches) == 1


def test_cu_seqlens_of_a_micro_batch_carry_their_host_copy():
    """``resets_to_cu_seqlens`` (what every GLA layer's fla call gets) is known to the backend."""
    from titan_hybrid.ops.common import resets_to_cu_seqlens

    resets = torch.zeros(2, 100, dtype=torch.bool)
    resets[0, [40, 41]] = True
    resets[1, 90] = True
    cu_seqlens = resets_to_cu_seqlens(resets)
    assert cu_seqlens.tolist() == [0, 40, 41, 100, 190, 200] and cu_seqlens.dtype == torch.int32
    assert not resets[:, 0].any(), "the caller's resets are left as they were"
    assert host_split_count(cu_seqlens, 64) == 1 + 1 + 1 + 2 + 1


def test_the_chunk_indices_go_over_with_the_cu_seqlens(monkeypatch):
    """The packed chunk size's indices are made when the ``cu_seqlens`` are (where the GPU's queue
    is short), so the first fla call finds them made."""
    from titan_hybrid.ops.common import FLA_PACKED_CHUNK, resets_to_cu_seqlens

    resets = torch.zeros(2, 100, dtype=torch.bool)
    resets[1, 7] = True
    cu_seqlens = resets_to_cu_seqlens(resets)
    monkeypatch.setattr(fla_host_splits, "prepare_chunk_indices", None)  # a call from now on would fail
    indices = fla_host_splits.chunk_indices(cu_seqlens, FLA_PACKED_CHUNK)
    assert torch.equal(indices, prepare_chunk_indices(cu_seqlens.clone(), FLA_PACKED_CHUNK))


def test_chunk_indices_come_from_the_host_copy(monkeypatch):
    """fla's chunk indices of a ``cu_seqlens`` with a host copy are fla's function on that copy
    (no ``repeat_interleave`` on the device), made once per chunk size; other ``cu_seqlens`` get
    fla's function on themselves."""
    calls = []

    def recording(cu_seqlens, chunk_size):
        calls.append(cu_seqlens)
        return prepare_chunk_indices(cu_seqlens, chunk_size)

    monkeypatch.setattr(fla_host_splits, "prepare_chunk_indices", recording)
    known, unknown, host = _documents([100, 37, 163]), _documents([100, 37, 163]), _documents([100, 37, 163])
    remember_host_copy(known, host)
    indices = fla_host_splits.chunk_indices(known, 64)
    assert torch.equal(indices, prepare_chunk_indices(unknown, 64)) and indices.dtype == known.dtype
    assert fla_host_splits.chunk_indices(known, 64) is indices and calls == [host]
    assert torch.equal(fla_host_splits.chunk_indices(known, 16), prepare_chunk_indices(unknown, 16))
    assert torch.equal(fla_host_splits.chunk_indices(unknown, 64), indices) and calls == [host, host, unknown]
