"""End to end: train through the CLI, predict, evaluate; storage-order invariance; flags.

The tiny run (``tiny_run`` fixture, see ``tests/conftest.py``) is trained once per session with
2 epochs per stage and toy widths, so its predictions are poor — these tests check plumbing,
coordinates and file handling, never accuracy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from conftest import CliResult, tiny_train_args
from landmark3d.config import ExperimentConfig
from landmark3d.data.dataset import load_dataset
from landmark3d.geometry.resample import resample, rotation_matrix
from landmark3d.geometry.space import Geometry
from landmark3d.inference.predictor import Prediction, Predictor
from landmark3d.io.images import read_image
from landmark3d.io.landmarks import read_landmarks

Cli = Callable[..., CliResult]
STAGE_FILES = ("metrics.csv", "train.log", "checkpoints/best", "checkpoints/last")

pytestmark = pytest.mark.slow


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> hex digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _stamps(root: Path) -> dict[str, tuple[int, bytes]]:
    """(mtime_ns, bytes) of every file directly in ``root``."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.iterdir()}


def _one_error_line(r: CliResult) -> str:
    assert r.code == 1, r.out + r.err
    assert "Traceback" not in r.err
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Fix:" in lines[0], r.err
    return lines[0]


@pytest.fixture(scope="module")
def predictor(tiny_run: Path) -> Predictor:
    return Predictor(tiny_run, device="cpu")


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run, free to be resumed or retrained."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_run, dest)
    return dest


