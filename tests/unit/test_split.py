"""Train/validation splits never starve training; unannotated cases are named, not dropped
silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from landmark3d.data.dataset import load_dataset
from landmark3d.engine.run import make_split, n_validation
from landmark3d.errors import DatasetError


def _dataset(phantom_dir: Path, dest: Path, folds: list[list[str]], unannotated: list[str]) -> Path:
    shutil.copytree(phantom_dir, dest)
    spec = json.loads((dest / "dataset.json").read_text())
    spec["folds"] = folds
    for case in spec["cases"]:
        if case["id"] in unannotated:
            del case["landmarks"]
    (dest / "dataset.json").write_text(json.dumps(spec))
    return dest


HALVES = [["case000", "case001", "case002"], ["case003", "case004", "case005"]]


def test_validation_never_outnumbers_training() -> None:
    assert [n_validation(n, 0.15) for n in (2, 3, 4, 5, 20, 40)] == [1, 1, 2, 2, 3, 6]
    assert n_validation(10, 0.9) == 5
    assert n_validation(10, 0.0) == 0


def test_three_cases_split_two_training_one_validation(phantom_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(_dataset(phantom_dir, tmp_path / "d", HALVES, []))
    split = make_split(ds, 0, seed=0)
    assert len(split.train) == 2 and len(split.val) == 1
    assert sorted(split.train + split.val) == HALVES[1] and split.test == HALVES[0]


def test_unannotated_training_cases_are_named(phantom_dir: Path, tmp_path: Path) -> None:
    folds = [["case000", "case001"], ["case002", "case003", "case004", "case005"]]
    ds = load_dataset(_dataset(phantom_dir, tmp_path / "d", folds, ["case003"]))
    with pytest.warns(
        UserWarning, match=r"1 case\(s\) outside test fold 0 have no landmarks.*: case003"
    ):
        split = make_split(ds, 0, seed=0)
    assert "case003" not in split.train + split.val and len(split.train) == 2


def test_too_few_training_cases_are_refused_before_writing(
    phantom_dir: Path, tmp_path: Path, cli
) -> None:
    data = _dataset(phantom_dir, tmp_path / "d", HALVES, ["case004"])
    with pytest.warns(UserWarning, match="case004"), pytest.raises(DatasetError) as info:
        make_split(load_dataset(data), 0, seed=0)
    message = str(info.value)
    assert "fold 0" in message and "2 annotated case(s)" in message and "1 training" in message
    assert "--fold -1" in info.value.fix

    out = tmp_path / "runs" / "r"
    res = cli("train", "--config", "phantom_demo", "--dataset", data, "--fold", "0", "--out", out)
    assert res.code == 1 and "fold 0 leaves 2 annotated case(s)" in res.err
    # the CLI shows the warning as one line, before the error
    assert any(line.startswith("warning: ") and "case004" in line for line in res.err_lines)
    assert not (tmp_path / "runs").exists()
