"""The correlated stage inside a run: discovery while planning, training, predictor routing.

Uses the session's tiny run (``tiny_run``, ``tests/conftest.py``): trained through the CLI on
the phantom, whose dataset spec names no groups, so the plan's group comes from discovery on
the training annotations (the phantom's planted chin + occ_bone key slice along canonical i).
The tiny models are poor; these tests check routing, coordinates and files, never accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES
from landmark3d.config import ExperimentConfig, apply_overrides, load_config
from landmark3d.data.dataset import load_dataset
from landmark3d.data.phantom import PLANTED_GROUP
from landmark3d.engine.checkpoint import read_checkpoint_meta
from landmark3d.engine.run import train_run
from landmark3d.errors import CheckpointError
from landmark3d.geometry.space import Geometry
from landmark3d.inference.predictor import Prediction, Predictor
from landmark3d.io.images import read_image
from landmark3d.prior import canonical_geometry

pytestmark = pytest.mark.slow

OTHERS = ("nasion", "ear_l", "ear_r", "odont_proc")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_image(tiny_run: Path, phantom_dir: Path) -> Path:
    """The image file of the run's first held-out case."""
    split = json.loads((tiny_run / "split.json").read_text())
    return load_dataset(phantom_dir).case(split["test"][0]).image


@pytest.fixture(scope="module")
def auto_prediction(tiny_run: Path, test_image: Path) -> tuple[Predictor, Prediction]:
    predictor = Predictor(tiny_run, device="cpu")
    return predictor, predictor.predict_file(test_image)


@pytest.fixture(scope="module")
def fine_prediction(tiny_run: Path, test_image: Path) -> tuple[Predictor, Prediction]:
    predictor = Predictor(tiny_run, device="cpu", stage="fine")
    return predictor, predictor.predict_file(test_image)


def _models(pred: Prediction) -> dict[str, object]:
    return {n: pred.landmarks.extras[n].get("model") for n in pred.landmarks.names}


