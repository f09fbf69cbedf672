"""No orphaned writers: ranks die with their launcher, and a dump folder takes one job at a time."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from _train_runs import ROOT, _command, _descendants, _env, train

pytestmark = pytest.mark.distributed


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def semaphores() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def test_killing_the_launcher_ends_every_rank_and_frees_the_folder(tmp_path):
    dump = tmp_path / "run"
    sems_before = semaphores()
    log = open(tmp_path / "first.log", "w")
    command = _command(dump, ["--training.steps", "1000", "--hybrid_data.loader", "process"])
    first = subprocess.Popen(command, env=_env(2), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    lock, record = dump / "job.lock", dump / "step_record" / "rank_0.jsonl"
    workers: list[int] = []

    def wait_for(done) -> None:
        deadline = time.monotonic() + 300
        while not done():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)

    try:
        # The second job starts as soon as the first one's rank 0 holds the lock (it keeps it until it
        # dies), so that its start-up overlaps the first job's; one rank: global rank 0 is the one
        # refused, a second rank would only import alongside it.
        wait_for(lambda: lock.exists() and lock.read_text().endswith("\n"))
        holder = lock.read_text()
        second = train(dump, "--training.steps", "2", ranks=1, check=False)
        wait_for(lambda: record.exists() and record.stat().st_size)  # the first job trains
        workers = _descendants(first.pid)  # the ranks, their loader processes (the default) and resource trackers

        assert second.returncode != 0
        assert f"{dump} is in use by another job ({holder.strip()}); refusing to start" in second.stdout
        rank0 = int(holder.split()[1])
        assert rank0 in workers and f"on host {socket.gethostname()}," in holder

        os.kill(first.pid, signal.SIGKILL)  # the launcher (run_train.sh exec'd torchrun) only
        first.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if alive(pid)], "processes outlived their launcher by 10 s"
    finally:  # whatever failed, no process of the first job may go on training
        for pid in [first.pid, *_descendants(first.pid), *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
    assert semaphores() <= sems_before, "the job left POSIX semaphores in /dev/shm"
    with open(dump / "job.lock") as f:  # the kernel released the dead rank's lock
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
