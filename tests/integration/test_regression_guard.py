"""Regression guard: a small, fast, fixed-seed subset of the benchmark suite (``make test``).

Each method of ``benchmarks/bench_suite.py`` is run in miniature on the session phantom
(6 cases, 48 voxels, fold 0): the ``tiny_run`` fixture (coarse + fine + correlated, 2 epochs,
tiny networks) predicted coarse-only, coarse + fine and full; a 2-epoch one-stage U-Net; and
the atlas baseline. The test fails when an MRE *degrades* beyond the tolerance recorded in
``benchmarks/regression_guard.json`` (``measured > recorded × (1 + relative) + absolute_mm``).
It is not a timing assertion. Everything is seeded and runs on CPU, so on one machine the
numbers repeat exactly; the tolerance absorbs float differences between CPUs/BLAS builds.

To re-record after an intended change: ``LANDMARK3D_RECORD_GUARD=1 pytest
tests/integration/test_regression_guard.py`` (writes the JSON; review and commit it).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

GUARD = Path(__file__).resolve().parents[2] / "benchmarks" / "regression_guard.json"
RECORD = os.environ.get("LANDMARK3D_RECORD_GUARD") == "1"
DEFAULT_TOLERANCE = {"relative": 0.15, "absolute_mm": 1.0}


def _mre(predict, ds, test_ids: list[str], names: list[str]) -> float:  # type: ignore[no-untyped-def]
    errors = []
    for cid in test_ids:
        pred = predict(ds.read_image(cid))
        truth = ds.read_landmarks(cid).subset(names).coords
        errors.append(np.linalg.norm(pred.landmarks.subset(names).coords - truth, axis=1))
    return float(np.nanmean(np.stack(errors)))


def _measure(phantom_dir: Path, tiny_run: Path, tmp_path: Path) -> dict[str, float]:
    from landmark3d.baselines.atlas import AtlasConfig, AtlasPredictor
    from landmark3d.baselines.onestage import OneStageConfig, OneStagePredictor, train_onestage
    from landmark3d.config import ExperimentConfig
    from landmark3d.data.dataset import load_dataset
    from landmark3d.inference.predictor import Predictor

    ds = load_dataset(phantom_dir / "dataset.json")
    names = list(ds.landmark_names)
    split = json.loads((tiny_run / "split.json").read_text(encoding="utf-8"))
    test_ids = list(split["test"])
    out: dict[str, float] = {}
    for method, stage in (("coarse", "coarse"), ("fine_per_landmark", "fine"), ("full", "auto")):
        predictor = Predictor(tiny_run, device="cpu", stage=stage)  # type: ignore[arg-type]
        out[method] = _mre(predictor.predict, ds, test_ids, names)
    config = ExperimentConfig.from_json(tiny_run / "config.json")
    threads = torch.get_num_threads()
    try:
        train_onestage(
            ds, config, tmp_path / "onestage", 0,
            OneStageConfig(channels=(4, 8), epochs=2, val_every=1),
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out["onestage"] = _mre(
        OneStagePredictor(tmp_path / "onestage", "cpu").predict, ds, test_ids, names
    )
    atlas = AtlasPredictor.from_dataset(
        ds, split["train"] + split["val"], AtlasConfig(k=3, threads=2)
    )
    out["atlas"] = _mre(atlas.predict, ds, test_ids, names)
    return out


def test_mre_has_not_degraded(phantom_dir: Path, tiny_run: Path, tmp_path: Path) -> None:
    measured = _measure(phantom_dir, tiny_run, tmp_path)
    print("regression guard MRE (mm):", json.dumps({k: round(v, 4) for k, v in measured.items()}))
    if RECORD:
        guard = {
            "description": "Fixed-seed MRE (mm) of the regression guard "
            "(tests/integration/test_regression_guard.py): session phantom (6 cases, size 48, "
            "seed 0), fold 0, tests/conftest.py TINY_OVERRIDES; fails when measured > "
            "recorded * (1 + relative) + absolute_mm.",
            "tolerance": DEFAULT_TOLERANCE,
            "mre_mm": {k: round(v, 4) for k, v in measured.items()},
            "recorded": dt.date.today().isoformat(),
            "machine": f"{platform.machine()}, torch {torch.__version__}",
        }
        GUARD.write_text(json.dumps(guard, indent=2) + "\n", encoding="utf-8")
        pytest.skip(f"recorded {GUARD}")
    guard = json.loads(GUARD.read_text(encoding="utf-8"))
    tol = guard["tolerance"]
    worse = []
    for method, recorded in guard["mre_mm"].items():
        limit = recorded * (1.0 + tol["relative"]) + tol["absolute_mm"]
        if measured[method] > limit:
            worse.append(f"{method}: {measured[method]:.3f} mm > {limit:.3f} (recorded {recorded})")
    assert not worse, "MRE degraded beyond the recorded tolerance: " + "; ".join(worse)
    assert set(measured) == set(guard["mre_mm"]), "the guard's methods changed: re-record it"
