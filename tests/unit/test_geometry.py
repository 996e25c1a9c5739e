"""Geometry against SimpleITK, and the resampling / grid operations of geometry.resample."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from landmark3d.geometry import Geometry, Volume
from landmark3d.geometry.resample import (
    canonical,
    crop_patch,
    grid_covering,
    patch_geometry,
    random_affine_geometry,
    resample,
    resample_to_spacing,
    rotation_matrix,
    spacing_geometry,
)

# ------------------------------------------------------------------------------- strategies
finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def directions(draw: st.DrawFn) -> np.ndarray:
    """Random oblique rotation x axis permutation x axis flips (orthonormal, det +-1)."""
    q = np.array(draw(st.lists(st.floats(-1, 1, **finite), min_size=4, max_size=4)))
    q[np.abs(q) < 1e-6] = 0.0  # ITK's SVD fails on subnormal direction entries
    if np.linalg.norm(q) < 1e-3:
        q = np.array([1.0, 0.0, 0.0, 0.0])
    w, x, y, z = q / np.linalg.norm(q)
    rot = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
    perm = np.eye(3)[list(draw(st.permutations([0, 1, 2])))]
    flips = np.diag([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    oblique = draw(st.booleans())
    return (rot if oblique else np.eye(3)) @ perm @ flips


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    size = tuple(draw(st.lists(st.integers(1, 300), min_size=3, max_size=3)))
    spacing = draw(st.lists(st.floats(0.05, 8.0, **finite), min_size=3, max_size=3))
    origin = draw(st.lists(st.floats(-800, 800, **finite), min_size=3, max_size=3))
    return Geometry(size, spacing, origin, draw(directions()))


def _sitk_image(geometry: Geometry) -> sitk.Image:
    return geometry.apply_to(sitk.Image([2, 2, 2], sitk.sitkUInt8))


def _blob_image(geometry: Geometry, center: np.ndarray, sigma_mm: float = 3.0) -> sitk.Image:
    """A float32 image holding a Gaussian blob at world ``center``."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.size], indexing="ij"), -1)
    world = geometry.index_to_world(idx)
    d2 = np.sum((world - center) ** 2, axis=-1)
    return Volume(np.exp(-d2 / (2 * sigma_mm**2)).astype(np.float32), geometry).to_sitk()


