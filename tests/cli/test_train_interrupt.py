"""An interrupted `landmark3d train` says so on stderr, with the command that continues it."""

from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import tiny_train_args

from landmark3d.cli.app import interruption_message, rerun_command
from landmark3d.engine.stages import CoarseStage
from landmark3d.engine.trainer import TrainingInterrupted


def test_rerun_command_resumes_train_and_cv_only() -> None:
    assert rerun_command(["train", "--out", "I 6", "--overwrite"]) == (
        "landmark3d train --out 'I 6' --resume"
    )
    assert rerun_command(["--debug", "cv", "--out", "x", "--resume"]) == (
        "landmark3d --debug cv --out x --resume"
    )
    assert rerun_command(["demo", "--out", "x"]) is None
    stopped = TrainingInterrupted("SIGINT received during epoch 1 of the fine stage", "hint")
    assert interruption_message(stopped, ["demo"]) == (
        "interrupted: SIGINT received during epoch 1 of the fine stage."
    )
    assert interruption_message(KeyboardInterrupt(), ["train"]) == "interrupted"


def test_interrupted_train_prints_how_to_continue(
    phantom_dir: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = CoarseStage.train_step

    def interrupt_first_step(self: CoarseStage, *args: Any) -> Any:
        monkeypatch.setattr(CoarseStage, "train_step", step)  # once
        os.kill(os.getpid(), signal.SIGINT)
        return step(self, *args)

    monkeypatch.setattr(CoarseStage, "train_step", interrupt_first_step)
    out = tmp_path / "I6"
    res = cli(*tiny_train_args(phantom_dir, out, "--stage", "coarse"))
    assert res.code == 130
    (line,) = res.err_lines
    assert line.startswith("interrupted: SIGINT received") and "coarse stage" in line
    assert "To continue: landmark3d train " in line and line.endswith(" --resume")
    log = (out / "coarse" / "train.log").read_text()
    assert f"rerun the same command with --resume (run directory {out})" in log

    # the printed command continues the run
    command = shlex.split(line.split("To continue: ", 1)[1])
    assert command[0] == "landmark3d"
    res = cli(*command[1:])
    assert res.code == 0, res.err
    assert (out / "coarse" / "checkpoints" / "last").is_dir()
