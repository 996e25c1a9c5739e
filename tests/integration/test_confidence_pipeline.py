"""Confidence through a run: calibration after training, the predictor, the files, the CLI.

Uses the session's tiny run (``tiny_run``, ``tests/conftest.py``); every test that writes into
a run works on a copy. The tiny models are poor: these tests check plumbing and decisions,
never accuracy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import CliResult
from landmark3d.data.crop import crop_dataset
from landmark3d.data.dataset import load_dataset
from landmark3d.engine.calibrate import calibrate_after_training, calibrate_run
from landmark3d.inference.confidence import CALIBRATION_FILE, load_calibration, probability_key
from landmark3d.inference.predictor import Predictor
from landmark3d.io.images import read_image
from landmark3d.io.landmarks import read_landmarks, write_landmarks

pytestmark = pytest.mark.slow
Cli = Callable[..., CliResult]
FIELDS = ("confidence", "expected_error_mm", probability_key())


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _copy_run(run: Path, dst: Path) -> Path:
    return Path(shutil.copytree(run, dst, ignore=shutil.ignore_patterns("cache")))


def _test_image(run: Path, phantom_dir: Path) -> Path:
    split = json.loads((run / "split.json").read_text())
    return load_dataset(phantom_dir).case(split["test"][0]).image


def test_training_calibrates_and_predict_writes_confidence(
    cli: Cli, tiny_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    cal = load_calibration(tiny_run)
    split = json.loads((tiny_run / "split.json").read_text())
    predictor = Predictor(tiny_run, device="cpu")
    assert cal is not None and predictor.calibration is not None
    assert cal.stage == predictor.stage and cal.stats["cases"] == split["val"]
    views = cal.stats["views_per_case"]
    assert views >= 1  # the validation cases and re-sampled views of them
    assert cal.stats["n_points"] + cal.stats["n_truth_outside"] == 6 * len(split["val"]) * (
        1 + views
    )
    assert not cal.absence_enabled and not predictor.absence  # no cropped training cases

    image = _test_image(tiny_run, phantom_dir)
    cid = image.name.removesuffix(".nii.gz")
    direct = predictor.predict_file(image).landmarks
    fcsv = tmp_path / "fcsv"
    r = cli("predict", "--model", tiny_run, "--input", image, "--out", fcsv, "--format", "fcsv",
            "--flag-above", "0")  # fmt: skip
    assert r.code == 0, r.err
    written = read_landmarks(fcsv / f"{cid}.fcsv")
    for name in written.names:
        ex = written.extras[name]
        assert all(k in ex for k in FIELDS) and ex["flagged"] == 1.0
        assert 0.0 <= float(ex["confidence"]) <= 1.0
        assert float(ex["expected_error_mm"]) == pytest.approx(
            float(direct.extras[name]["expected_error_mm"])
        )
        assert f"flagged {cid} {name}: expected error" in r.out
    assert f"{len(written.names)} landmark(s) flagged" in r.out

    csv_dir = tmp_path / "csv"
    r = cli("predict", "--model", tiny_run, "--input", image, "--out", csv_dir, "--format", "csv",
            "--flag-above", "1000", "--tta")  # fmt: skip
    assert r.code == 0, r.err
    header = (csv_dir / f"{cid}.csv").read_text().splitlines()[1].split(",")
    assert {*FIELDS, "flagged", "heatmap_spread_mm", "tta_spread_mm"} <= set(header)
    table = read_landmarks(csv_dir / f"{cid}.csv")
    assert all(table.extras[n]["flagged"] == 0.0 for n in table.names)
    assert all(float(table.extras[n]["tta_spread_mm"]) >= 0 for n in table.names)
    assert "0 landmark(s) flagged" in r.out

    # TTA is the default (the calibration was fitted with it); --no-tta is faster, writes no
    # tta_spread_mm, and is scored by the calibration's TTA-free refit, not the TTA model
    assert cal.tta and predictor.tta and cal.without_tta is not None
    fast = Predictor(tiny_run, device="cpu", tta=False)
    assert not fast.tta and fast.calibration is not None
    assert (
        fast.calibration.keys == cal.without_tta.keys
        and "tta_spread_mm" not in fast.calibration.keys
    )
    # a stage the calibration was not fitted for gets no calibration, so no TTA passes either
    other = Predictor(tiny_run, device="cpu", stage="fine" if cal.stage != "fine" else "coarse")
    assert other.calibration is None and not other.tta
    quick = fast.predict_file(image).landmarks
    json_dir = tmp_path / "json"
    r = cli("predict", "--model", tiny_run, "--input", image, "--out", json_dir, "--format", "json",
            "--no-tta")  # fmt: skip
    assert r.code == 0, r.err
    written = read_landmarks(json_dir / f"{cid}.json")
    for name in quick.names:
        ex = quick.extras[name]
        assert "tta_spread_mm" not in ex and "tta_spread_mm" not in written.extras[name]
        rescored = {k: v for k, v in ex.items() if k not in FIELDS}
        cal.without_tta.annotate(rescored)
        assert ex["expected_error_mm"] == rescored["expected_error_mm"]
        assert float(written.extras[name]["expected_error_mm"]) == pytest.approx(
            float(ex["expected_error_mm"])
        )


def test_uncalibrated_run_and_the_calibrate_command(
    cli: Cli, tiny_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / CALIBRATION_FILE).unlink()
    image = _test_image(run, phantom_dir)
    ls = Predictor(run, device="cpu").predict_file(image).landmarks
    for name in ls.names:  # raw scores, but no invented calibrated numbers
        assert "heatmap_spread_mm" in ls.extras[name] and "beyond_image_mm" in ls.extras[name]
        assert not any(k in ls.extras[name] for k in FIELDS)

    refused = cli("predict", "--model", run, "--input", image, "--out", tmp_path / "p",
                  "--flag-above", "3")  # fmt: skip
    assert refused.code != 0 and "calibrate" in refused.err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())

    r = cli("calibrate", "--model", run, "--device", "cpu")
    assert r.code == 0, r.err
    again, original = load_calibration(run), load_calibration(tiny_run)
    assert again is not None and original is not None
    assert again.keys == original.keys and again.stats["cases"] == original.stats["cases"]
    np.testing.assert_allclose(again.weights, original.weights, rtol=1e-3, atol=1e-6)

    # a run whose fine stage is gone cannot be calibrated: a stale calibration is removed
    shutil.rmtree(run / "fine" / "checkpoints" / "best")
    assert calibrate_after_training(run, load_dataset(phantom_dir)) is None
    assert not (run / CALIBRATION_FILE).exists()


class _FixedCoarse(nn.Module):
    """Stands in for the coarse ResNet: fixed normalised coordinates (-1..1 = the grid)."""

    def __init__(self, normalised: np.ndarray) -> None:
        super().__init__()
        self.out = torch.as_tensor(normalised, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.expand(x.shape[0], *self.out.shape).clone()


@pytest.mark.parametrize("absence", [True, None])
def test_landmark_predicted_far_outside_is_absent(
    tiny_run: Path, phantom_dir: Path, tmp_path: Path, absence: bool | None
) -> None:
    p = Predictor(tiny_run, device="cpu", absence=absence)
    t = np.zeros((len(p.landmark_names), 3))
    t[0] = [3.0, 0.0, 0.0]  # a grid width beyond the image along i
    p.coarse = _FixedCoarse(t)  # type: ignore[assignment]
    image = read_image(phantom_dir / "images" / "case003.nii.gz")
    assert p.flat_spread_mm is not None
    if absence:  # the 2-epoch U-Nets have no peak anywhere: with the flat-heatmap rule on,
        # everything inside the image is "not found" (honest for an untrained model)
        flat = p.predict(image).landmarks
        assert not flat.present.any()
        assert all(
            flat.missing_reason[n].startswith("not found in the image (flat heatmap")
            for n in flat.names[1:]
        )
        assert flat.missing_reason[flat.names[0]].startswith("outside field of view")
    p.flat_spread_mm = None  # the beyond-the-image rule alone
    ls = p.predict(image).landmarks
    first = ls.names[0]
    assert float(ls.extras[first]["beyond_image_mm"]) > 20.0
    if absence:
        assert ls.is_missing(first) and ls.extras[first]["absent"] == 1
        reason = ls.missing_reason[first]
        assert reason.startswith("outside field of view (predicted ") and "mm beyond" in reason
        write_landmarks(ls, tmp_path / "p.json")
        back = read_landmarks(tmp_path / "p.json")
        assert back.is_missing(first) and back.missing_reason[first] == reason
        assert not back.is_missing(ls.names[1])
    else:  # the tiny run was not trained on cropped scans: kept, flagged (the old behaviour)
        assert not ls.is_missing(first) and ls.extras[first]["outside_image"] == 1


def test_calibration_on_cropped_cases_enables_absence(
    tiny_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    spec = crop_dataset(phantom_dir, tmp_path / "cropped", fraction=1.0, seed=0)
    cropped = load_dataset(spec)
    run = _copy_run(tiny_run, tmp_path / "run")
    cal = calibrate_run(run, cropped, device="cpu", views=0)  # exact counts: the cases alone
    outside = sum(
        len(c.extra["crop"]["outside"]) for c in cropped.cases if c.id in cal.stats["cases"]
    )
    assert cal.stats["n_truth_outside"] == outside > 0
    assert cal.absence_enabled and cal.stats["n_annotations_outside_in_training"] >= outside
    # landmarks truly outside are not used to fit the error model
    assert cal.stats["n_points"] == 6 * cal.stats["n_cases"] - outside
    tp, fn = cal.stats["absence_true_positives"], cal.stats["absence_false_negatives"]
    assert tp + fn == outside
    predictor = Predictor(run, device="cpu")
    assert predictor.absence and predictor.absence_margin_mm == cal.absence_margin_mm


def test_calibration_views_add_points_with_the_truth_kept(
    tiny_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    """Re-sampled views of the validation cases multiply the calibration points; the fit is
    deterministic and records how many views it used."""
    run = _copy_run(tiny_run, tmp_path / "run")
    plain = calibrate_run(run, device="cpu", views=0)
    viewed = calibrate_run(run, device="cpu", views=2)
    again = calibrate_run(run, device="cpu", views=2)
    n0, n2 = plain.stats["n_points"], viewed.stats["n_points"]
    assert viewed.stats["views_per_case"] == 2 and plain.stats["views_per_case"] == 0
    # every annotated landmark of every view is either a point or outside that view's image
    annotated = n0 + plain.stats["n_truth_outside"]
    assert n2 + viewed.stats["n_truth_outside"] == 3 * annotated
    assert n2 > n0
    np.testing.assert_allclose(viewed.weights, again.weights)
    assert load_calibration(run) is not None
    with pytest.raises(ValueError, match="views"):
        calibrate_run(run, device="cpu", views=-1)
