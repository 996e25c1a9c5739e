"""Fit a run's confidence calibration on its validation cases: ``RUN/calibration.json``.

The validation cases (``split.json`` "val") are those that picked the ``best`` checkpoint and
were never trained on. Each is predicted with the run's own :class:`Predictor` (uncalibrated,
without the absence decision), its true errors are measured, and
:meth:`landmark3d.inference.confidence.Calibration.fit` maps the raw scores to an expected
error and P(error > 4 mm). The absence margin is fitted on the same predictions (landmarks
whose annotation lies outside their image are the positives), and the absence decision is
enabled by default when the run's training or validation annotations hold such landmarks —
i.e. when the model was trained on cropped scans.

With ``views`` > 0, every validation case is also predicted on ``views`` randomly re-sampled
views of itself (:func:`~landmark3d.geometry.resample.random_affine_geometry` with the config's
augmentation ranges: another field of view, orientation and resolution of the same anatomy;
the world coordinates of image and annotation are unchanged, so the truth stays valid). A run
has only a handful of validation cases (15 % of the training folds), and a regression fitted
on ~20 points is mostly noise; the views multiply the points and show the model in the
slightly-off conditions where its errors happen, without touching the test cases.

Stored as JSON (never pickle), written atomically; :class:`Predictor` loads it when present.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from landmark3d.data.dataset import Dataset, load_dataset
from landmark3d.errors import CheckpointError, DatasetError
from landmark3d.geometry.resample import random_affine_geometry, resample
from landmark3d.geometry.space import Geometry
from landmark3d.inference.confidence import (
    CALIBRATION_FILE,
    THRESHOLD_MM,
    Calibration,
    beyond_image_mm,
    fit_absence_margin,
)
from landmark3d.prior import read_geometry

DEFAULT_VIEWS = 4
"""Re-sampled views per validation case added to the calibration (see the module docstring)."""


def _split(run: Path) -> dict[str, Any]:
    path = run / "split.json"
    if not path.is_file():
        raise CheckpointError(
            "split.json not found: the run does not record its validation cases.",
            path=run,
            fix="calibrate a run directory written by `landmark3d train`.",
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise CheckpointError("split.json is not a JSON object.", path=path, fix="retrain the run.")
    return data


def _dataset_of(run: Path, split: dict[str, Any]) -> Dataset:
    source = split.get("dataset")
    if not source or not Path(str(source)).exists():
        raise DatasetError(
            f"the run's dataset {source!r} is not available.",
            path=run / "split.json",
            fix="pass the dataset explicitly (landmark3d calibrate --dataset ...).",
        )
    return load_dataset(str(source))


def count_outside(dataset: Dataset, case_ids: Sequence[str]) -> int:
    """Number of annotated landmarks lying outside their image (image headers only)."""
    n = 0
    for cid in case_ids:
        if not dataset.has_landmarks(cid):
            continue
        truth = dataset.read_landmarks(cid)
        if truth.present.any():
            inside = read_geometry(dataset, cid).contains_world(truth.coords[truth.present])
            n += int((~inside).sum())
    return n


def calibrate_run(
    run_dir: str | Path,
    dataset: Dataset | None = None,
    cases: Sequence[str] | None = None,
    tta: bool = True,
    device: str = "auto",
    threshold_mm: float = THRESHOLD_MM,
    progress: Callable[[str], None] | None = None,
    views: int = DEFAULT_VIEWS,
) -> Calibration:
    """Fit and store ``RUN/calibration.json``; returns the calibration.

    Args:
        run_dir: a trained run directory (coarse + fine checkpoints).
        dataset: the run's dataset (default: the one recorded in ``split.json``).
        cases: the cases to fit on (default: the run's validation cases).
        tta: also compute and use the test-time-augmentation spread (default): predictions
            then run TTA by default (about 5x the fine stage's cost) and the calibration also
            holds a TTA-free refit for ``--no-tta`` predictions. It is the strongest single
            score: on the confidence benchmark it lifts the share of large errors among the
            10 % least confident from 0.40 to 0.60-0.90 (``benchmarks/bench_confidence.py``).
        device: "auto", "cpu" or "cuda".
        threshold_mm: error threshold of the probability (4 mm).
        progress: called with each case id after it is predicted.
        views: re-sampled views per case predicted in addition to the case itself (0: none).

    Raises:
        CheckpointError: not a run directory / no checkpoints.
        DatasetError: the dataset is unavailable or lacks the cases.
    """
    from landmark3d.inference.predictor import Predictor  # inference imports engine modules

    run = Path(run_dir)
    split = _split(run)
    ds = dataset if dataset is not None else _dataset_of(run, split)
    ids = list(cases) if cases is not None else [str(c) for c in split.get("val", [])]
    ids = [c for c in ids if ds.has_landmarks(c)]
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    predictor = Predictor(run, device=device, calibrated=False, absence=False, tta=tta)
    aug = predictor.config.augment
    rows: list[dict[str, Any]] = []
    errors: list[float] = []
    beyond: list[float] = []
    spreads: list[float] = []
    outside: list[bool] = []
    for index, cid in enumerate(ids):
        original = ds.read_image(cid)
        truth = ds.read_landmarks(cid).subset(predictor.landmark_names)
        rng = np.random.default_rng([predictor.config.seed, index])
        base = Geometry.from_sitk(original)
        background = _background(original) if views else 0.0
        for view in range(views + 1):
            image = original
            if view:  # same anatomy and world coordinates, another grid: the truth still holds
                grid = random_affine_geometry(base, rng, aug.translate, aug.scale, aug.rotate_deg)
                image = resample(original, grid, default_value=background)
            pred = predictor.predict(image)
            geometry = pred.geometry if pred.geometry is not None else Geometry.from_sitk(image)
            truth_out = ~geometry.contains_world(truth.coords) & truth.present
            lms = pred.landmarks
            for row, name in enumerate(lms.names):
                if not truth.present[row]:
                    continue
                ex = lms.extras.get(name, {})
                b = ex.get("beyond_image_mm", np.nan)
                beyond.append(float(b) if isinstance(b, int | float) else np.nan)
                sp = ex.get("heatmap_spread_mm", np.nan)
                spreads.append(float(sp) if isinstance(sp, int | float) else np.nan)
                outside.append(bool(truth_out[row]))
                if truth_out[row] or not lms.present[row]:
                    continue  # the coordinate of a landmark outside the image is not calibrated
                rows.append(dict(ex))
                errors.append(float(np.linalg.norm(lms.coords[row] - truth.coords[row])))
        if progress is not None:
            progress(cid)
    cal = Calibration.fit(rows, errors, threshold_mm=threshold_mm)
    train_ids = [str(c) for c in split.get("train", [])]
    n_train_outside = count_outside(ds, train_ids + ids) if ids or train_ids else 0
    cal.absence_margin_mm = fit_absence_margin(beyond, outside)
    cal.absence_enabled = n_train_outside > 0
    cal.stage = predictor.stage
    cal.tta = bool(tta)
    if cal.without_tta is not None:  # the TTA-free refit: same stage and absence settings
        fallback = cal.without_tta
        fallback.absence_margin_mm = cal.absence_margin_mm
        fallback.absence_enabled = cal.absence_enabled
        fallback.stage, fallback.tta = cal.stage, False
    b_arr, o_arr = np.asarray(beyond), np.asarray(outside, dtype=bool)
    flat = predictor.flat_spread_mm
    decided = b_arr > cal.absence_margin_mm
    if flat is not None:  # the predictor's second rule: a flat heatmap is "not found"
        decided |= np.asarray(spreads) > flat
    cal.stats.update(
        {
            "cases": ids,
            "n_cases": len(ids),
            "views_per_case": views,
            "n_truth_outside": int(o_arr.sum()),
            "n_annotations_outside_in_training": n_train_outside,
            "absence_true_positives": int((decided & o_arr).sum()),
            "absence_false_positives": int((decided & ~o_arr).sum()),
            "absence_false_negatives": int((~decided & o_arr).sum()),
        }
    )
    cal.save(run / CALIBRATION_FILE)
    return cal


def _background(image: sitk.Image) -> float:
    """The image's minimum intensity: what lies outside a scan (air in CT, 0 in MR)."""
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return float(stats.GetMinimum())


def truth_beyond_mm(dataset: Dataset, case_id: str) -> np.ndarray:
    """Distance (N,) mm of the case's annotated landmarks outside its image (0 inside, NaN
    where not annotated), in the dataset's landmark order."""
    truth = dataset.read_landmarks(case_id)
    return beyond_image_mm(read_geometry(dataset, case_id), truth.coords)


def calibrate_after_training(
    run_dir: str | Path, dataset: Dataset, device: str = "auto"
) -> Calibration | None:
    """Called at the end of :func:`landmark3d.engine.run.train_run`: calibrate when the run
    has ``best`` coarse and fine checkpoints and validation cases; else remove a stale
    ``calibration.json`` (it would describe other weights) and return None."""
    run = Path(run_dir)
    ready = all((run / s / "checkpoints" / "best").is_dir() for s in ("coarse", "fine"))
    split = _split(run)
    stale = run / CALIBRATION_FILE
    if not ready or not split.get("val"):
        stale.unlink(missing_ok=True)
        return None
    return calibrate_run(run, dataset, device=device)
