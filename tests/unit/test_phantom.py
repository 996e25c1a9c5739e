"""Tests of the synthetic phantom dataset (landmark3d.data.phantom)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.data.phantom import (
    GROUP_ANCHOR,
    PHANTOM_LANDMARKS,
    PLANTED_GROUP,
    PhantomCase,
    anatomical_intensity,
    anatomical_landmarks,
    generate_phantom,
    render_case,
    ridge_point,
    sample_case,
)
from landmark3d.errors import OutputExistsError
from landmark3d.geometry.resample import canonical
from landmark3d.geometry.space import Geometry, Volume
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import read_landmarks

N_CASES, SIZE, SEED = 4, 48, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    spec_path = generate_phantom(
        tmp_path_factory.mktemp("ph") / "phantom", n_cases=N_CASES, seed=SEED, size=SIZE
    )
    return spec_path.parent, json.loads(spec_path.read_text())


def _volume(root: Path, rel: str) -> Volume:
    return Volume.from_sitk(sitk.ReadImage(str(root / rel)))


def _sample(vol: Volume, world: np.ndarray) -> np.ndarray:
    """Trilinear sampling of ``vol`` at world points (..., 3); outside -> edge values."""
    idx = vol.geometry.world_to_index(world)
    hi = np.asarray(vol.geometry.size) - 1
    idx = np.clip(idx, 0, hi)
    i0 = np.minimum(np.floor(idx).astype(int), np.maximum(hi - 1, 0))
    f = idx - i0
    out = np.zeros(idx.shape[:-1])
    for corner in np.ndindex(2, 2, 2):
        c = np.asarray(corner)
        w = np.prod(np.where(c == 1, f, 1 - f), axis=-1)
        ii = i0 + c
        out += w * vol.array[ii[..., 0], ii[..., 1], ii[..., 2]]
    return out


def _anat_to_world(case: PhantomCase, pts: np.ndarray) -> np.ndarray:
    a = case.anatomical_to_world
    return pts @ a[:3, :3].T + a[:3, 3]


def _grid(center: np.ndarray, half_mm: float = 7.5, step: float = 1.5) -> np.ndarray:
    r = np.arange(-half_mm, half_mm + 1e-9, step)
    g = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1)
    return g + center


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ------------------------------------------------------------------------------ layout
def test_spec_is_consistent_and_files_exist(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, spec = dataset
    assert spec["name"] == "phantom" and spec["modality"] == "CT"
    assert spec["coordinate_system"] == "LPS"
    assert spec["landmarks"] == list(PHANTOM_LANDMARKS)
    assert spec["correlated_groups"] == []
    ids = [c["id"] for c in spec["cases"]]
    assert ids == [f"case{i:03d}" for i in range(N_CASES)]
    for c in spec["cases"]:
        assert c["image"] == f"images/{c['id']}.nii.gz"
        assert c["landmarks"] == f"landmarks/{c['id']}.fcsv"
        assert (root / c["image"]).is_file() and (root / c["landmarks"]).is_file()
    assert len(spec["folds"]) == 3
    assert sorted(i for fold in spec["folds"] for i in fold) == ids
    assert all(fold for fold in spec["folds"])
    gen = spec["generator"]
    assert gen["tool"] == "landmark3d phantom" and gen["seed"] == SEED
    assert gen["cases"] == N_CASES and isinstance(gen["version"], str)
    group = gen["planted_correlated_group"]
    assert group["landmarks"] == list(PLANTED_GROUP) == ["chin", "occ_bone"]
    assert group["anchor"] == GROUP_ANCHOR == "chin"
    assert group["axis"] == "i" and group["axis_name"] == "L-R"
    assert set(gen["anatomical_to_world"]) == set(ids)
    # nothing else (temporary directories) left beside the dataset
    assert [p.name for p in root.parent.iterdir()] == ["phantom"]


def test_files_match_the_cases(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, spec = dataset
    systems = set()
    for index, c in enumerate(spec["cases"]):
        case = sample_case(SEED, index, SIZE)
        vol = _volume(root, c["image"])
        assert vol.geometry.is_close(case.geometry, atol=1e-5)
        assert np.array_equal(vol.array, render_case(case, SEED).array)
        lms = read_landmarks(root / c["landmarks"])
        assert lms.names == list(PHANTOM_LANDMARKS)
        np.testing.assert_allclose(lms.coords, case.landmarks().coords, atol=1e-9)
        frame = np.asarray(spec["generator"]["anatomical_to_world"][c["id"]])
        np.testing.assert_allclose(frame, case.anatomical_to_world, atol=1e-12)
        systems.add((root / c["landmarks"]).read_text().splitlines()[1].split("=")[1].strip())
    assert systems == {"LPS", "RAS"}


def test_determinism_and_case_independence(tmp_path: Path) -> None:
    a = generate_phantom(tmp_path / "a", n_cases=2, seed=11, size=32).parent
    b = generate_phantom(tmp_path / "b", n_cases=2, seed=11, size=32).parent
    c = generate_phantom(tmp_path / "c", n_cases=1, seed=12, size=32).parent
    d = generate_phantom(tmp_path / "d", n_cases=1, seed=11, size=32).parent
    for cid in ("case000", "case001"):
        fa, fb = a / "landmarks" / f"{cid}.fcsv", b / "landmarks" / f"{cid}.fcsv"
        assert fa.read_bytes() == fb.read_bytes()
        va, vb = _volume(a, f"images/{cid}.nii.gz"), _volume(b, f"images/{cid}.nii.gz")
        assert np.array_equal(va.array, vb.array) and va.geometry.is_close(vb.geometry, 0)
    assert (a / "dataset.json").read_bytes() == (b / "dataset.json").read_bytes()
    # another seed gives other data; fewer cases give the same first case
    assert (a / "landmarks/case000.fcsv").read_bytes() != (
        c / "landmarks/case000.fcsv"
    ).read_bytes()
    assert (a / "landmarks/case000.fcsv").read_bytes() == (
        d / "landmarks/case000.fcsv"
    ).read_bytes()


def test_refuses_non_empty_output_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    generate_phantom(out, n_cases=1, size=24)  # an empty directory is fine
    with pytest.raises(OutputExistsError) as err:
        generate_phantom(out, n_cases=1, size=24)
    assert "overwrite" in str(err.value)
    (out / "stale.txt").write_text("old")
    generate_phantom(out, n_cases=2, size=24, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert len(json.loads((out / "dataset.json").read_text())["cases"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_failure_leaves_nothing_half_written(tmp_path: Path) -> None:
    seen: list[int] = []

    def progress(done: int) -> None:
        seen.append(done)
        if done == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        generate_phantom(tmp_path / "ds", n_cases=3, size=24, progress=progress)
    assert seen == [1, 2]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ content
def test_every_landmark_is_inside_its_image(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, spec = dataset
    for c in spec["cases"]:
        geo = Geometry.from_sitk(sitk.ReadImage(str(root / c["image"])))
        lms = read_landmarks(root / c["landmarks"])
        idx = geo.world_to_index(lms.coords)
        assert np.all(idx >= 1.0) and np.all(idx <= np.asarray(geo.size) - 2.0), c["id"]


def test_image_matches_the_analytic_head(dataset: tuple[Path, dict[str, Any]]) -> None:
    """Voxel values follow the analytic phantom at each voxel's world position."""
    root, spec = dataset
    for index, c in enumerate(spec["cases"]):
        case = sample_case(SEED, index, SIZE)
        vol = _volume(root, c["image"])
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol.geometry.size], indexing="ij"), -1)
        world = vol.geometry.index_to_world(idx)
        inv = np.linalg.inv(case.anatomical_to_world)
        anat = world @ inv[:3, :3].T + inv[:3, 3]
        right = _corr(anatomical_intensity(anat, case.anatomy, case.edge_mm), vol.array)
        assert right > 0.95, c["id"]
        for axis in range(3):  # the head displaced by 4 mm matches clearly worse
            shifted = anat + np.eye(3)[axis] * 4.0
            wrong = _corr(anatomical_intensity(shifted, case.anatomy, case.edge_mm), vol.array)
            assert 1.0 - wrong > 3.0 * (1.0 - right), (c["id"], axis, right, wrong)


