"""`landmark3d train --resume` on a run whose stage stopped before its first checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import tiny_train_args


def test_resume_restarts_a_stage_stopped_before_its_first_epoch(
    tiny_run: Path, phantom_dir: Path, tmp_path: Path, cli
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # as if interrupted during the fine stage's first epoch: its log exists, no checkpoint yet
    shutil.rmtree(run / "fine" / "checkpoints")
    (run / "fine" / "metrics.csv").unlink()
    (run / "fine" / "train.log").write_text("leftover of the interrupted start\n")
    coarse_weights = (run / "coarse" / "checkpoints" / "last" / "weights.safetensors").read_bytes()

    res = cli(*tiny_train_args(phantom_dir, run, "--resume"))
    assert res.code == 0, res.err
    assert (run / "fine" / "checkpoints" / "last").is_dir()
    assert "leftover" not in (run / "fine" / "train.log").read_text()
    # the finished coarse stage is kept, not retrained
    last = run / "coarse" / "checkpoints" / "last" / "weights.safetensors"
    assert last.read_bytes() == coarse_weights
