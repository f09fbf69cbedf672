"""Producing a rank's batches in a child process, so the loader's Python work never takes the trainer's GIL.

A torchdata ``Prefetcher`` runs its source in a thread of the training process. The
packing and shuffling are Python code, and a thread that holds the GIL for a few
milliseconds at a time stalls the training loop's kernel launches while the GPU waits
(BENCHMARKS.md, issue 7). ``ProcessPrefetcher`` is the same node with the source in a
spawned process: it builds the source there from a picklable factory, hands out items
in order, and its state has a ``Prefetcher``'s layout (the source's state taken right
after the last item handed out), so a checkpoint of either kind loads into the other.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.util  # noqa: F401 - its exit handler is registered before ours (see _stop_children)
import os
import pickle
import queue
import traceback
import weakref
from collections.abc import Callable
from multiprocessing.synchronize import Event
from typing import Any, TypeVar

from torchdata.nodes import BaseNode

T = TypeVar("T")

# Seconds between checks that the other side is still alive while waiting.
_POLL_S = 1.0
# Seconds a stopping child gets to finish the item in hand and exit by itself.
_STOP_WAIT_S = 10.0


# Loaders with a running child. At exit they stop their children before multiprocessing's
# own exit handler (registered earlier, so run later) would kill them.
_RUNNING: weakref.WeakSet[ProcessPrefetcher] = weakref.WeakSet()


@atexit.register
def _stop_children() -> None:
    for prefetcher in list(_RUNNING):
        prefetcher.shutdown()


class ProcessPrefetcher(BaseNode[T]):
    """Runs ``build()``'s node in one child process, up to ``prefetch`` items ahead.

    ``build`` must be picklable (a module-level function or a ``functools.partial`` of
    one): the child imports and builds the node itself, as a spawned process must. An
    exception in the child is raised here again, with the child's traceback as a note.
    """

    # torchdata's Prefetcher state keys; every item is a snapshot here.
    SNAPSHOT, STEPS_SINCE_SNAPSHOT = "snapshot", "steps_since_snapshot"

    def __init__(self, build: Callable[[], BaseNode[T]], prefetch: int):
        super().__init__()
        self._process: mp.process.BaseProcess | None = None
        self._job: mp.Queue | None = None
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.build, self.prefetch = build, prefetch
        self._source_state: dict[str, Any] | None = None
        self._unread_fresh_child = False  # start()'s child, from the beginning, nothing read from it yet

    def start(self) -> None:
        """Launch the child now, from the beginning, rather than at the first ``iter()``: its start-up
        (spawn, imports, building the streams, filling the shuffle buffers) then runs while the
        trainer builds and compiles the model. The first ``reset()`` keeps it if it also starts
        from the beginning and nothing was read yet; a loaded state replaces it."""
        if self._process is None:
            self._launch(None)
            self._unread_fresh_child = True

    def reset(self, initial_state: dict[str, Any] | None = None):
        super().reset(initial_state)
        if initial_state is None and self._unread_fresh_child and self._process.is_alive():
            return
        self.shutdown()
        if initial_state is not None and initial_state[self.STEPS_SINCE_SNAPSHOT]:
            raise ValueError("ProcessPrefetcher loads only states snapshotted at the last item handed out")
        self._launch(initial_state[self.SNAPSHOT] if initial_state is not None else None)

    def _launch(self, initial: dict[str, Any] | None) -> None:
        self._source_state = None  # the child sends the source's state once it is built
        context = mp.get_context("spawn")
        self._queue, self._stop = context.Queue(maxsize=self.prefetch), context.Event()
        # The factory (a tokenizer in it: megabytes) goes through a queue, whose feeder thread writes
        # it. As an argument of the Process, start() would write it and so wait until the child had
        # started and imported all that unpickling it needs (12 s on an H100 machine).
        # Kept while the child lives: its semaphores must outlast the child's unpickling of it.
        self._job = job = context.Queue(maxsize=1)
        job.cancel_join_thread()  # a child that died unread must not hold this process's exit
        self._process = context.Process(
            target=_produce,
            args=(job, self._queue, self._stop, os.getpid()),
            name="titan_hybrid-data",
            # Not a daemon: a daemonic process may not start children, and with
            # worker_method = "process" the child's tokenizer workers are its children. Exits are
            # covered without it: _stop_children at exit, and the child stops once its parent dies.
            daemon=False,
        )
        self._process.start()
        job.put((self.build, initial))
        job.close()
        _RUNNING.add(self)

    def next(self) -> T:
        self._unread_fresh_child = False
        kind, item = self._receive()
        if kind == "start":
            kind, item = self._receive()
        if kind == "end":
            raise StopIteration
        return item

    def get_state(self) -> dict[str, Any]:
        if self._source_state is None:  # not started yet: its first message is the starting state
            kind, _ = self._receive()
            assert kind == "start", kind
        return {self.SNAPSHOT: self._source_state, self.STEPS_SINCE_SNAPSHOT: 0}

    def _receive(self) -> tuple[str, T | None]:
        """The child's next message; keeps the source state that came with it."""
        while True:
            try:
                kind, payload, state = pickle.loads(self._queue.get(timeout=_POLL_S))
                break
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(
                        f"the data loader process ({self._process.name}) exited with code "
                        f"{self._process.exitcode} before producing the next batch"
                    ) from None
        if kind == "error":
            raise payload
        if state is not None:
            self._source_state = state
        return kind, payload

    def shutdown(self) -> None:
        """Stop the child: asked first, so that it exits through its own clean-up (killed
        processes leave their semaphores to the resource tracker, which warns about them)."""
        self._unread_fresh_child = False
        if self._process is not None and self._process.is_alive():
            self._stop.set()
            self._process.join(timeout=_STOP_WAIT_S)
            if self._process.is_alive():  # busy producing an item for longer
                self._process.terminate()
                self._process.join()
        self._process = self._job = None

    def __del__(self):
        self.shutdown()


def _produce(job: mp.Queue, out: mp.Queue, stop: Event, parent: int) -> None:
    """Child process: take ``(build, state)`` from ``job``, then put ``(kind, item, state after it)``
    tuples until the source ends or fails, or until asked to stop."""

    def orphaned_or_stopped() -> bool:
        return os.getppid() != parent or stop.is_set()

    def put(message: tuple) -> bool:
        # Pickled here, by value: tensors shared through file descriptors would need this
        # process alive until the trainer has read them.
        message = pickle.dumps(message)
        # A parent killed with SIGKILL leaves no one to read (and no one to set ``stop``).
        while not orphaned_or_stopped():
            try:
                out.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        # No one will read: exit without flushing. Otherwise exiting waits until the queue's feeder
        # thread has written the last message (the end, or an error), which must reach the trainer.
        out.cancel_join_thread()
        return False

    try:
        while True:
            try:
                build, state = job.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if orphaned_or_stopped():
                    return
        node = build()
        node.reset(state)
        if not put(("start", None, node.state_dict())):
            return
        for item in node:
            if not put(("item", item, node.state_dict())):
                return
        put(("end", None, None))
    except Exception as error:  # noqa: BLE001 - every failure goes back to the training process
        error.add_note(f"raised in the data loader process:\n{traceback.format_exc()}")
        try:
            pickle.dumps(error)
        except Exception:  # noqa: BLE001 - an exception that cannot travel goes back as text
            error = RuntimeError(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        put(("error", error, None))