# ---------------------------------------------------------------------------------- train
def test_train_writes_the_run_directory(tiny_run: Path, phantom_dir: Path) -> None:
    for name in ("config.json", "plan.json", "split.json"):
        assert (tiny_run / name).is_file(), name
    for stage in ("coarse", "fine"):
        for name in STAGE_FILES:
            assert (tiny_run / stage / name).exists(), f"{stage}/{name}"
        rows = (tiny_run / stage / "metrics.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + 2, rows  # header + 2 epochs
        assert "val_mre_mm" in rows[0]
        assert "finished" in (tiny_run / stage / "train.log").read_text()

    cfg = ExperimentConfig.from_json(tiny_run / "config.json")
    assert cfg.coarse.epochs == 2 and cfg.fine.epochs == 2
    assert cfg.coarse.widths == (4, 4, 8, 8) and cfg.fine.channels == (4, 8)

    split = json.loads((tiny_run / "split.json").read_text())
    ds = load_dataset(phantom_dir)
    assert split["fold"] == 0 and split["test"] == ds.split(0)[1]
    assert sorted(split["train"] + split["val"]) == ds.split(0)[0]
    assert not set(split["test"]) & set(split["train"] + split["val"])
    assert split["landmark_format"] == "fcsv"
    plan = json.loads((tiny_run / "plan.json").read_text())
    assert plan["landmark_names"] == ds.landmark_names


def test_resume_of_a_finished_run_changes_nothing(
    cli: Cli, run_copy: Path, phantom_dir: Path
) -> None:
    stages_before = {s: _digest(run_copy / s / "checkpoints") for s in ("coarse", "fine")}
    metrics_before = {s: (run_copy / s / "metrics.csv").read_text() for s in ("coarse", "fine")}
    plan_before = (run_copy / "plan.json").read_bytes()

    r = cli(*tiny_train_args(phantom_dir, run_copy, "--resume"))
    assert r.code == 0, r.err
    for s in ("coarse", "fine"):
        assert _digest(run_copy / s / "checkpoints") == stages_before[s]
        assert (run_copy / s / "metrics.csv").read_text() == metrics_before[s]
        assert "2 epochs" in r.out
    assert (run_copy / "plan.json").read_bytes() == plan_before


def test_resume_with_another_config_is_refused(cli: Cli, run_copy: Path, phantom_dir: Path) -> None:
    config_before = (run_copy / "config.json").read_bytes()
    r = cli(*tiny_train_args(phantom_dir, run_copy, "--resume", "--set", "fine.lr=0.5"))
    line = _one_error_line(r)
    assert "config differs" in line
    assert (run_copy / "config.json").read_bytes() == config_before


def test_resume_on_another_fold_is_refused(cli: Cli, run_copy: Path, phantom_dir: Path) -> None:
    before = _digest(run_copy)
    r = cli(*tiny_train_args(phantom_dir, run_copy, "--resume", "--fold", "1"))
    line = _one_error_line(r)
    assert "fold 0" in line and "--fold 0" in line
    assert _digest(run_copy) == before  # split.json still names the fold-0 cases


def test_training_into_an_existing_run_is_refused_untouched(
    cli: Cli, run_copy: Path, phantom_dir: Path
) -> None:
    before = _digest(run_copy)
    r = cli(*tiny_train_args(phantom_dir, run_copy, "--set", "fine.epochs=3"))
    line = _one_error_line(r)
    assert "--resume" in line and "--overwrite" in line
    assert _digest(run_copy) == before  # config.json, plan.json, split.json kept too


# ---------------------------------------------------------------------------------- predict
def _image_dir(phantom_dir: Path, dest: Path, case_ids: list[str]) -> Path:
    dest.mkdir()
    for cid in case_ids:
        shutil.copy(phantom_dir / "images" / f"{cid}.nii.gz", dest / f"{cid}.nii.gz")
    (dest / "notes.txt").write_text("not an image\n")
    return dest


def test_predict_a_directory_of_images(
    cli: Cli, tiny_run: Path, phantom_dir: Path, predictor: Predictor, tmp_path: Path
) -> None:
    ids = ["case000", "case004"]  # LPS- and coronally stored
    images = _image_dir(phantom_dir, tmp_path / "images", ids)
    out = tmp_path / "pred"
    r = cli("predict", "--model", tiny_run, "--input", images, "--out", out, "--format", "fcsv")
    assert r.code == 0, r.err
    assert sorted(p.name for p in out.iterdir()) == [f"{c}.fcsv" for c in ids] + ["timings.json"]
    timings = json.loads((out / "timings.json").read_text())
    assert timings["unit"] == "seconds" and sorted(timings["cases"]) == ids
    assert all(t["total"] > 0 for t in timings["cases"].values())

    for cid in ids:
        path = out / f"{cid}.fcsv"
        assert "# CoordinateSystem = LPS" in path.read_text()
        written = read_landmarks(path)
        assert written.names == predictor.landmark_names
        direct = predictor.predict_file(images / f"{cid}.nii.gz").landmarks
        np.testing.assert_allclose(written.coords, direct.coords, atol=1e-6)
        # world mm: the flag agrees with the image's physical extent
        geometry = Geometry.from_sitk(read_image(images / f"{cid}.nii.gz"))
        inside = geometry.contains_world(written.coords)
        flags = [written.extras[n]["outside_image"] for n in written.names]
        assert [bool(f) for f in flags] == [not i for i in inside]

    # again without --overwrite: a clean refusal that touches nothing
    stamps = _stamps(out)
    again = cli("predict", "--model", tiny_run, "--input", images, "--out", out, "--format", "fcsv")
    line = _one_error_line(again)
    assert "--overwrite" in line
    assert _stamps(out) == stamps

    # --coords RAS writes RAS numbers that read back to the same LPS points
    ras = cli(
        "predict", "--model", tiny_run, "--input", images / "case000.nii.gz", "--out", out,
        "--format", "fcsv", "--coords", "RAS", "--overwrite",
    )  # fmt: skip
    assert ras.code == 0, ras.err
    assert "# CoordinateSystem = RAS" in (out / "case000.fcsv").read_text()
    np.testing.assert_allclose(
        read_landmarks(out / "case000.fcsv").coords,
        predictor.predict_file(images / "case000.nii.gz").landmarks.coords,
        atol=1e-6,
    )


def test_predict_a_fold_then_evaluate(
    cli: Cli, tiny_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    r = cli("predict", "--model", tiny_run, "--dataset", phantom_dir, "--fold", "0", "--out", out)
    assert r.code == 0, r.err
    test_ids = json.loads((tiny_run / "split.json").read_text())["test"]
    assert test_ids == load_dataset(phantom_dir).split(0)[1]
    # default format: the training landmarks' format (.fcsv for the phantom)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{c}.fcsv" for c in test_ids] + ["timings.json"]
    )

    ev = cli("evaluate", "--pred", out, "--truth", phantom_dir, "--fold", "0")
    assert ev.code == 0, ev.err
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["n_cases"] == len(test_ids)
    assert summary["n_evaluated"] == 6 * len(test_ids) and summary["n_missing_prediction"] == 0
    assert summary["mre"] is not None and summary["mre"] > 0


def test_predict_coarse_stage_only(
    cli: Cli, tiny_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    image = phantom_dir / "images" / "case001.nii.gz"
    out = tmp_path / "coarse"
    r = cli("predict", "--model", tiny_run, "--input", image, "--out", out, "--stage", "coarse")
    assert r.code == 0, r.err
    written = read_landmarks(out / "case001.fcsv")
    coarse = Predictor(tiny_run, device="cpu", stage="coarse").predict_file(image)
    np.testing.assert_allclose(written.coords, coarse.coarse, atol=1e-6)
    assert all("heatmap_peak" not in written.extras[n] for n in written.names)


def test_predict_refuses_two_images_with_one_case_id(
    cli: Cli, tiny_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    images = _image_dir(phantom_dir, tmp_path / "images", ["case000"])
    sitk.WriteImage(sitk.ReadImage(str(images / "case000.nii.gz")), str(images / "case000.mha"))
    out = tmp_path / "pred"
    r = cli("predict", "--model", tiny_run, "--input", images, "--out", out)
    line = _one_error_line(r)
    assert "case000" in line and "rename" in line
    assert not out.exists()


def test_predict_refuses_a_dataset_with_other_landmarks(
    cli: Cli, tiny_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    spec = json.loads((phantom_dir / "dataset.json").read_text())
    spec["landmarks"] = ["nasal_tip" if n == "nasion" else n for n in spec["landmarks"]]
    for case in spec["cases"]:  # absolute paths: the copy lives elsewhere
        case["image"] = str(phantom_dir / case["image"])
        case["landmarks"] = str(phantom_dir / case["landmarks"])
    (tmp_path / "renamed.json").write_text(json.dumps(spec))
    out = tmp_path / "pred"
    r = cli("predict", "--model", tiny_run, "--dataset", tmp_path / "renamed.json", "--out", out)
    line = _one_error_line(r)
    assert "nasal_tip" in line and "nasion" in line
    assert "model trained on this landmark set" in line
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------- invariance
def _same_voxels_in_world(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether every voxel of ``a`` has the same value at the same world point in ``b``."""
    on_a = resample(b, Geometry.from_sitk(a), "nearest", -5000)
    return bool(np.array_equal(sitk.GetArrayFromImage(on_a), sitk.GetArrayFromImage(a)))


def _storage_variants(image: sitk.Image) -> dict[str, sitk.Image]:
    flipped = sitk.Flip(image, [True, False, True])  # keeps world positions
    return {
        "flipped": flipped,
        "ras": sitk.Flip(image, [True, True, False]),
        "permuted": sitk.PermuteAxes(image, [2, 0, 1]),
        "flipped_permuted": sitk.PermuteAxes(flipped, [1, 2, 0]),
    }


def test_prediction_does_not_depend_on_storage_order(
    predictor: Predictor, phantom_dir: Path
) -> None:
    image = read_image(phantom_dir / "images" / "case000.nii.gz")
    reference = predictor.predict(image)
    assert np.isfinite(reference.landmarks.coords).all()
    for name, variant in _storage_variants(image).items():
        assert Geometry.from_sitk(variant).direction.tolist() != np.eye(3).tolist(), name
        assert _same_voxels_in_world(image, variant), name
        pred = predictor.predict(variant)
        np.testing.assert_allclose(pred.coarse, reference.coarse, atol=0.1, err_msg=name)
        np.testing.assert_allclose(
            pred.landmarks.coords, reference.landmarks.coords, atol=0.1, err_msg=name
        )


def test_oblique_copy_gives_finite_predictions(predictor: Predictor, phantom_dir: Path) -> None:
    """An oblique re-sampling is interpolated (and canonical() only reaches the nearest LPS
    orientation), so the voxels differ and exact agreement is not expected — only that both
    stages produce finite world coordinates."""
    image = read_image(phantom_dir / "images" / "case000.nii.gz")
    g = Geometry.from_sitk(image)
    rot = rotation_matrix([1.0, 2.0, 0.5], np.deg2rad(25.0))
    direction = rot @ g.direction
    size = np.ceil(np.asarray(g.size) * 1.3).astype(int)
    half = (size - 1) / 2.0 * g.spacing
    oblique_geom = Geometry(tuple(size), g.spacing, g.center_world - direction @ half, direction)
    oblique = resample(image, oblique_geom, "linear", -1024.0)
    assert not np.allclose(np.abs(Geometry.from_sitk(oblique).direction), np.eye(3), atol=0.1)

    pred = predictor.predict(oblique)
    assert np.isfinite(pred.coarse).all()
    assert np.isfinite(pred.landmarks.coords).all()
    assert all("heatmap_peak" in pred.landmarks.extras[n] for n in pred.landmarks.names)


# ---------------------------------------------------------------------------------- outside
class _FixedCoarse(nn.Module):
    """Stands in for the coarse ResNet: fixed normalised coordinates (-1..1 = the grid)."""

    def __init__(self, normalised: np.ndarray) -> None:
        super().__init__()
        self.out = torch.as_tensor(normalised, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.expand(x.shape[0], *self.out.shape).clone()


def _predict_with_fixed_coarse(run: Path, stage: str, image: sitk.Image) -> Prediction:
    p = Predictor(run, device="cpu", stage=stage)  # type: ignore[arg-type]
    t = np.zeros((len(p.landmark_names), 3))
    t[0] = [2.0, 0.0, 0.0]  # far beyond the coarse grid along i: outside the image
    t[1] = [0.0, 0.0, 0.0]  # the grid centre: inside
    p.coarse = _FixedCoarse(t)  # type: ignore[assignment]
    return p.predict(image)


@pytest.mark.parametrize("stage", ["coarse", "fine"])
def test_prediction_outside_the_image_is_flagged(
    tiny_run: Path, phantom_dir: Path, stage: str
) -> None:
    image = read_image(phantom_dir / "images" / "case003.nii.gz")
    pred = _predict_with_fixed_coarse(tiny_run, stage, image)
    ls = pred.landmarks
    flags = [ls.extras[n]["outside_image"] for n in ls.names]
    inside = Geometry.from_sitk(image).contains_world(ls.coords)
    assert [bool(f) for f in flags] == [not i for i in inside]  # the flag is the truth
    assert flags[0] == 1 and np.isfinite(ls.coords[0]).all()  # kept, but flagged
    if stage == "coarse":
        assert flags[1] == 0


def test_contains_world_with_margin_and_oblique_direction() -> None:
    direction = rotation_matrix([0.0, 0.0, 1.0], np.deg2rad(30.0))
    g = Geometry((10, 20, 5), np.array([1.0, 0.5, 2.0]), np.array([10.0, -5.0, 3.0]), direction)
    inside = g.index_to_world(
        np.array([[0, 0, 0], [9, 19, 4], [4.5, 9.5, 2.0], [-0.49, 19.49, 4.49]])
    )
    outside = g.index_to_world(
        np.array([[-0.51, 0, 0], [9.6, 0, 0], [0, 19.51, 0], [0, 0, -1], [0, 0, 5]])
    )
    assert g.contains_world(inside).all()
    assert not g.contains_world(outside).any()
    assert g.contains_world(outside[0], margin=0.6)
    # the rotation matters: the axis-aligned box of the world coordinates would be wrong
    assert not g.contains_world(g.origin + np.array([9.0, 0.0, 0.0]))