def test_truth_sits_on_its_structure() -> None:
    """Noise-free model: each landmark is on the structure it names."""
    for index in range(6):
        case = sample_case(5, index)
        p, lm = case.anatomy, case.landmarks_anatomical

        def hu(pt: np.ndarray, case: PhantomCase = case) -> float:
            return float(anatomical_intensity(pt, case.anatomy, case.edge_mm))

        for name in ("nasion", "chin", "occ_bone"):
            assert hu(lm[name]) > 500, name
        for name, side in (("ear_l", 1.0), ("ear_r", -1.0)):
            assert hu(lm[name]) < -900  # inside the air canal ...
            assert hu(lm[name] + (-side * 6.0, 0, 0)) > p["hu_bone"]  # ... ending in dense bone
            assert hu(lm[name] + (side * 4.0, 0, 0)) < -900
            assert hu(lm[name] + (0, 0, p["canal_r"] + 2.0)) > 500  # canal wall
        tip = lm["odont_proc"]
        up = np.array([0.0, 0.0, 1.0])
        assert hu(tip - 2.5 * up) > 500 and hu(tip + 2.0 * up) < 200


def test_truth_matches_the_image() -> None:
    """In the rendered image (noise, bias, pose, storage), each landmark is on its structure."""
    for index in range(5):
        case = sample_case(SEED, index)
        vol = render_case(case, SEED)
        lms, lm = case.landmarks(), case.landmarks_anatomical
        thick = vol.geometry.spacing.max() > 2.5
        for name, side in (("ear_l", 1.0), ("ear_r", -1.0)):
            lateral = _sample(vol, _anat_to_world(case, lm[name] + (side * 5.0, 0, 0)))
            medial = _sample(vol, _anat_to_world(case, lm[name] + (-side * 6.0, 0, 0)))
            assert medial - lateral > 900, (case.case_id, name)
            if not thick:
                assert lateral < -600 and medial > 600, (case.case_id, name)
        for name in ("nasion", "chin", "occ_bone"):
            assert _sample(vol, _at(lms, name)) > 250, (case.case_id, name)


