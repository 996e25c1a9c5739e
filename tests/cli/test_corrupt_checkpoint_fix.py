"""A damaged checkpoint's fix names the other checkpoint of the run, not itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.conftest import tiny_train_args

from landmark3d.engine.checkpoint import load_weights_only
from landmark3d.errors import CheckpointError


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_resume_with_a_truncated_last_suggests_best_or_starting_over(
    tiny_run: Path, phantom_dir: Path, tmp_path: Path, cli
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _truncate(run / "coarse" / "checkpoints" / "last" / "weights.safetensors")
    res = cli(*tiny_train_args(phantom_dir, run, "--resume"))
    assert res.code == 1
    (line,) = res.err_lines
    fix = line.split("Fix:", 1)[1]
    assert "'best'" in fix and "--overwrite" in fix and "e.g. 'last'" not in fix


@pytest.mark.parametrize(("broken", "other"), [("last", "'best'"), ("best", "'last'")])
def test_corrupt_checkpoint_fix_names_the_other_one(
    tiny_run: Path, tmp_path: Path, broken: str, other: str
) -> None:
    ckpt = tmp_path / broken
    shutil.copytree(tiny_run / "coarse" / "checkpoints" / broken, ckpt)
    _truncate(ckpt / "weights.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_weights_only(ckpt, {})
    assert other in info.value.fix and f"'{broken}'" not in info.value.fix
