"""bench.loss_curves: TorchTitan log lines to curves, the printed comparison, and a clear error."""

import pytest

from bench import loss_curves

LINE = "[rank0]:[titan] 2026-12-02 22:24:39,090 - root - INFO - step: {step:2d}  loss: {loss:8.5f}  grad_norm: 86.4785  memory: 41.03GiB(29.35%)  tps: 13,953\n"  # noqa: E501


def _log(path, losses):
    path.write_text("[rank0]:[titan] - root - INFO - Training starts at step 1\n"
                    + "".join(LINE.format(step=i + 1, loss=x) for i, x in enumerate(losses)))  # fmt: skip
    return path


def test_curves_of_two_logs_and_their_difference(tmp_path, capsys):
    a = _log(tmp_path / "a.log", [10.99, 9.5, 8.0])
    b = _log(tmp_path / "b.log", [10.98, 9.0, 8.5])
    assert loss_curves.read_losses(a) == {1: 10.99, 2: 9.5, 3: 8.0}
    png = tmp_path / "c.png"
    assert loss_curves.main([str(a), str(b), "--labels", "fast", "plain", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "plain vs fast: 3 steps, mean |difference| 0.337, largest 0.500 (step 2)" in out
    assert png.stat().st_size > 0


def test_a_log_without_loss_lines_is_named(tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("Traceback (most recent call last):\n")
    with pytest.raises(SystemExit, match=r"empty\.log: no 'step: N  loss: X' lines"):
        loss_curves.main([str(empty)])
