"""Plan derivation and JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.config import ExperimentConfig, apply_overrides
from landmark3d.data.dataset import CaseSpec, Dataset
from landmark3d.errors import ConfigError
from landmark3d.geometry.space import Geometry
from landmark3d.planning import (
    Plan,
    dataset_fingerprint,
    derive_coarse_grid,
    derive_fine_spacing,
    learn_ct_window,
    lps_extent_and_spacing,
    make_plan,
)


def _write_ct(
    path: Path,
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    direction: np.ndarray | None = None,
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    arr = np.full(size[::-1], -1000.0, dtype=np.float32)  # sitk array order [k, j, i]
    k, j, i = size[2], size[1], size[0]
    arr[k // 4 : 3 * k // 4, j // 4 : 3 * j // 4, i // 4 : 3 * i // 4] = 40.0
    arr[k // 2 - 1 : k // 2 + 1, j // 2 - 1 : j // 2 + 1, :] = 1500.0
    arr += rng.normal(0, 5, arr.shape).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(img, str(path))
    return path


def _dataset(tmp_path: Path, modality: str = "CT") -> Dataset:
    cases = []
    for n, sp in enumerate([(1.0, 1.0, 2.5), (0.9, 0.9, 2.0), (1.1, 1.1, 3.0)]):
        p = _write_ct(tmp_path / f"c{n}.nii.gz", (40, 40, 20), sp, seed=n)
        cases.append(CaseSpec(f"c{n}", p, None))
    return Dataset(
        name="toy",
        root=tmp_path,
        landmark_names=["a", "b"],
        modality=modality,
        cases=cases,
        folds=[["c0"], ["c1"], ["c2"]],
        correlated_groups=[{"landmarks": ["a", "b"], "axis": "L"}],
    )


def test_derive_coarse_grid_reproduces_paper_grids() -> None:
    assert derive_coarse_grid([500.0, 500.0, 375.0], "CT") == (96, 96, 72)
    assert derive_coarse_grid([200.0, 200.0, 200.0], "MR") == (64, 64, 64)
    g = derive_coarse_grid([100.0, 200.0, 400.0], "MR")
    assert g[0] < g[1] < g[2] and all(v % 8 == 0 for v in g)


def test_derive_fine_spacing() -> None:
    assert derive_fine_spacing([2.5, 2.0, 3.0]) == (2.0, 2.0, 2.0)  # PDDCA-like -> 2 mm
    assert derive_fine_spacing([0.67, 0.7]) == (1.0, 1.0, 1.0)  # prostate-like -> 1 mm
    assert derive_fine_spacing([4.9]) == (4.0, 4.0, 4.0)


def test_learn_ct_window() -> None:
    rng = np.random.default_rng(0)
    air = np.full(50_000, -1000.0)
    tissue = rng.normal(40, 20, 40_000)
    bone = rng.uniform(300, 1500, 10_000)
    low, high = learn_ct_window(np.concatenate([air, tissue, bone]))
    assert low == pytest.approx(-1000.0)
    assert 1300 < high <= 1500
    lo2, hi2 = learn_ct_window(np.linspace(0.0, 1.0, 1001) - 900.0)  # not HU-like
    assert lo2 < hi2


def test_lps_extent_of_permuted_image() -> None:
    perm = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    geom = Geometry((10, 20, 30), (1.0, 2.0, 3.0), (0, 0, 0), perm)
    ext, sp = lps_extent_and_spacing(geom)
    # index axis i runs along world P, j along S, k along L
    np.testing.assert_allclose(ext, [90.0, 10.0, 40.0])
    np.testing.assert_allclose(sp, [3.0, 1.0, 2.0])


def test_make_plan_ct_learns_window(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    cfg = ExperimentConfig()
    plan = make_plan(ds, cfg, ["c0", "c1"])
    assert plan.orientation == "LPS"
    assert plan.case_ids == ["c0", "c1"]
    assert plan.intensity["mode"] == "ct_window"
    assert plan.intensity["low"] < -900 and plan.intensity["high"] > 1000
    assert plan.fine_spacing_mm == (2.0, 2.0, 2.0)
    assert plan.patch_size == (48, 48, 48)
    assert plan.correlated_groups == [{"landmarks": ["a", "b"], "axis": "L"}]
    np.testing.assert_allclose(plan.median_extent_mm, [38.0, 38.0, 45.0])
    assert all(v % 8 == 0 for v in plan.coarse_grid)
    np.testing.assert_allclose(
        plan.coarse_spacing_mm, np.array(plan.median_extent_mm) / plan.coarse_grid
    )
    # deterministic
    assert make_plan(ds, cfg, ["c0", "c1"]) == plan


def test_make_plan_config_values_win(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    cfg = apply_overrides(
        ExperimentConfig(),
        [
            "coarse.grid=[32,40,48]",
            "fine.spacing_mm=[1.5,1.5,1.5]",
            "intensity.ct_window=[-200,800]",
            "fine.patch_size=[32,32,32]",
        ],
    )
    plan = make_plan(ds, cfg)
    assert plan.coarse_grid == (32, 40, 48)
    assert plan.fine_spacing_mm == (1.5, 1.5, 1.5)
    assert plan.intensity == {"mode": "ct_window", "low": -200.0, "high": 800.0}
    assert plan.patch_size == (32, 32, 32)
    assert plan.case_ids == ["c0", "c1", "c2"]


def test_make_plan_mr(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, modality="MR")
    plan = make_plan(ds, ExperimentConfig())
    assert plan.intensity == {"mode": "mr_zscore", "percentiles": [0.5, 99.5]}
    assert plan.modality == "MR"


def test_fingerprint_changes_with_files(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    f1 = dataset_fingerprint(ds, ds.case_ids)
    assert f1 == dataset_fingerprint(ds, ds.case_ids)
    assert f1 != dataset_fingerprint(ds, ["c0", "c1"])
    _write_ct(tmp_path / "c2.nii.gz", (40, 40, 22), (1.1, 1.1, 3.0))
    assert f1 != dataset_fingerprint(ds, ds.case_ids)


def test_plan_json_round_trip_and_key(tmp_path: Path) -> None:
    plan = make_plan(_dataset(tmp_path), ExperimentConfig(), ["c0"])
    path = plan.save(tmp_path / "out" / "plan.json")
    back = Plan.load(path)
    assert back == plan
    assert back.preprocessing_key() == plan.preprocessing_key()
    other = Plan.from_dict({**plan.to_dict(), "fine_spacing_mm": [1.0, 1.0, 1.0]})
    assert other.preprocessing_key() != plan.preprocessing_key()
    assert plan.landmark_index("b") == 1


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"orientation": "RAS"}, "LPS"),
        ({"coarse_grid": [64, 64]}, "coarse_grid"),
        ({"intensity": {"mode": "ct_window", "low": 5, "high": 1}}, "low < high"),
        ({"intensity": {"mode": "fancy"}}, "mode"),
        ({"bogus": 1}, "bogus"),
        ({"fine_spacing_mm": [1, 0, 1]}, "fine_spacing_mm"),
    ],
)
def test_plan_load_rejects_bad_plans(tmp_path: Path, change: dict, fragment: str) -> None:
    plan = make_plan(_dataset(tmp_path), ExperimentConfig(), ["c0"])
    d = {**plan.to_dict(), **change}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=fragment) as ei:
        Plan.load(path)
    assert ei.value.path == path


def test_plan_load_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="landmark3d plan"):
        Plan.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  nope")
    with pytest.raises(ConfigError) as ei:
        Plan.load(bad)
    assert ei.value.line == 2
    del_key = tmp_path / "short.json"
    del_key.write_text(json.dumps({"orientation": "LPS"}))
    with pytest.raises(ConfigError, match="lacks"):
        Plan.load(del_key)