def _peak_index(array: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid (index order) of voxels above half the maximum."""
    w = np.where(array > 0.5 * array.max(), array, 0.0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij"), -1)
    return np.asarray((grid * w[..., None]).sum(axis=(0, 1, 2)) / w.sum())


OBLIQUE = rotation_matrix([1.0, 2.0, 0.5], np.deg2rad(25)) @ np.diag([1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------- Geometry vs ITK
@settings(max_examples=60, deadline=None)
@given(geometries(), st.lists(st.floats(-50, 350, **finite), min_size=3, max_size=3))
def test_index_to_world_matches_simpleitk(geometry: Geometry, index: list[float]) -> None:
    image = _sitk_image(geometry)
    expected = image.TransformContinuousIndexToPhysicalPoint(index)
    np.testing.assert_allclose(geometry.index_to_world(index), expected, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(geometries(), st.lists(st.floats(-1000, 1000, **finite), min_size=3, max_size=3))
def test_world_to_index_matches_simpleitk_and_round_trips(
    geometry: Geometry, point: list[float]
) -> None:
    image = _sitk_image(geometry)
    expected = image.TransformPhysicalPointToContinuousIndex(point)
    index = geometry.world_to_index(point)
    np.testing.assert_allclose(index, expected, atol=1e-6)
    assert np.max(np.abs(geometry.index_to_world(index) - point)) < 1e-4
    # batches keep their shape
    batch = geometry.world_to_index(np.tile(point, (2, 4, 1)))
    assert batch.shape == (2, 4, 3)
    np.testing.assert_allclose(batch[1, 3], index)


@settings(max_examples=30, deadline=None)
@given(geometries())
def test_from_sitk_apply_to_round_trip(geometry: Geometry) -> None:
    back = Geometry.from_sitk(_sitk_image(geometry))
    np.testing.assert_allclose(back.spacing, geometry.spacing)
    np.testing.assert_allclose(back.origin, geometry.origin)
    np.testing.assert_allclose(back.direction, geometry.direction)


# ------------------------------------------------------------------------------- canonical
@pytest.mark.parametrize("orientation", ["LPS", "RAS", "SAL"])
@pytest.mark.parametrize("oblique", [False, True])
def test_canonical_permutes_voxels_and_keeps_world_positions(orientation, oblique):
    perm = np.eye(3)[[2, 0, 1]] @ np.diag([-1.0, 1.0, -1.0])
    direction = (rotation_matrix([0.2, 1.0, 0.3], np.deg2rad(10)) if oblique else np.eye(3)) @ perm
    geom = Geometry((4, 5, 6), (0.7, 1.1, 2.5), (10.0, -20.0, 5.0), direction)
    values = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = Volume(values, geom).to_sitk()

    out = Volume.from_sitk(canonical(image, orientation))
    assert sorted(out.array.shape) == [4, 5, 6]
    assert sorted(out.geometry.spacing) == pytest.approx(sorted(geom.spacing))
    if not oblique:
        code = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(
            out.geometry.direction.ravel().tolist()
        )
        assert code == orientation
    # every output voxel centre is an input voxel centre holding the same value
    for ijk in itertools.product(*[range(n) for n in out.array.shape]):
        src = geom.world_to_index(out.geometry.index_to_world(ijk))
        assert np.max(np.abs(src - np.round(src))) < 1e-4
        assert out.array[ijk] == values[tuple(np.round(src).astype(int))]


def test_canonical_rejects_bad_orientation():
    image = sitk.Image([2, 2, 2], sitk.sitkFloat32)
    for bad in ["LLS", "LP", "XYZ"]:
        with pytest.raises(ValueError, match="one letter from each"):
            canonical(image, bad)


# ------------------------------------------------------------------------------- resample
def test_resample_onto_own_grid_is_identity_and_nearest_keeps_labels():
    geom = Geometry((6, 7, 8), (1.0, 2.0, 0.5), (3.0, 4.0, 5.0), OBLIQUE)
    labels = np.random.default_rng(0).integers(0, 5, size=geom.size).astype(np.uint8)
    image = Volume(labels, geom).to_sitk()
    same = resample(image, geom, "nearest")
    assert same.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(Volume.from_sitk(same, np.uint8).array, labels)
    # interpolating an integer image gives float32 (no truncation of 3.9999 to 3)
    linear = resample(image, geom, "linear")
    assert linear.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(Volume.from_sitk(linear).array, labels, atol=1e-4)
    # shift the grid by exactly one voxel along j: nearest gives shifted labels, default outside
    shifted = Geometry(geom.size, geom.spacing, geom.index_to_world([0, 1, 0]), geom.direction)
    out = Volume.from_sitk(resample(image, shifted, "nearest", default_value=9), np.uint8).array
    np.testing.assert_array_equal(out[:, :-1], labels[:, 1:])
    assert np.all(out[:, -1] == 9)
    assert resample(image, geom, "bspline").GetPixelID() == sitk.sitkFloat32
    assert resample(image, geom, "linear", pixel_type=sitk.sitkInt16).GetPixelID() == sitk.sitkInt16
    with pytest.raises(ValueError, match="unknown interpolator"):
        resample(image, geom, "cubic")


def test_resample_linear_is_exact_on_linear_ramp():
    geom = Geometry((10, 10, 10), (1.0, 1.5, 2.0), (0.0, 0.0, 0.0), OBLIQUE)
    idx = np.stack(np.meshgrid(*[np.arange(10)] * 3, indexing="ij"), -1)
    world = geom.index_to_world(idx)
    ramp = (world @ np.array([0.3, -0.2, 0.1])).astype(np.float64)
    image = Volume(ramp, geom).to_sitk()
    target = patch_geometry(geom.center_world, (5, 5, 5), 0.8, np.eye(3))
    out = Volume.from_sitk(resample(image, target), np.float64)
    t_idx = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1)
    expected = target.index_to_world(t_idx) @ np.array([0.3, -0.2, 0.1])
    np.testing.assert_allclose(out.array, expected, atol=1e-5)


# ------------------------------------------------------------------------------- grids
def test_patch_geometry_centre():
    for size in [(5, 5, 5), (4, 6, 3)]:
        g = patch_geometry([1.0, -2.0, 30.0], size, (0.5, 1.0, 2.0), OBLIQUE)
        centre = (np.asarray(size) - 1) / 2
        np.testing.assert_allclose(g.index_to_world(centre), [1.0, -2.0, 30.0], atol=1e-9)
        np.testing.assert_allclose(g.center_world, [1.0, -2.0, 30.0], atol=1e-9)
        assert g.size == size
    with pytest.raises(ValueError, match="positive"):
        patch_geometry([0, 0, 0], (3, 3, 3), 0.0)
    with pytest.raises(ValueError, match="size"):
        patch_geometry([0, 0, 0], (3, 0, 3), 1.0)


def test_grid_covering_keeps_extent_centre_and_direction():
    geom = Geometry((512, 400, 137), (0.8, 0.8, 2.5), (-200.0, -150.0, 30.0), OBLIQUE)
    coarse = grid_covering(geom, (96, 96, 72))
    assert coarse.size == (96, 96, 72)
    np.testing.assert_allclose(coarse.extent_mm, geom.extent_mm)
    np.testing.assert_allclose(coarse.center_world, geom.center_world, atol=1e-9)
    np.testing.assert_allclose(coarse.direction, geom.direction)
    # the outer voxel edges (index -0.5 and size - 0.5) coincide in world space
    for corner in [(-0.5, -0.5, -0.5), (1, 1, 1)]:
        c = np.asarray(corner, float)
        fine_edge = np.where(c < 0, -0.5, np.asarray(geom.size) - 0.5)
        coarse_edge = np.where(c < 0, -0.5, np.asarray(coarse.size) - 0.5)
        np.testing.assert_allclose(
            geom.index_to_world(fine_edge), coarse.index_to_world(coarse_edge), atol=1e-9
        )


def test_resample_to_spacing_covers_same_extent():
    geom = Geometry((50, 40, 13), (0.8, 0.8, 2.5), (5.0, 6.0, 7.0), OBLIQUE)
    image = Volume(np.ones(geom.size, np.float32), geom).to_sitk()
    out = Geometry.from_sitk(resample_to_spacing(image, 1.0))
    np.testing.assert_allclose(out.spacing, [1.0, 1.0, 1.0])
    assert out.size == (40, 32, 32)  # round(40 / 1), round(32 / 1), round(32.5 / 1)
    np.testing.assert_allclose(out.center_world, geom.center_world, atol=1e-9)
    assert np.all(np.abs(out.extent_mm - geom.extent_mm) <= out.spacing / 2 + 1e-9)
    assert spacing_geometry(geom, (100.0, 100.0, 100.0)).size == (1, 1, 1)


# ------------------------------------------------------------------------------- crop_patch
def test_crop_patch_places_blob_at_world_index_and_pads_outside():
    geom = Geometry((40, 36, 30), (1.0, 1.2, 1.5), (-10.0, 20.0, -5.0), OBLIQUE)
    point = geom.index_to_world([18.3, 15.6, 13.2])
    image = sitk.Cast(_blob_image(geom, point) * 100.0 - 50.0, sitk.sitkInt16)

    off_centre = point + np.array([3.0, -2.0, 1.5])
    patch = crop_patch(image, off_centre, (21, 21, 21), 1.0, direction=np.eye(3))
    assert patch.array.dtype == np.float32 and patch.array.shape == (21, 21, 21)
    np.testing.assert_allclose(patch.geometry.center_world, off_centre, atol=1e-9)
    expected = patch.geometry.world_to_index(point)
    assert np.linalg.norm(_peak_index(patch.array + 50.0) - expected) < 0.5

    # default direction is the image's; the patch centre is voxel (10, 10, 10)
    centred = crop_patch(image, point, (21, 21, 21), (1.0, 1.2, 1.5))
    np.testing.assert_allclose(centred.geometry.direction, geom.direction)
    assert np.linalg.norm(_peak_index(centred.array + 50.0) - 10.0) < 0.5

    # outside the image: padded with the image minimum, or with the given value
    corner = geom.index_to_world([0, 0, 0])
    padded = crop_patch(image, corner, (9, 9, 9), 1.0)
    minimum = float(sitk.GetArrayViewFromImage(image).min())
    assert padded.array[0, 0, 0] == minimum == -50.0
    inside = padded.geometry.contains_world(geom.index_to_world([0.5, 0.5, 0.5]))
    assert inside and padded.array[8, 8, 8] >= minimum
    assert crop_patch(image, corner, (9, 9, 9), 1.0, default_value=-7.0).array[0, 0, 0] == -7.0


# ------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_affine_geometry_moves_image_and_landmark_together(seed):
    base = Geometry((40, 40, 32), (1.0, 1.1, 1.4), (-20.0, 10.0, 40.0), OBLIQUE)
    point = base.index_to_world([21.4, 18.7, 15.2])
    image = _blob_image(base, point)
    new = random_affine_geometry(base, np.random.default_rng(seed), 0.05, 0.15, 20.0)
    assert new.size == base.size
    out = Volume.from_sitk(resample(image, new, "linear")).array
    expected = new.world_to_index(point)
    assert np.linalg.norm(_peak_index(out) - expected) < 0.5


def test_random_affine_geometry_bounds_and_determinism():
    base = Geometry((30, 20, 10), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), OBLIQUE)
    a = random_affine_geometry(base, np.random.default_rng(7), 0.1, 0.2, 15.0)
    b = random_affine_geometry(base, np.random.default_rng(7), 0.1, 0.2, 15.0)
    assert a.is_close(b, atol=0.0)
    for seed in range(20):
        g = random_affine_geometry(base, np.random.default_rng(seed), 0.1, 0.2, 15.0)
        ratio = g.spacing / base.spacing
        assert np.allclose(ratio, ratio[0]) and 0.8 <= ratio[0] <= 1.2
        rot = g.direction @ base.direction.T
        angle = np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))
        assert angle <= 15.0 + 1e-9
        assert np.allclose(g.direction.T @ g.direction, np.eye(3))
        shift = base.direction.T @ (g.center_world - base.center_world)
        assert np.all(np.abs(shift) <= 0.1 * base.extent_mm + 1e-9)
    still = random_affine_geometry(base, np.random.default_rng(3), 0.0, 0.0, 0.0)
    assert still.is_close(base, atol=1e-9)
    with pytest.raises(ValueError):
        random_affine_geometry(base, np.random.default_rng(0), 0.1, 1.5, 10.0)


def test_rotation_matrix_is_a_rotation():
    r = rotation_matrix([1.0, 1.0, 0.0], np.pi / 3)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(r @ np.array([1.0, 1.0, 0.0]), [1.0, 1.0, 0.0], atol=1e-12)
