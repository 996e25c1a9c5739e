"""`landmark3d train` on bad data leaves no stub run directory behind (but never removes
anything it did not write)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import tiny_train_args


def _broken_dataset(phantom_dir: Path, dest: Path) -> Path:
    """A copy of the phantom whose first training case of fold 0 has a truncated image."""
    shutil.copytree(phantom_dir, dest)
    spec = json.loads((dest / "dataset.json").read_text())
    first = next(c for c in spec["cases"] if c["id"] not in spec["folds"][0])
    image = dest / first["image"]
    image.write_bytes(image.read_bytes()[:200])
    return dest


def test_failed_train_removes_the_run_directory_it_created(
    phantom_dir: Path, tmp_path: Path, cli
) -> None:
    data = _broken_dataset(phantom_dir, tmp_path / "data")
    runs = tmp_path / "runs"
    res = cli(*tiny_train_args(data, runs / "bad"))
    assert res.code == 1 and "cannot read the image" in res.err
    assert not runs.exists()  # neither runs/bad/{config,split}.json nor the runs/ it made
    # an empty directory given as --out stays, empty
    (runs / "empty").mkdir(parents=True)
    assert cli(*tiny_train_args(data, runs / "empty")).code == 1
    assert (runs / "empty").is_dir() and not any((runs / "empty").iterdir())


def test_failed_train_leaves_a_pre_existing_directory_alone(
    phantom_dir: Path, tmp_path: Path, cli
) -> None:
    data = _broken_dataset(phantom_dir, tmp_path / "data")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(*tiny_train_args(data, out)).code == 1
    assert (out / "notes.txt").read_text() == "mine"