# ---------------------------------------------------------------------------- the run
def test_run_discovers_and_trains_the_group(tiny_run: Path) -> None:
    plan = json.loads((tiny_run / "plan.json").read_text())
    groups = plan["correlated_groups"]
    assert [(g["landmarks"], g["axis"]) for g in groups] == [(list(PLANTED_GROUP), "i")]
    assert groups[0]["fraction"] == 1.0 and not groups[0]["coincident"]

    stage = tiny_run / "correlated"
    for name in ("metrics.csv", "train.log", "checkpoints/best", "checkpoints/last"):
        assert (stage / name).exists(), name
    rows = (stage / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 and "val_mre_mm" in rows[0]  # header + 2 epochs
    meta = read_checkpoint_meta(stage / "checkpoints" / "best")
    assert meta["groups"] == groups
    assert meta["landmark_names"] == plan["landmark_names"]


# ---------------------------------------------------------------------------- predictor
def test_auto_routes_group_members_to_the_correlated_model(
    auto_prediction: tuple[Predictor, Prediction],
) -> None:
    predictor, pred = auto_prediction
    assert predictor.stage == "correlated"
    assert list(predictor.group_models) == ["group0"]
    models = _models(pred)
    assert {n: models[n] for n in PLANTED_GROUP} == dict.fromkeys(
        PLANTED_GROUP, "correlated:group0"
    )
    assert {n: models[n] for n in OTHERS} == dict.fromkeys(OTHERS, "fine")
    assert np.isfinite(pred.landmarks.coords).all()
    for name in pred.landmarks.names:
        extras = pred.landmarks.extras[name]
        assert {"heatmap_peak", "coarse_fine_shift_mm", "outside_image"} <= set(extras)


def test_slice_combine_puts_the_group_on_one_canonical_slice(
    auto_prediction: tuple[Predictor, Prediction], test_image: Path
) -> None:
    predictor, pred = auto_prediction
    assert predictor.config.correlated.combine == "slice"
    image = read_image(test_image)
    can = canonical_geometry(Geometry.from_sitk(image))
    idx = can.world_to_index(pred.landmarks.subset(list(PLANTED_GROUP)).coords)
    assert idx[0, 0] == pytest.approx(idx[1, 0], abs=1e-6)  # shared canonical i
    # "heatmap" keeps each member's own heatmap position; "slice" only moves it along i
    k = predictor.config.correlated
    predictor.config = dataclasses.replace(
        predictor.config, correlated=dataclasses.replace(k, combine="heatmap")
    )
    try:
        heat = predictor.predict(image)
    finally:
        predictor.config = dataclasses.replace(predictor.config, correlated=k)
    hidx = can.world_to_index(heat.landmarks.subset(list(PLANTED_GROUP)).coords)
    np.testing.assert_allclose(idx[:, 1:], hidx[:, 1:], atol=1e-6)
    assert abs(hidx[0, 0] - hidx[1, 0]) > 1e-3
    np.testing.assert_allclose(  # unchanged, up to oneDNN's rounding at another thread count
        heat.landmarks.subset(list(OTHERS)).coords,
        pred.landmarks.subset(list(OTHERS)).coords,
        atol=1e-4,
    )


def test_fine_stage_uses_fine_models_only(
    auto_prediction: tuple[Predictor, Prediction],
    fine_prediction: tuple[Predictor, Prediction],
) -> None:
    predictor, fine = fine_prediction
    assert predictor.stage == "fine" and predictor.group_models == {}
    assert set(_models(fine).values()) == {"fine"}
    _, auto = auto_prediction
    np.testing.assert_array_equal(fine.coarse, auto.coarse)
    # same coarse and fine models: the independent landmarks are identical ...
    np.testing.assert_array_equal(
        fine.landmarks.subset(list(OTHERS)).coords, auto.landmarks.subset(list(OTHERS)).coords
    )
    # ... and the group members come from another model
    a = auto.landmarks.subset(list(PLANTED_GROUP)).coords
    f = fine.landmarks.subset(list(PLANTED_GROUP)).coords
    assert not np.allclose(a, f)


def test_coarse_stage(tiny_run: Path, test_image: Path) -> None:
    predictor = Predictor(tiny_run, device="cpu", stage="coarse")
    assert predictor.stage == "coarse" and not predictor.fine and not predictor.group_models
    pred = predictor.predict_file(test_image)
    np.testing.assert_array_equal(pred.landmarks.coords, pred.coarse)
    assert all(m is None for m in _models(pred).values())


def test_run_without_correlated_checkpoints(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("cache", "correlated"))
    assert Predictor(run, device="cpu").stage == "fine"  # auto falls back
    with pytest.raises(CheckpointError, match="correlated"):
        Predictor(run, device="cpu", stage="correlated")


# ---------------------------------------------------------------------------- train_run
def _tiny_config(*extra: str) -> ExperimentConfig:
    return apply_overrides(load_config("phantom_demo"), [*TINY_OVERRIDES, "num_threads=1", *extra])


def test_no_groups_without_discovery_trains_no_correlated_stage(
    phantom_dir: Path, tmp_path: Path
) -> None:
    dataset = load_dataset(phantom_dir)
    assert dataset.correlated_groups == []
    config = _tiny_config("correlated.discover=false", "fine.epochs=1")
    res = train_run(
        dataset, config, tmp_path / "run", fold=0, stages=("fine", "correlated"), progress=False
    )
    assert res.plan.correlated_groups == []
    assert set(res.results) == {"fine"}
    assert not (tmp_path / "run" / "correlated").exists()
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["correlated_groups"] == []


def test_spec_groups_win_over_discovery(phantom_dir: Path, tmp_path: Path) -> None:
    spec_group = {"landmarks": ["nasion", "chin"], "axis": "k"}
    dataset = dataclasses.replace(load_dataset(phantom_dir), correlated_groups=[spec_group])
    for discover in ("true", "false"):
        res = train_run(
            dataset,
            _tiny_config(f"correlated.discover={discover}"),
            tmp_path / discover,
            fold=0,
            stages=(),
            progress=False,
        )
        assert res.plan.correlated_groups == [spec_group]
        assert res.results == {}


def test_correlated_stage_uses_its_own_epochs(phantom_dir: Path, tmp_path: Path) -> None:
    config = _tiny_config("correlated.epochs=1", "fine.epochs=2")
    res = train_run(
        load_dataset(phantom_dir),
        config,
        tmp_path / "run",
        fold=0,
        stages=("correlated",),
        progress=False,
    )
    assert res.results["correlated"].epochs_completed == 1