def test_symmetric_pair_looks_alike_when_mirrored() -> None:
    grid = _grid(np.zeros(3))
    mirrored = grid * (-1.0, 1.0, 1.0)
    for index in range(8):  # noise-free model: identical up to the mirror
        case = sample_case(1, index)
        lm = case.landmarks_anatomical
        left = anatomical_intensity(grid + lm["ear_l"], case.anatomy, case.edge_mm)
        right_m = anatomical_intensity(mirrored + lm["ear_r"], case.anatomy, case.edge_mm)
        assert _corr(left, right_m) > 0.99
    for index in (0, 2, 5):  # isotropic images: alike through noise, bias and pose
        case = sample_case(1, index)
        assert case.geometry.spacing.max() < 1.2 * case.geometry.spacing.min()
        vol = render_case(case, 1)
        lm = case.landmarks_anatomical
        left = _sample(vol, _anat_to_world(case, grid + lm["ear_l"]))
        right_m = _sample(vol, _anat_to_world(case, mirrored + lm["ear_r"]))
        right = _sample(vol, _anat_to_world(case, grid + lm["ear_r"]))
        assert _corr(left, right_m) > 0.8
        assert _corr(left, right) < _corr(left, right_m) - 0.3  # not trivially alike


def _at(lms: LandmarkSet, name: str) -> np.ndarray:
    point = lms.get(name)
    assert point is not None, name
    return point


def _midline(case: PhantomCase) -> dict[str, np.ndarray]:
    """The structure points before annotation on the key slice (occ_bone on the midline)."""
    return anatomical_landmarks({**case.anatomy, "occ_phi": 0.0})


def test_group_shares_one_key_slice_of_the_canonical_image(
    dataset: tuple[Path, dict[str, Any]],
) -> None:
    """The written truth: chin and occ_bone on one slice of the LPS-reoriented image."""
    root, spec = dataset
    axis = "ijk".index(spec["generator"]["planted_correlated_group"]["axis"])
    for c in spec["cases"]:
        geo = Geometry.from_sitk(canonical(sitk.ReadImage(str(root / c["image"]))))
        lms = read_landmarks(root / c["landmarks"])
        idx = {n: geo.world_to_index(_at(lms, n)) for n in PHANTOM_LANDMARKS}
        key = idx[GROUP_ANCHOR][axis]
        for name in PLANTED_GROUP:
            assert abs(idx[name][axis] - key) < 1e-3, (c["id"], name)
        # the canonical axis is the one nearest the case's anatomical left-right direction
        frame = np.asarray(spec["generator"]["anatomical_to_world"][c["id"]])[:3, :3]
        lr = frame[:, 0] / np.linalg.norm(frame[:, 0])
        assert int(np.argmax(np.abs(geo.direction.T @ lr))) == axis


def test_group_members_stay_on_their_structures() -> None:
    slides = []
    for seed in range(3):
        for index in range(8):
            case = sample_case(seed, index)
            p, lm, mid = case.anatomy, case.landmarks_anatomical, _midline(case)
            world = case.landmarks()
            assert case.key_axis == 0
            # on the key slice: same coordinate along the key normal (world mm)
            offset = case.key_normal @ (_at(world, "occ_bone") - _at(world, GROUP_ANCHOR))
            assert abs(offset) < 1e-9
            # chin (the anchor) and the independent landmarks are their structure points
            for name in set(PHANTOM_LANDMARKS) - {"occ_bone"}:
                np.testing.assert_allclose(lm[name], mid[name], atol=1e-12)
            # occ_bone is exactly on the ridge centre line, within the ridge, on bone
            occ = lm["occ_bone"]
            np.testing.assert_allclose(occ, ridge_point(p, p["occ_phi"]), atol=1e-12)
            r = (occ[0] / p["a"]) ** 2 + (occ[1] / p["b"]) ** 2 + (occ[2] / p["c"]) ** 2
            assert abs(r - 1.0) < 1e-9 and occ[1] > 0
            assert -p["ridge_l1"] + p["ridge_r"] + 2.9 < occ[0] < p["ridge_l2"] - p["ridge_r"] - 2.9
            assert float(anatomical_intensity(occ, p, case.edge_mm)) > 500
            slides.append(float(np.linalg.norm(occ - mid["occ_bone"])))
            # nasion stays on the mid-sagittal plane, independent of the key slice
            assert abs(lm["nasion"][0]) < 1e-9 and abs(lm["chin"][0]) < 1e-9
            for name in ("ear_l", "ear_r", "odont_proc"):
                assert abs(lm[name][0]) > 3.0
    # the pose really tilts the key slice: occ_bone leaves the midline, by up to tens of mm
    assert np.median(slides) > 2.0 and 15.0 < max(slides) < 45.0


