"""TorchTitan's CheckpointManager, made safe to resume from after faults.

TorchTitan treats any ``step-N`` folder with a ``.metadata`` file as loadable.
That is not enough: a shard can be truncated after the fact, a step folder can
be rewritten in place, and the last save of a run is model-only by default.
``ResilientCheckpointManager`` adds:

- a completion marker (``COMPLETE_MARKER``), written by rank 0 once DCP has
  finished (for async saves: when the save future resolves), listing every
  file of the step with its size and xxh3-64 checksum, whether the step is
  model-only, and the model/tokenizer description that ``titan_hybrid.export``
  needs;
- at resume, the newest *complete, intact, full* checkpoint is chosen (rank 0
  decides, all ranks follow; every file's checksum is verified, because DCP
  loads same-size garbage silently); rejected ones are reported with the
  reason and left as they are, or stop the run with ``[checkpoint]
  on_fallback = "stop"``; an explicit ``checkpoint.load_step`` that is not
  valid is an error;
- before saving into a ``step-N`` folder that already exists, the old folder
  is moved to ``SUPERSEDED_DIR`` rather than overwritten in place (the newest
  ``keep_superseded`` of those are kept);
- no checkpoint is written from non-finite weights;
- ``keep_latest_k`` counts complete checkpoints only;
- a data-loader state that this run cannot take (other ``[hybrid_data] streams``)
  is reported with the way out, before DCP fails on a missing key;
- ``RNGState``: every rank's Python / NumPy / torch RNG state, saved as one
  replicated object so that it loads on any world size.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import xxhash
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpoint import DATALOADER, MODEL, AsyncMode, CheckpointManager
from torchtitan.tools.logging import logger

COMPLETE_MARKER = ".complete.json"
SUPERSEDED_DIR = "superseded"
RNG = "rng"
CHECKSUM = "xxh3_64"
"""The marker's key for ``{file name: hex digest}``; xxh3-64 reads and hashes ~1 GiB in 60 ms on one CPU core."""
MODEL_ONLY = "model-only (last_save_model_only), it cannot restore optimizer and data state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class NonFiniteWeightsError(RuntimeError):
    """The model holds NaN/Inf values; checkpointing it would poison every resume."""


class CheckpointFallbackError(RuntimeError):
    """A newer checkpoint was unusable and ``[checkpoint] on_fallback = "stop"``."""


