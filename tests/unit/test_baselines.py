"""Baselines of the benchmark suite: atlas registration (world mapping!) and one-stage U-Net."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.baselines.atlas import (
    Atlas,
    AtlasConfig,
    AtlasPredictor,
    carry_landmarks,
    fuse_median,
    register_affine,
    registration_image,
)
from landmark3d.errors import ConfigError
from landmark3d.geometry.resample import rotation_matrix

# a small known-affine problem: 2 mm, 500 iterations, all voxels sampled 25 %
ACCURATE = AtlasConfig(k=1, spacing_mm=2.0, iterations=500, sampling_fraction=0.25, threads=2)
BLOBS = [  # (centre mm, radii mm, HU): an asymmetric "head"
    ((0, 0, 0), (45, 38, 30), 100.0),
    ((15, -10, 5), (10, 8, 12), 400.0),
    ((-20, 12, -8), (6, 14, 6), -300.0),
    ((5, 20, 18), (8, 5, 5), 800.0),
]
POINTS = np.array([[15.0, -10.0, 5.0], [-20.0, 12.0, -8.0], [5.0, 20.0, 18.0], [0.0, 0.0, 0.0]])


def _blob_image(size: int = 56, spacing: float = 2.5) -> sitk.Image:
    """Moving image: blobs in world mm around the origin, identity direction."""
    w = (np.arange(size) - (size - 1) / 2.0) * spacing
    x, y, z = np.meshgrid(w, w, w, indexing="ij")
    arr = np.zeros((size,) * 3, np.float32)
    for c, r, v in BLOBS:
        d = sum(((a - ci) / ri) ** 2 for a, ci, ri in zip((x, y, z), c, r, strict=True))
        arr[d <= 1.0] += v
    img = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)))
    img.SetSpacing([spacing] * 3)
    img.SetOrigin([-(size - 1) * spacing / 2.0] * 3)
    return img


def _known_pair() -> tuple[sitk.Image, sitk.Image, sitk.AffineTransform]:
    """(fixed, moving, T) with fixed(p) = moving(T(p)); fixed stored RAS, anisotropic."""
    moving = _blob_image()
    t = sitk.AffineTransform(3)
    t.SetMatrix((rotation_matrix([0.3, 1.0, 0.2], np.deg2rad(9.0)) * 1.05).ravel().tolist())
    t.SetTranslation([6.0, -4.0, 3.0])
    ref = sitk.Image([60, 56, 52], sitk.sitkFloat32)
    ref.SetSpacing([2.2, 2.4, 2.6])
    ref.SetOrigin([60.0, 65.0, -70.0])
    ref.SetDirection([-1, 0, 0, 0, -1, 0, 0, 0, 1])  # RAS storage: i runs right, j anterior
    fixed = sitk.Resample(moving, ref, t, sitk.sitkLinear, 0.0)
    return fixed, moving, t


@pytest.fixture(scope="module")
def known_pair() -> tuple[sitk.Image, sitk.Image, sitk.AffineTransform]:
    return _known_pair()


def test_atlas_recovers_a_known_affine_in_world_lps(known_pair: tuple) -> None:
    fixed, moving, t = known_pair
    expect = np.array([t.GetInverse().TransformPoint(tuple(p)) for p in POINTS])
    f = registration_image(fixed, ACCURATE.spacing_mm)
    m = registration_image(moving, ACCURATE.spacing_mm)
    reg = register_affine(f, m, ACCURATE)
    got = carry_landmarks(reg.transform, POINTS)
    err = np.linalg.norm(got - expect, axis=1)  # measured: 1.20, 1.64, 2.05, 0.05 mm
    assert err.max() < 2.5 and err.mean() < 2.0, err
    # reproducible: the metric sampling is seeded
    again = carry_landmarks(register_affine(f, m, ACCURATE).transform, POINTS)
    np.testing.assert_allclose(again, got, atol=1e-3)
    # carrying with the forward transform (the classic mistake) is far off
    forward = np.array([reg.transform.TransformPoint(tuple(p)) for p in POINTS])
    assert np.linalg.norm(forward - expect, axis=1).min() > 5.0


def test_atlas_predictor_picks_the_best_matching_atlas(known_pair: tuple) -> None:
    fixed, moving, t = known_pair
    names = ["a", "b", "c", "d"]
    cfg = AtlasConfig(k=1, spacing_mm=2.5, threads=2)  # the fast defaults
    good = Atlas("good", registration_image(moving, cfg.spacing_mm), POINTS.copy())
    rng = np.random.default_rng(0)
    noise = sitk.GetImageFromArray(rng.normal(0, 300, (56, 56, 56)).astype(np.float32))
    noise.CopyInformation(moving)
    bad = Atlas("bad", registration_image(noise, cfg.spacing_mm), POINTS + 40.0)
    pred = AtlasPredictor([bad, good], names, cfg).predict(fixed)
    assert pred.chosen == ["good"]
    assert pred.metrics["good"] < pred.metrics["bad"]
    expect = np.array([t.GetInverse().TransformPoint(tuple(p)) for p in POINTS])
    assert np.linalg.norm(pred.landmarks.coords - expect, axis=1).max() < 3.0
    assert pred.landmarks.names == names
    assert set(pred.timings) == {"preprocess", "register", "fuse"}


def test_carry_and_fuse_keep_missing_landmarks_missing() -> None:
    shift = sitk.TranslationTransform(3, (1.0, 2.0, 3.0))  # fixed -> moving
    pts = np.array([[0.0, 0.0, 0.0], [np.nan, np.nan, np.nan]])
    out = carry_landmarks(shift, pts)
    np.testing.assert_allclose(out[0], [-1.0, -2.0, -3.0])
    assert np.isnan(out[1]).all()
    stack = np.array(
        [
            [[0.0, 0.0, 0.0], [np.nan] * 3],
            [[1.0, 10.0, 0.0], [np.nan] * 3],
            [[5.0, 2.0, 0.0], [np.nan] * 3],
            [[np.nan] * 3, [np.nan] * 3],
        ]
    )
    fused = fuse_median(stack)
    np.testing.assert_allclose(fused[0], [1.0, 2.0, 0.0])  # component-wise median of 3
    assert np.isnan(fused[1]).all()
    with pytest.raises(ValueError):
        fuse_median(np.zeros((2, 3)))


def test_registration_image_keeps_physical_space_and_never_upsamples() -> None:
    img = _blob_image(size=40, spacing=2.5)
    img.SetDirection([0, 1, 0, 1, 0, 0, 0, 0, -1])
    out = registration_image(img, 1.0)  # finer than the image: kept at 2.5 mm
    assert np.allclose(out.GetSpacing(), 2.5)
    coarse = registration_image(img, 5.0)
    assert np.allclose(coarse.GetSpacing(), 5.0)
    assert coarse.GetDirection() == img.GetDirection()
    a = sitk.GetArrayViewFromImage(coarse)
    assert a.min() >= 0.0 and a.max() <= 1.0
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint([19.5] * 3))
    size = np.array(coarse.GetSize(), dtype=float)
    c2 = np.array(coarse.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    assert np.linalg.norm(centre - c2) < 1e-6


@pytest.mark.parametrize(
    "kw",
    [dict(k=0), dict(seed=0), dict(shrink_factors=(4, 2), smoothing_sigmas=(1.0,)), dict(sampling_fraction=0.0),
     dict(initializer="nope"), dict(spacing_mm=0.0)],
)  # fmt: skip
def test_atlas_config_rejects_bad_settings(kw: dict) -> None:
    with pytest.raises(ConfigError):
        AtlasConfig(**kw)


# ---------------------------------------------------------------------------- one-stage U-Net
def test_onestage_config_round_trip_and_grid_check() -> None:
    from landmark3d.baselines.onestage import OneStageConfig

    cfg = OneStageConfig(grid=(32, 32, 48), channels=(4, 8, 16), sigma_mm=5.0)
    assert OneStageConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError):
        OneStageConfig.from_dict({"grdi": [32, 32, 32]})
    plan = _tiny_plan()
    with pytest.raises(ConfigError, match="multiples of 4"):
        OneStageConfig(grid=(30, 32, 32), channels=(4, 8, 16)).resolved(plan)
    r = OneStageConfig(channels=(4, 8)).resolved(plan)
    assert r.grid == tuple(plan.coarse_grid)
    assert r.sigma_mm == pytest.approx(2.0 * max(plan.coarse_spacing_mm))


def _tiny_plan():  # type: ignore[no-untyped-def]
    from landmark3d.planning import Plan

    return Plan(
        orientation="LPS",
        coarse_grid=(32, 32, 32),
        coarse_spacing_mm=(6.0, 6.0, 5.0),
        fine_spacing_mm=(1.5, 1.5, 1.5),
        patch_size=(16, 16, 16),
        intensity={"mode": "ct_window", "low": -1000.0, "high": 1500.0},
        landmark_names=["a", "b"],
    )


def _tiny_config():  # type: ignore[no-untyped-def]
    from landmark3d.config import apply_overrides, load_config

    return apply_overrides(load_config("phantom_demo"), ["coarse.grid=[32,32,32]", "num_threads=2"])


def test_onestage_targets_sit_on_the_landmarks_in_world_mm(
    phantom_dir: Path, tmp_path: Path
) -> None:
    from landmark3d.baselines.onestage import OneStageConfig, OneStageStage
    from landmark3d.data.dataset import load_dataset
    from landmark3d.data.preprocess import CaseCache
    from landmark3d.engine.run import make_split
    from landmark3d.geometry.decode import decode_world
    from landmark3d.planning import make_plan

    ds = load_dataset(phantom_dir / "dataset.json")
    cfg = _tiny_config()
    split = make_split(ds, 0, cfg.seed)
    plan = make_plan(ds, cfg, split.train + split.val)
    cache = CaseCache(tmp_path / "cache", plan, keep_in_memory=True)
    stage = OneStageStage(
        ds, plan, cfg, OneStageConfig(channels=(4, 8)), cache, split.train, split.val
    )
    rng = np.random.default_rng(3)
    batch = next(iter(stage.train_batches(0, rng)))
    x, heat = (t.numpy() for t in batch)
    assert x.shape[1:] == (1, 32, 32, 32) and heat.shape[1:] == (
        len(plan.landmark_names),
        32,
        32,
        32,
    )
    # rebuild the first sample's grid with the same rng draws, decode its targets to the world
    from landmark3d.data.preprocess import coarse_sample

    rng = np.random.default_rng(3)
    order = [split.train[i] for i in rng.permutation(len(split.train))]
    prepared = stage.case(order[0])
    _, _, geom = coarse_sample(prepared, stage.sample_plan, rng, cfg.augment)
    world, _ = decode_world(heat[0], geom, stage.onestage.sigma_mm)
    err = np.linalg.norm(world - prepared.landmarks.coords, axis=1)
    assert np.nanmax(err) < 0.1 * max(geom.spacing), err
    # the epoch's batch sizes (what distributed training checks before it starts) are those
    # of the batches it draws: every training case once, no trailing batch of one
    sizes = stage.batch_sizes()
    drawn = [len(b[0]) for b in stage.train_batches(0, np.random.default_rng(4))]
    assert sizes == drawn and sum(sizes) == len(split.train) and 1 not in sizes
    assert stage.n_batches(0) == len(sizes)


def test_onestage_trains_and_predicts_world_coordinates(phantom_dir: Path, tmp_path: Path) -> None:
    from landmark3d.baselines.onestage import OneStageConfig, OneStagePredictor, train_onestage
    from landmark3d.data.dataset import load_dataset

    ds = load_dataset(phantom_dir / "dataset.json")
    result = train_onestage(
        ds,
        _tiny_config(),
        tmp_path / "run",
        0,
        OneStageConfig(channels=(4, 8), epochs=1, val_every=1),
    )
    assert result.finished and result.best_checkpoint is not None
    assert (tmp_path / "run" / "plan.json").is_file()
    predictor = OneStagePredictor(tmp_path / "run", device="cpu")
    case = json.loads((tmp_path / "run" / "split.json").read_text())["test"][0]
    image = ds.read_image(case)
    pred = predictor.predict(image)
    assert pred.landmarks.names == list(ds.landmark_names)
    assert np.isfinite(pred.landmarks.coords).all()
    # storing the same image flipped along i leaves the world prediction unchanged
    flipped = sitk.Flip(image, [True, False, False])
    again = predictor.predict(flipped)
    np.testing.assert_allclose(again.landmarks.coords, pred.landmarks.coords, atol=1e-3)
    # a second call with resume=True continues (nothing left to do) instead of refusing
    again_result = train_onestage(
        ds, _tiny_config(), tmp_path / "run", 0,
        OneStageConfig(channels=(4, 8), epochs=1, val_every=1), resume=True,
    )  # fmt: skip
    assert again_result.epochs_completed == 1


# ---------------------------------------------------------------------------- suite helpers
def test_stage_train_seconds_sums_the_logged_epochs(tmp_path: Path) -> None:
    from landmark3d.baselines.suite import stage_train_seconds

    assert stage_train_seconds(tmp_path) is None
    (tmp_path / "train.log").write_text(
        "2025 start coarse\n2025 epoch 1/3 done in 1.5s: loss\n2025 epoch 2/3 done in 2.25s\n"
    )
    assert stage_train_seconds(tmp_path) == pytest.approx(3.75)


def test_markdown_reports_ratios_and_targets() -> None:
    from landmark3d.baselines.suite import LABELS
    from landmark3d.baselines.suite_report import markdown

    def row(method: str, mre: float) -> dict:
        return {
            "method": method, "label": LABELS[method], "mre_sd": f"{mre:.2f} (1.00)",
            "median_mm": mre, "sdr_percent": {"2": 50.0, "2.5": 60.0, "3": 70.0, "4": 80.0, "8": 90.0},
            "per_landmark_mre_mm": {"a": mre}, "train_s": 10.0, "inference_s": 0.5,
            "inference_over_load": 5.0, "peak_rss_mb": 400.0, "note": "",
        }  # fmt: skip

    result = {
        "rows": [row("onestage", 9.0), row("full", 2.0)],
        "meta": {
            "landmarks": ["a"], "fold": 0, "test_cases": ["x"], "dataset": "d", "repeat": 3,
            "atlas_repeat": 1, "memory": {"reference_peak_rss_mb": 300.0},
            "ratios": {"mre_onestage_over_full": 4.5, "mre_coarse_over_full": None,
                       "mre_atlas_over_full": None, "inference_full_over_onestage": 1.0,
                       "train_full_over_onestage": 1.0},
            "targets": {"full_vs_onestage_at_least_3x": True, "full_vs_coarse_at_least_2x": None},
        },
    }  # fmt: skip
    md = markdown(result)
    assert "**4.50×** (target ≥ 3: met)" in md
    assert "coarse-only / full = **n/a×** (target ≥ 2: n/a)" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[1].startswith("| 3D U-Net")  # header + 2 rows


def test_run_job_in_a_child_reports_its_peak_memory() -> None:
    from landmark3d.baselines.suite import run_job, stage_train_seconds

    out = run_job(_child_job, 3, isolate=True)
    assert out["value"] == 9 and out["peak_rss_mb"] > 1.0
    local = run_job(_child_job, 2, isolate=False)
    assert local == {"value": 4, "peak_rss_mb": None}
    assert stage_train_seconds  # imported in the child too


def _child_job(x: int) -> dict:
    return {"value": x * x}


def test_reuse_ignores_only_the_correlated_section(tmp_path: Path) -> None:
    from landmark3d.baselines.suite import _same_config
    from landmark3d.config import apply_overrides, load_config

    cfg = load_config("phantom_demo")
    cfg.save_json(tmp_path / "config.json")
    other_corr = apply_overrides(cfg, ["correlated.epochs=7"])
    other_fine = apply_overrides(cfg, ["fine.epochs=7"])
    assert _same_config(tmp_path, cfg)
    assert not _same_config(tmp_path, other_corr)
    assert _same_config(tmp_path, other_corr, ignore=("correlated",))
    assert not _same_config(tmp_path, other_fine, ignore=("correlated",))
    assert not _same_config(tmp_path / "missing", cfg, ignore=("correlated",))
