"""Launch topologies that are wired but were never run: two nodes on loopback, and HSDP on 4 gloo ranks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from _train_runs import INTERVAL, ROOT, STEPS, _command, _descendants, _env, records, reference_run, train
from titan_hybrid.checkpoint import COMPLETE_MARKER

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_nodes(dump: Path, logs: list[Path], *args: str) -> list[subprocess.Popen]:
    """Two run_train.sh invocations, one CPU rank each, meeting at a c10d rendezvous on 127.0.0.1."""
    env = {**_env(1), "NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
    nodes = []
    for log in logs:
        with open(log, "w") as out:
            nodes.append(subprocess.Popen(_command(dump, list(args)), env=env, cwd=ROOT, stdout=out,
                                          stderr=subprocess.STDOUT))  # fmt: skip
    return nodes


def test_two_nodes_on_loopback_train_and_resume_like_one(tmp_path_factory, tmp_path):
    want = records(reference_run(tmp_path_factory.getbasetemp()))  # 2 ranks on one node, 20 steps
    dump = tmp_path / "run"
    args = ["--training.steps", str(STEPS), "--checkpoint.interval", str(INTERVAL)]

    log_files = [tmp_path / f"{leg}_node_{i}.log" for leg in ("first", "resumed") for i in (0, 1)]
    nodes = start_two_nodes(dump, log_files[:2], *args)
    workers = []
    try:  # both launchers are killed once step-10 is saved; their ranks die with them
        deadline = time.monotonic() + 300
        while not (dump / "checkpoint" / "step-10" / COMPLETE_MARKER).exists():
            assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, log_files[0].read_text()
            time.sleep(0.1)
        workers = [pid for n in nodes for pid in _descendants(n.pid)]
    finally:
        for pid in [n.pid for n in nodes]:
            os.kill(pid, signal.SIGKILL)
        for n in nodes:
            n.wait()
    first = records(dump)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)

    resumed = start_two_nodes(dump, log_files[2:], *args)
    assert all(n.wait(timeout=600) == 0 for n in resumed), log_files[2].read_text()[-4000:]
    logs = [f.read_text() for f in log_files]
    second = records(dump)

    assert all("Training starts at step 1" in log for log in logs[:2])  # each node shows its local rank 0
    assert sorted(p.name for p in (dump / "step_record").iterdir()) == ["rank_0.jsonl", "rank_1.jsonl"]
    assert any(f"Loading the checkpoint from {dump}/checkpoint/step-10." in log for log in logs[2:])
    assert [first[s]["loss"] for s in range(1, 11)] == [want[s]["loss"] for s in range(1, 11)]
    assert [second[s]["loss"] for s in range(11, STEPS + 1)] == [want[s]["loss"] for s in range(11, STEPS + 1)]
    assert all(second[s]["rows"] == want[s]["rows"] for s in range(1, STEPS + 1))


def test_hsdp_replicate_2_shard_2_trains_and_resumes(tmp_path):
    dump = tmp_path / "run"
    hsdp = ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
            "--hybrid_data.streams", "4", "--training.global_batch_size", "8", "--checkpoint.interval", "3",
            "--training.steps", "6", "--validation.no-enable"]  # fmt: skip

    first_log = train(dump, *hsdp, ranks=4).stdout
    first = records(dump)
    second_log = train(dump, *hsdp, ranks=4).stdout  # step-6 is model-only: resumes from step-3
    second = records(dump)

    assert "Building device mesh with parallelism: pp=1, dp_replicate=2, dp_shard=2," in first_log
    assert sorted(first) == [1, 2, 3, 4, 5, 6] and len(first[1]["rng"]) == 4
    assert f"Loading the checkpoint from {dump}/checkpoint/step-3." in second_log
    for step in (4, 5, 6):
        assert second[step]["loss"] == first[step]["loss"], f"step {step}"
        assert second[step]["rows"] == first[step]["rows"], f"step {step}"
    assert first[6]["loss"] < first[1]["loss"]
