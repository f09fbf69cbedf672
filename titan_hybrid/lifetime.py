"""A rank's ties to its job: it dies with its launcher, and a dump folder takes one job at a time.

torch elastic starts every worker in a session of its own, so killing the launcher (even its
whole process group) used to leave the ranks training and saving checkpoints, and the same
command run again started a second job on the same folder. Now each rank asks the kernel to
kill it when its parent (the torchrun agent) dies, and global rank 0 holds an exclusive
``flock`` on ``<dump_folder>/job.lock`` for as long as it lives; the kernel releases both
with the process, however it ends.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import sys
import time
from typing import IO

LAUNCHER_PID_ENV = "TITAN_HYBRID_LAUNCHER_PID"
"""Set by run_train.sh to the pid of the torchrun it execs: the parent every rank must have."""
LOCK_FILE = "job.lock"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class FolderInUseError(RuntimeError):
    """Another live job holds the dump folder's lock."""


def exit_with_launcher() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and os.getppid() != int(launcher):
        sys.exit(f"the launcher (pid {launcher}) died before this rank started; exiting")


def lock_dump_folder(folder: str) -> IO[str]:
    """Take ``folder``'s job lock, or raise naming the job that holds it. Keep the returned file open."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a job that has not written its pid yet"
        lock.close()
        raise FolderInUseError(
            f"{folder} is in use by another job ({holder}); refusing to start a second one on it. "
            f"Wait for that job to end or stop it, or choose another --job.dump_folder."
        ) from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    return lock