def file_checksum(path: str) -> str:
    """xxh3-64 of a file's bytes, read in 8 MiB blocks."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(step_dir: str, verify_content: bool = True) -> str | None:
    """Why ``step_dir`` cannot be loaded, or None when it is complete and intact.

    Sizes are checked for every file before any checksum, so a truncated shard is found
    without reading the others; ``verify_content=False`` stops there (purging needs only
    completeness). Markers written before checksums existed are checked by size.
    """
    marker = os.path.join(step_dir, COMPLETE_MARKER)
    if not os.path.isfile(os.path.join(step_dir, ".metadata")):
        return "missing .metadata (the save did not finish)"
    if not os.path.isfile(marker):
        return f"no {COMPLETE_MARKER} (the save did not finish, or crashed before being confirmed)"
    try:
        with open(marker) as f:
            recorded = json.load(f)
        expected = recorded["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {COMPLETE_MARKER}: {e}"
    for name, size in sorted(expected.items()):
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            return f"file {name} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"file {name} has {actual} bytes, {size} were written (truncated or altered)"
    if not verify_content:
        return None
    for name, digest in sorted(recorded.get(CHECKSUM, {}).items()):
        actual = file_checksum(os.path.join(step_dir, name))
        if actual != digest:
            return f"file {name} has {CHECKSUM} {actual}, {digest} was written (same size, altered content)"
    return None


def read_marker(step_dir: str) -> dict[str, Any]:
    with open(os.path.join(step_dir, COMPLETE_MARKER)) as f:
        return json.load(f)


def step_dirs(folder: str) -> dict[int, str]:
    """``{step: path}`` of the ``step-N`` folders directly under ``folder``."""
    if not os.path.isdir(folder):
        return {}
    found = {}
    for name in os.listdir(folder):
        match = _STEP_DIR.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found[int(match.group(1))] = os.path.join(folder, name)
    return found


def newest_resumable_step(folder: str) -> tuple[int, list[str]]:
    """The newest step a run can resume from (-1: none), and why newer ones were passed over.

    Model-only checkpoints (TorchTitan's default last save) are skipped unless
    they are a step-0 seed, which TorchTitan loads model-only by design.
    """
    passed_over = []
    for step, path in sorted(step_dirs(folder).items(), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None and step != 0 and read_marker(path).get("model_only", False):
            problem = MODEL_ONLY
        if problem is None:
            return step, passed_over
        passed_over.append(f"step-{step}: {problem}")
    return -1, passed_over


def purge_superseded(folder: str, keep: int) -> None:
    """Keep the newest ``keep`` set-aside folders in ``folder`` (0: all)."""
    if keep <= 0:
        return
    aside = sorted((e for e in os.scandir(folder) if e.is_dir()), key=lambda e: e.stat().st_mtime_ns)
    for entry in aside[:-keep]:
        logger.info(f"Deleting {entry.path} (more than checkpoint.keep_superseded = {keep} set aside)")
        shutil.rmtree(entry.path)


class RNGState(Stateful):
    """All ranks' RNG states as one object, identical on every rank.

    DCP saves replicated non-tensor entries once, so the checkpoint holds a
    list indexed by rank, whatever the world size. A rank beyond the saved
    world size takes the state of ``rank % saved_world_size`` (TorchTitan seeds
    all non-pipeline ranks alike, so these states agree in practice).
    """

    def _local(self) -> dict[str, Any]:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def state_dict(self) -> dict[str, Any]:
        local = self._local()
        if not dist.is_initialized():
            return {"per_rank": pickle.dumps([local])}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return {"per_rank": pickle.dumps(gathered)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_rank = pickle.loads(state_dict["per_rank"])
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank >= len(per_rank):
            logger.info(f"RNG state: saved with {len(per_rank)} ranks; rank {rank} takes rank {rank % len(per_rank)}'s")
        state = per_rank[rank % len(per_rank)]
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class ResilientCheckpointManager(CheckpointManager):
    """CheckpointManager with completion markers, validated resume and a finite-weights guard.

    ``run_info`` (model name/flavor/args, tokenizer path) is stored in each
    completion marker so that a checkpoint describes itself to the exporter.
    """

    def __init__(self, *args, run_info: dict[str, Any], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_info = run_info
        self.on_fallback = kwargs["checkpoint_config"].on_fallback
        self.keep_superseded = kwargs["checkpoint_config"].keep_superseded

    # -- saving ----------------------------------------------------------------

    def save(self, curr_step: int, last_step: bool = False) -> None:
        if not self._should_save(curr_step, last_step):
            return super().save(curr_step, last_step)
        self._check_finite_weights(curr_step)
        self._set_aside_existing(curr_step)
        super().save(curr_step, last_step)
        if dist.get_rank() != 0:
            return
        model_only = last_step and self.last_save_model_only
        pending = self.save_future
        if last_step or self.async_mode == AsyncMode.DISABLED or not isinstance(pending, Future):
            self._write_marker(curr_step, model_only)
        else:

            def confirm(done: Future) -> None:  # runs when the background save has finished
                if done.exception() is None:
                    self._write_marker(curr_step, model_only)

            pending.add_done_callback(confirm)

    def _check_finite_weights(self, step: int) -> None:
        params = [p for m in self.states[MODEL].model for p in m.parameters()]
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        bad = torch.tensor(int(not all(bool(torch.isfinite(t).all()) for t in local)), device=local[0].device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise NonFiniteWeightsError(
                f"step {step}: the model weights contain NaN/Inf; refusing to write a checkpoint. {self.resume_hint()}"
            )

    def resume_hint(self) -> str:
        """Where a failed run can go on from: the newest resumable checkpoint, if there is one."""
        if not self.enable:
            return "Checkpointing is off ([checkpoint] enable = false): nothing to resume from."
        step, _ = newest_resumable_step(self.folder)
        if step < 0:
            return f"No resumable checkpoint in {self.folder} yet: the run can only start again from scratch."
        path = self._create_checkpoint_id(step)
        return f"The newest good checkpoint is {path}: run the same command to resume from it."

    def _set_aside_existing(self, step: int) -> None:
        """Move an existing ``step-N`` aside, so a new save never mixes with old files."""
        path = self._create_checkpoint_id(step)
        if dist.get_rank() == 0 and os.path.exists(path):
            target = os.path.join(self.folder, SUPERSEDED_DIR, f"step-{step}.{time.strftime('%Y%m%d-%H%M%S')}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(path, target)
            logger.warning(f"{path} existed ({checkpoint_problem(target) or 'complete'}); moved it to {target}")
            purge_superseded(os.path.join(self.folder, SUPERSEDED_DIR), self.keep_superseded)
        dist.barrier()

    def _write_marker(self, step: int, model_only: bool) -> None:
        path = self._create_checkpoint_id(step)
        names = sorted(e.name for e in os.scandir(path) if e.is_file() and e.name != COMPLETE_MARKER)
        marker = {
            "step": step,
            "world_size": dist.get_world_size(),
            "model_only": model_only,
            "files": {name: os.path.getsize(os.path.join(path, name)) for name in names},
            CHECKSUM: {name: file_checksum(os.path.join(path, name)) for name in names},
            **self.run_info,
        }
        tmp = os.path.join(path, COMPLETE_MARKER + ".tmp")
        with open(tmp, "w") as f:
            json.dump(marker, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, COMPLETE_MARKER))

    def _purge_stale_checkpoints(self) -> None:
        """Keep the newest ``keep_latest_k`` complete checkpoints and anything newer than them."""
        if self.keep_latest_k <= 0 or dist.get_rank() != 0:
            return
        steps = step_dirs(self.folder)
        complete = [s for s in sorted(steps) if checkpoint_problem(steps[s], verify_content=False) is None]
        if len(complete) <= self.keep_latest_k:
            return
        oldest_kept = complete[-self.keep_latest_k]
        for step in sorted(steps):
            if step < oldest_kept:
                self.purge_queue.put(steps[step])

    # -- loading ---------------------------------------------------------------

    def load(self, step: int = -1) -> bool:
        if self.enable and step != -1 and os.path.isdir(self.folder):
            problem = self._decide(lambda: self._load_step_problem(step))
            if problem is not None:
                raise ValueError(
                    f"checkpoint.load_step={step}: {self._create_checkpoint_id(step)} cannot be loaded: {problem}"
                )
        return super().load(step)

    def _load_step_problem(self, step: int) -> str | None:
        """Why an explicit ``load_step`` cannot be resumed from (a step-0 seed is model-only by design)."""
        path = self._create_checkpoint_id(step)
        problem = checkpoint_problem(path)
        if problem is None and step != 0 and read_marker(path).get("model_only", False):
            newest, _ = newest_resumable_step(self.folder)
            instead = f"resume from step-{newest} (the newest full one)" if newest >= 0 else "no full checkpoint exists"
            problem = (
                f"it is {MODEL_ONLY}: {instead}, or start a new run from its weights with "
                f"--checkpoint.initial_load_path {path} --checkpoint.initial_load_model_only"
            )
        return problem

    def _find_load_step(self, folder: str = "") -> int:
        if folder and folder != self.folder:
            return super()._find_load_step(folder)
        step = self._decide(self._choose_resume_step)
        if isinstance(step, str):
            raise CheckpointFallbackError(step)
        return step

    def _choose_resume_step(self) -> int | str:
        """The step to resume from, or (``on_fallback = "stop"``) the reason not to, for every rank to raise."""
        step, passed_over = newest_resumable_step(self.folder)
        for reason in passed_over:
            logger.warning(f"Checkpoint {reason}; not resuming from it.")
        damaged = [reason for reason in passed_over if not reason.endswith(MODEL_ONLY)]
        where = f"step-{step}" if step >= 0 else "scratch (no usable checkpoint)"
        if damaged and self.on_fallback == "stop":
            return (
                f"{os.path.join(self.folder, damaged[0])}; not falling back to {where} "
                "([checkpoint] on_fallback = 'stop'). Nothing was changed."
            )
        if passed_over:
            logger.warning(f"Falling back to {where}. Nothing in {self.folder} was changed.")
        return step

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        if DATALOADER in state_dict and not from_hf:
            self._check_dataloader_keys(state_dict[DATALOADER], checkpoint_id)
        super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)

    @staticmethod
    def _check_dataloader_keys(dataloader: Stateful, checkpoint_id: str) -> None:
        saved = {
            key.removeprefix(f"{DATALOADER}.")
            for key in FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
            if key.startswith(f"{DATALOADER}.")
        }
        missing = sorted(set(dataloader.state_dict()) - saved)
        if missing:
            raise ValueError(
                f"{checkpoint_id}: the data loader of this run needs {missing}, but the checkpoint holds "
                f"{sorted(saved)}: its [hybrid_data] streams differ. Resume with the settings it was saved with "
                "(e.g. --hybrid_data.streams), or restart the data stream with "
                "--checkpoint.exclude_from_loading dataloader"
            )

    @staticmethod
    def _decide(fn):
        """Evaluate ``fn`` on rank 0 and give every rank its result (one view of the filesystem)."""
        box = [fn() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
