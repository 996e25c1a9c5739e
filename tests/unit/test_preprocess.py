"""Preprocessing: normalisation, prepared cases and their cache, coarse and fine samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.config import AugmentConfig, FineConfig
from landmark3d.data.dataset import CaseSpec, Dataset
from landmark3d.data.preprocess import (
    CaseCache,
    coarse_geometry,
    coarse_sample,
    fine_patch,
    fine_training_sample,
    from_normalized,
    intensity_augment,
    normalize,
    prepare_case,
    to_normalized,
)
from landmark3d.geometry.space import Geometry, Volume
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import write_landmarks
from landmark3d.planning import Plan

A = np.array([10.0, -6.0, 14.0])  # landmark "a", LPS mm
B = np.array([-12.0, 8.0, -9.0])  # landmark "b"


def _plan(**kw: object) -> Plan:
    base: dict = dict(
        orientation="LPS",
        coarse_grid=(32, 32, 32),
        coarse_spacing_mm=(3.0, 3.0, 3.0),
        fine_spacing_mm=(2.0, 2.0, 2.0),
        patch_size=(16, 16, 16),
        intensity={"mode": "ct_window", "low": 0.0, "high": 1.0},
        landmark_names=["a", "b"],
    )
    base.update(kw)
    return Plan(**base)


def _blob_image(direction: np.ndarray | None = None, blobs: tuple = (A,)) -> sitk.Image:
    """A 0..1 image with a Gaussian blob (SD 4 mm) at each of ``blobs``, centred at 0."""
    direction = np.eye(3) if direction is None else direction
    size, spacing = (48, 40, 32), np.array([1.5, 1.8, 2.2])
    origin = -direction @ (spacing * (np.array(size) - 1) / 2)
    geom = Geometry(size, spacing, origin, direction)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)
    world = geom.index_to_world(idx)
    arr = np.zeros(size, dtype=np.float32)
    for c in blobs:
        arr += np.exp(-np.sum((world - c) ** 2, axis=-1) / (2 * 4.0**2)).astype(np.float32)
    return Volume(arr, geom).to_sitk()


def _landmarks(a: np.ndarray | None = A, b: np.ndarray | None = B) -> LandmarkSet:
    return LandmarkSet.from_dict({"b": b, "a": a})  # deliberately not in plan order


# ----------------------------------------------------------------------- intensity
def test_normalize_ct_window() -> None:
    out = normalize(
        np.array([-2000.0, -1000.0, 500.0, 2000.0, 9000.0]),
        {"mode": "ct_window", "low": -1000.0, "high": 2000.0},
    )
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert out.dtype == np.float32


def test_normalize_mr_zscore_clips_outliers() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(300.0, 50.0, 100_000)
    a[:10] = 1e6
    out = normalize(a, {"mode": "mr_zscore", "percentiles": [0.5, 99.5]})
    assert abs(out.mean()) < 1e-3 and abs(out.std() - 1.0) < 1e-3
    assert out.max() < 4.0
    with pytest.raises(ValueError):
        normalize(a, {"mode": "other"})


def test_intensity_augment_range_and_determinism() -> None:
    x = np.linspace(0, 1, 11, dtype=np.float32)
    y1 = intensity_augment(x, np.random.default_rng(5), 0.1)
    y2 = intensity_augment(x, np.random.default_rng(5), 0.1)
    np.testing.assert_array_equal(y1, y2)
    scale = (y1[-1] - y1[0]) / (x[-1] - x[0])
    assert 0.9 <= scale <= 1.1 and -0.1 <= y1[0] <= 0.1
    assert not np.allclose(y1, x)
    np.testing.assert_array_equal(intensity_augment(x, np.random.default_rng(5), 0.0), x)


# ----------------------------------------------------------------------- coordinates
def test_normalized_round_trip_and_corners() -> None:
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    geom = Geometry((20, 30, 40), (1.0, 2.0, 0.5), (5.0, -3.0, 2.0), rot)
    corners = geom.index_to_world([[0, 0, 0], [19, 29, 39], [9.5, 14.5, 19.5]])
    t = to_normalized(geom, corners)
    np.testing.assert_allclose(t, [[-1, -1, -1], [1, 1, 1], [0, 0, 0]], atol=1e-12)
    pts = np.array([[1.0, 2.0, 3.0], [np.nan, np.nan, np.nan], [-7.0, 4.0, 10.0]])
    back = from_normalized(geom, to_normalized(geom, pts))
    np.testing.assert_allclose(back[[0, 2]], pts[[0, 2]], atol=1e-9)
    assert np.isnan(back[1]).all()


# ----------------------------------------------------------------------- prepare
def test_prepare_case_reorients_and_resamples() -> None:
    plan = _plan()
    lps = prepare_case(_blob_image(), _landmarks(), plan, "x")
    ras_dir = np.diag([-1.0, -1.0, 1.0])
    ras = prepare_case(_blob_image(ras_dir), _landmarks(), plan, "x")
    for p in (lps, ras):
        assert p.image.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_allclose(p.image.GetSpacing(), plan.fine_spacing_mm)
        np.testing.assert_allclose(
            np.array(p.image.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-9
        )
        assert p.landmarks.names == ["a", "b"]
        np.testing.assert_allclose(p.landmarks.coords[0], A)
    # the same anatomy gives the same prepared voxels, whatever the storage orientation
    v1, v2 = Volume.from_sitk(lps.image), Volume.from_sitk(ras.image)
    assert v1.geometry.is_close(v2.geometry, atol=1e-6)
    np.testing.assert_allclose(v1.array, v2.array, atol=1e-4)
    # the blob is where the landmark is
    peak = v1.geometry.index_to_world(np.unravel_index(np.argmax(v1.array), v1.array.shape))
    assert np.linalg.norm(peak - A) < 2.0
    # unannotated case
    none = prepare_case(_blob_image(), None, plan)
    assert (~none.landmarks.present).all()


# ----------------------------------------------------------------------- coarse
def test_coarse_sample_without_rng_is_plain_grid() -> None:
    plan = _plan()
    prepared = prepare_case(_blob_image(), _landmarks(), plan, "x")
    img, target, geom = coarse_sample(prepared, plan)
    assert img.shape == plan.coarse_grid and img.dtype == np.float32
    assert target.shape == (2, 3) and target.dtype == np.float32
    assert geom.is_close(coarse_geometry(prepared, plan))
    np.testing.assert_allclose(from_normalized(geom, target), np.stack([A, B]), atol=1e-3)
    # augment disabled -> same as no augmentation
    off = AugmentConfig(enabled=False)
    img2, _, _ = coarse_sample(prepared, plan, np.random.default_rng(0), off)
    np.testing.assert_array_equal(img, img2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coarse_augmentation_moves_image_and_target_together(seed: int) -> None:
    """A bright blob at landmark "a" appears at its normalised target after augmentation."""
    plan = _plan()
    prepared = prepare_case(_blob_image(), _landmarks(b=None), plan, "x")
    aug = AugmentConfig(translate=0.1, scale=0.1, rotate_deg=15.0, intensity=0.0)
    _, plain_target, plain_geom = coarse_sample(prepared, plan)
    img, target, geom = coarse_sample(prepared, plan, np.random.default_rng(seed), aug)
    assert np.isnan(target[1]).all()
    assert not geom.is_close(plain_geom, atol=1e-3)
    assert np.abs(target[0] - plain_target[0]).max() > 0.01  # the augmentation moved it
    size = np.array(plan.coarse_grid, dtype=np.float64)
    expected_index = (target[0] + 1.0) * (size - 1) / 2.0
    peak_index = np.array(np.unravel_index(np.argmax(img), img.shape), dtype=np.float64)
    assert np.linalg.norm(peak_index - expected_index) <= 1.0


def test_coarse_sample_deterministic_given_seed() -> None:
    plan = _plan()
    prepared = prepare_case(_blob_image(), _landmarks(), plan, "x")
    aug = AugmentConfig()
    a = coarse_sample(prepared, plan, np.random.default_rng(3), aug)
    b = coarse_sample(prepared, plan, np.random.default_rng(3), aug)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ----------------------------------------------------------------------- fine
def test_fine_patch_centred() -> None:
    plan = _plan()
    prepared = prepare_case(_blob_image(), _landmarks(), plan, "x")
    vol = fine_patch(prepared, A, plan)
    assert vol.array.shape == plan.patch_size
    np.testing.assert_allclose(vol.geometry.spacing, plan.fine_spacing_mm)
    np.testing.assert_allclose(vol.geometry.center_world, A, atol=1e-6)
    peak = vol.geometry.index_to_world(np.unravel_index(np.argmax(vol.array), vol.array.shape))
    assert np.linalg.norm(peak - A) < 2.5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fine_training_sample_heatmap_at_blob_and_missing_flagged(seed: int) -> None:
    """Patch and heatmap share one (jittered, rotated, scaled) grid: the peaks coincide."""
    plan = _plan(patch_size=(24, 24, 24))
    prepared = prepare_case(_blob_image(blobs=(A,)), _landmarks(b=None), plan, "x")
    cfg = FineConfig(patch_size=(24, 24, 24), sigma_mm=3.0, jitter_fraction=0.2)
    aug = AugmentConfig(scale=0.15, rotate_deg=40.0, intensity=0.0)
    patches, heatmaps, geoms = fine_training_sample(
        prepared, ["a", "b"], plan, cfg, np.random.default_rng(seed), aug
    )
    assert patches.shape == heatmaps.shape == (2, 24, 24, 24)
    assert geoms[1] is None and np.isnan(heatmaps[1]).all()
    assert np.all(patches[1] == prepared.background)
    assert geoms[0] is not None
    assert not np.allclose(geoms[0].direction, np.eye(3))  # the grid was rotated
    hm_peak = np.unravel_index(np.argmax(heatmaps[0]), heatmaps[0].shape)
    img_peak = np.unravel_index(np.argmax(patches[0]), patches[0].shape)
    assert np.linalg.norm(np.subtract(hm_peak, img_peak)) <= 1.0
    assert heatmaps[0].max() > 0.5


def test_fine_jitter_sd_matches_fraction() -> None:
    plan = _plan(patch_size=(16, 16, 16))
    prepared = prepare_case(_blob_image(), _landmarks(), plan, "x")
    cfg = FineConfig(patch_size=(16, 16, 16), jitter_fraction=1 / 6)
    rng = np.random.default_rng(0)
    offsets = []
    for _ in range(150):
        _, _, geoms = fine_training_sample(prepared, ["a"], plan, cfg, rng)
        assert geoms[0] is not None
        offsets.append(geoms[0].center_world - A)
    sd = np.std(np.array(offsets), axis=0)
    expected = 16 * 2.0 / 6  # edge 32 mm / 6
    np.testing.assert_allclose(sd, expected, rtol=0.2)


# ----------------------------------------------------------------------- cache
def _dataset(tmp_path: Path) -> Dataset:
    img = tmp_path / "c1.nii.gz"
    sitk.WriteImage(_blob_image(), str(img))
    lm = tmp_path / "c1.json"
    write_landmarks(_landmarks(), lm)
    return Dataset(
        name="toy",
        root=tmp_path,
        landmark_names=["a", "b"],
        modality="CT",
        cases=[CaseSpec("c1", img, lm)],
    )


def test_case_cache_round_trip_and_invalidation(tmp_path: Path, monkeypatch) -> None:
    ds = _dataset(tmp_path)
    plan = _plan()
    cache = CaseCache(tmp_path / "cache", plan)
    first = cache.get(ds, "c1")
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 3 and any(f.endswith(".json") for f in files)
    assert not any(f.endswith((".pkl", ".pickle")) for f in files)

    def boom(*args: object) -> None:
        raise AssertionError("re-read the image although it was cached")

    monkeypatch.setattr(Dataset, "read_image", boom)
    second = CaseCache(tmp_path / "cache", plan).get(ds, "c1")
    v1, v2 = Volume.from_sitk(first.image), Volume.from_sitk(second.image)
    assert v1.geometry.is_close(v2.geometry)
    np.testing.assert_array_equal(v1.array, v2.array)
    np.testing.assert_array_equal(
        Volume.from_sitk(first.coarse_image).array, Volume.from_sitk(second.coarse_image).array
    )
    assert first.canonical_geometry.is_close(second.canonical_geometry)
    np.testing.assert_allclose(second.landmarks.coords, first.landmarks.coords)
    assert second.background == first.background
    monkeypatch.undo()

    # a different plan (fine spacing) is a different entry
    other = CaseCache(tmp_path / "cache", _plan(fine_spacing_mm=(3.0, 3.0, 3.0)))
    assert other.key(ds, "c1") != cache.key(ds, "c1")
    # a damaged entry is rebuilt
    meta = next((tmp_path / "cache").glob("*.json"))
    meta.write_text("{ broken")
    again = CaseCache(tmp_path / "cache", plan).get(ds, "c1")
    np.testing.assert_array_equal(Volume.from_sitk(again.image).array, v1.array)


def test_case_cache_memory(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    cache = CaseCache(tmp_path / "cache", _plan(), keep_in_memory=True)
    assert cache.get(ds, "c1") is cache.get(ds, "c1")


def test_coarse_source_is_anti_aliased() -> None:
    """White noise at 1 mm sampled on a ~4 mm coarse grid is low-passed, not aliased."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0.5, 0.2, (64, 64, 64)).astype(np.float32)
    image = Volume(noise, Geometry((64, 64, 64), (1.0, 1.0, 1.0), (0, 0, 0))).to_sitk()
    plan = _plan(coarse_grid=(16, 16, 16), fine_spacing_mm=(1.0, 1.0, 1.0))
    prepared = prepare_case(image, None, plan)
    img, _, _ = coarse_sample(prepared, plan)
    assert abs(float(img.mean()) - 0.5) < 0.02
    assert img.std() < 0.3 * noise.std()
    # the fine image itself is not smoothed
    assert Volume.from_sitk(prepared.image).array.std() > 0.9 * noise.std()
