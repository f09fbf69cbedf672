"""Launch topologies that were wired but never run: two nodes on loopback, and HSDP on 4 gloo ranks."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from _train_runs import INTERVAL, ROOT, STEPS, _command, _env, records, reference_run, train

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


def test_two_nodes_on_loopback_resume_like_one(tmp_path_factory, tmp_path):
    """The one-node reference's step-10, resumed by two nodes: the same losses and rows, bit for bit."""
    reference = reference_run(tmp_path_factory.getbasetemp())  # 2 ranks on one node, 20 steps
    dump = tmp_path / "run"
    shutil.copytree(reference / "checkpoint" / "step-10", dump / "checkpoint" / "step-10")
    log_files = [tmp_path / f"node_{i}.log" for i in (0, 1)]

    nodes = start_two_nodes(dump, log_files, "--training.steps", str(STEPS), "--checkpoint.interval", str(INTERVAL))

    assert all(n.wait(timeout=600) == 0 for n in nodes), log_files[0].read_text()[-4000:]
    logs = [f.read_text() for f in log_files]
    assert all(f"Loading the checkpoint from {dump}/checkpoint/step-10." in log for log in logs)  # local rank 0s
    want, got = records(reference), records(dump)
    assert sorted(p.name for p in (dump / "step_record").iterdir()) == ["rank_0.jsonl", "rank_1.jsonl"]
    assert sorted(got) == list(range(11, STEPS + 1))
    assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got]
    assert all(got[s]["rows"] == want[s]["rows"] for s in got)


def test_hsdp_replicate_2_shard_2_trains_and_resumes(tmp_path):
    dump = tmp_path / "run"
    hsdp = ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
            "--hybrid_data.streams", "4", "--training.global_batch_size", "8", "--checkpoint.interval", "2",
            "--training.steps", "4", "--validation.no-enable", "--hybrid_data.loader", "thread"]  # fmt: skip

    first_log = train(dump, *hsdp, ranks=4).stdout
    first = records(dump)
    second_log = train(dump, *hsdp, ranks=4).stdout  # step-4 is model-only: resumes from step-2
    second = records(dump)

    assert "Building device mesh with parallelism: pp=1, dp_replicate=2, dp_shard=2," in first_log
    assert sorted(first) == [1, 2, 3, 4] and len(first[1]["rng"]) == 4
    assert f"Loading the checkpoint from {dump}/checkpoint/step-2." in second_log
    for step in (3, 4):
        assert second[step]["loss"] == first[step]["loss"], f"step {step}"
        assert second[step]["rows"] == first[step]["rows"], f"step {step}"
    assert first[4]["loss"] < first[1]["loss"]