def test_nasion_is_not_on_the_key_slice() -> None:
    offsets = []
    for index in range(16):
        case = sample_case(0, index)
        world = case.landmarks()
        offsets.append(abs(case.key_normal @ (_at(world, "nasion") - _at(world, GROUP_ANCHOR))))
    assert np.mean(np.array(offsets) > 2.0) > 0.5


def test_occ_bone_is_ambiguous_along_its_ridge() -> None:
    for seed, index in ((2, 0), (2, 2), (2, 3), (2, 5), (0, 4)):  # near and far from the midline
        case = sample_case(seed, index)
        p = case.anatomy

        def patch(center: np.ndarray, case: PhantomCase = case) -> np.ndarray:
            return anatomical_intensity(_grid(center), case.anatomy, case.edge_mm)

        occ, phi = case.landmarks_anatomical["occ_bone"], p["occ_phi"]
        ref = patch(occ)
        ra, rb = ridge_point(p, np.pi / 2)[0], ridge_point(p, 0.0)[1]
        outward = np.array([np.sin(phi) / ra, np.cos(phi) / rb, 0.0])
        outward /= np.linalg.norm(outward)
        speed = float(np.hypot(ra * np.cos(phi), rb * np.sin(phi)))  # mm per radian
        for shift in (-6.0, 6.0):
            along = _corr(ref, patch(ridge_point(p, phi + shift / speed)))
            assert along > 0.95, (seed, index)
            assert _corr(ref, patch(occ + shift * outward)) < 0.7
            assert _corr(ref, patch(occ + np.array([0.0, 0.0, shift]))) < along - 0.1
    for index in range(4):  # well-defined along x, for contrast (at the structure points)
        case = sample_case(2, index)
        lm = case.landmarks_anatomical
        for name in ("nasion", "ear_l", "odont_proc"):
            shifted = anatomical_intensity(
                _grid(lm[name] + (6.0, 0, 0)), case.anatomy, case.edge_mm
            )
            assert (
                _corr(anatomical_intensity(_grid(lm[name]), case.anatomy, case.edge_mm), shifted)
                < 0.85
            )


# ------------------------------------------------------------------------------ variety
def test_cases_vary_in_anatomy_geometry_and_storage() -> None:
    cases = [sample_case(0, i) for i in range(16)]
    anat = np.stack([[c.landmarks_anatomical[n] for n in PHANTOM_LANDMARKS] for c in cases])
    assert np.all(anat.std(axis=0)[:, 1:] > 1.0)  # shape varies, not only the pose
    aniso = [c for c in cases if c.geometry.spacing.max() / c.geometry.spacing.min() > 1.5]
    assert aniso and len(aniso) < len(cases)

    def axis_aligned(d: np.ndarray) -> bool:
        return bool(np.allclose(np.abs(d).max(axis=0), 1.0))

    oblique = [c for c in cases if not axis_aligned(c.geometry.direction)]
    flipped = [
        c for c in cases
        if axis_aligned(c.geometry.direction) and not np.allclose(c.geometry.direction, np.eye(3))
    ]  # fmt: skip
    assert 2 <= len(oblique) <= 6 and len(flipped) >= 3
    assert {np.sign(np.linalg.det(c.geometry.direction)) for c in flipped} == {-1.0, 1.0}
    angles = [np.degrees(np.arccos((np.trace(c.geometry.direction) - 1) / 2)) for c in oblique]
    assert max(angles) <= 20.0 + 1e-6
    sizes = np.array([c.geometry.size for c in cases])
    assert sizes.max(axis=1).min() >= 80 and sizes.max() <= 110
    assert {c.landmark_coords for c in cases} == {"LPS", "RAS"}
    # the small dataset of the other tests has an anisotropic oblique case
    small = sample_case(SEED, 1, SIZE)
    assert small.geometry.spacing[2] / small.geometry.spacing[0] > 2.0
    assert not axis_aligned(small.geometry.direction)


def test_generation_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    generate_phantom(tmp_path / "ds", n_cases=3, size=64)
    assert time.perf_counter() - start < 15.0
