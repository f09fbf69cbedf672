"""A failed job ends with the failing rank's message as the last line of run_train.sh's output, one traceback."""

from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

import pytest

from _train_runs import CONFIG, ROOT, _command, _env

pytestmark = pytest.mark.distributed


def launch(dump: Path, log_rank: str = "0", config: Path = CONFIG, ranks: int = 2) -> subprocess.CompletedProcess:
    command = _command(dump, ["--training.steps", "2"])
    command[1] = str(config)
    env = {**_env(ranks), "LOG_RANK": log_rank}
    return subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_hidden_rank_failure_is_printed_once_and_last(tmp_path):
    """Rank 0 (hidden by LOG_RANK=1) finds the folder locked, here by the test itself."""
    dump = tmp_path / "run"
    dump.mkdir()
    with open(dump / "job.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242 on host elsewhere, since earlier\n")
        lock.flush()

        proc = launch(dump, log_rank="1")

    assert proc.returncode != 0
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1] == (
        f"[titan-hybrid] rank 0: FolderInUseError: {dump} is in use by another job (pid 4242 on host elsewhere, "
        "since earlier); refusing to start a second one on it. Wait for that job to end or stop it, "
        "or choose another --job.dump_folder."
    )
    assert proc.stdout.count("Traceback (most recent call last)") == 1
    assert "[titan-hybrid] rank 0's traceback (its output is not shown, LOG_RANK):" in proc.stdout
    assert "ChildFailedError" not in proc.stdout


def test_a_bad_config_value_is_the_last_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(CONFIG.read_text().replace('pattern = "gggA"', 'pattern = "gggA"\ndim = "big"'))

    proc = launch(tmp_path / "run", config=config, ranks=1)

    assert proc.returncode != 0
    assert proc.stdout.rstrip().splitlines()[-1] == (
        f'[titan-hybrid] rank 0: ConfigValueError: {config}: [hybrid_model] dim = "big": expected an integer'
    )
    assert proc.stdout.count("Traceback (most recent call last)") == 1
