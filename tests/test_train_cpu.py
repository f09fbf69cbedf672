"""End to end on CPU: run_train.sh with two gloo ranks, FSDP2 sharding, loss falls."""

import sys

import pytest

from conftest import logged_losses, run_cmd

pytestmark = pytest.mark.distributed


def test_debug_config_trains_30_steps_and_loss_falls(run_train):
    result = run_train("train_configs/debug_cpu.toml", "--training.steps", "30")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = logged_losses(result.stdout + result.stderr)
    assert sorted(losses) == list(range(1, 31)), sorted(losses)
    first, last5 = losses[1], sum(losses[s] for s in range(26, 31)) / 5
    assert last5 < first - 1.5, (first, last5)


def test_fsdp2_shards_parameters_and_matches_unsharded_gradients():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/distributed/fsdp_sharding.py"]
    result = run_cmd(cmd, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SHARDED OK (debug)" in result.stdout
    assert "SHARDED OK (pgolf_gdn_attn, recurrence on)" in result.stdout


def test_bad_pattern_in_toml_names_the_field(run_train):
    result = run_train("train_configs/debug_cpu.toml", "--hybrid_model.pattern", "ggxA", nproc=1)
    assert result.returncode != 0
    assert "field 'pattern'" in result.stdout + result.stderr
