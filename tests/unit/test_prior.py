"""Tests of annotation-prior discovery (landmark3d.prior)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.data.dataset import load_dataset
from landmark3d.data.phantom import CANONICAL_AXIS_NAMES, PLANTED_GROUP, generate_phantom
from landmark3d.errors import ConfigError, DatasetError
from landmark3d.geometry.space import Geometry
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import write_landmarks
from landmark3d.prior import (
    AXIS_NAMES,
    CorrelatedGroup,
    _maximal_cliques,
    apply_groups_to_spec,
    canonical_geometry,
    discover_groups,
    read_geometry,
)

N_CASES, SIZE, SEED = 8, 48, 0
Modify = Callable[[int, LandmarkSet, Geometry], LandmarkSet]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prior") / "phantom"
    return generate_phantom(root, n_cases=N_CASES, seed=SEED, size=SIZE)


def _variant(spec_path: Path, out: Path, modify: Modify, names: list[str] | None = None) -> Path:
    """A copy of the phantom spec (same images) whose landmarks ``modify`` rewrote (.json, LPS)."""
    ds = load_dataset(spec_path)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(spec_path.read_text())
    spec.pop("generator")
    spec["landmarks"] = names or ds.landmark_names
    for n, entry in enumerate(spec["cases"]):
        geo = canonical_geometry(read_geometry(ds, entry["id"]))
        new = modify(n, ds.read_landmarks(entry["id"]), geo)
        write_landmarks(new, out / f"{entry['id']}.json")
        entry["image"] = str(ds.case(entry["id"]).image)
        entry["landmarks"] = f"{entry['id']}.json"
    (out / "dataset.json").write_text(json.dumps(spec, indent=2))
    return out / "dataset.json"


def _moved(ls: LandmarkSet, name: str, offset_world: np.ndarray) -> LandmarkSet:
    coords = ls.coords.copy()
    coords[ls.index(name)] += offset_world
    return LandmarkSet(list(ls.names), coords)


def _summary(groups: list[CorrelatedGroup]) -> list[tuple[list[str], str]]:
    return [(g.landmarks, g.axis) for g in groups]


# ---------------------------------------------------------------------------- geometry
def test_canonical_geometry_matches_dicomorient(phantom: Path) -> None:
    ds = load_dataset(phantom)
    seen = set()
    for cid in ds.case_ids:
        image = sitk.ReadImage(str(ds.case(cid).image))
        expected = Geometry.from_sitk(sitk.DICOMOrient(image, "LPS"))
        got = canonical_geometry(read_geometry(ds, cid))
        assert got.is_close(expected, atol=1e-4), cid
        seen.add(tuple(np.round(Geometry.from_sitk(image).direction.ravel(), 3)))
    assert len(seen) >= 4  # identity, flips, permutation and oblique storages were covered
    # a permuted and flipped grid, built by hand
    geo = Geometry(
        (5, 7, 9),
        np.array([1.0, 2.0, 3.0]),
        np.array([10.0, -4.0, 2.0]),
        np.array([[0.0, 0, -1], [-1, 0, 0], [0, 1, 0]]),
    )
    img = geo.apply_to(sitk.Image(5, 7, 9, sitk.sitkUInt8))
    assert canonical_geometry(geo).is_close(Geometry.from_sitk(sitk.DICOMOrient(img, "LPS")))
    # i points A, j S, k R: canonical i (L) is stored k, j (P) is stored i, k (S) is stored j
    assert canonical_geometry(geo).size == (9, 5, 7)
    np.testing.assert_allclose(canonical_geometry(geo).spacing, (3.0, 1.0, 2.0))


def test_header_only_reading(phantom: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery never loads voxels of image files."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("voxels were read")

    monkeypatch.setattr(sitk, "ReadImage", refuse)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", refuse)
    assert _summary(discover_groups(phantom)) == [(list(PLANTED_GROUP), "i")]


# ---------------------------------------------------------------------------- discovery
def test_finds_exactly_the_planted_group(phantom: Path) -> None:
    groups = discover_groups(load_dataset(phantom))
    assert len(groups) == 1
    g = groups[0]
    planted = json.loads(phantom.read_text())["generator"]["planted_correlated_group"]
    assert g.landmarks == planted["landmarks"] == ["chin", "occ_bone"]
    assert g.axis == planted["axis"] == "i" and g.axis_index == 0
    assert g.axis_name == planted["axis_name"] == "L-R"
    assert g.fraction == 1.0 and g.n_cases == N_CASES and not g.coincident
    assert g.spread_mm < 1e-3 and g.max_spread_mm >= g.spread_mm
    assert AXIS_NAMES == CANONICAL_AXIS_NAMES
    # a subset of the cases (e.g. a training fold) finds it too
    train = load_dataset(phantom).split(0)[0]
    sub = discover_groups(phantom, case_ids=train)
    assert _summary(sub) == [(["chin", "occ_bone"], "i")] and sub[0].n_cases == len(train)


def test_no_group_when_the_member_is_off_slice(phantom: Path, tmp_path: Path) -> None:
    def off(n: int, ls: LandmarkSet, geo: Geometry) -> LandmarkSet:
        shift = (3.0 + n % 3) * (1 if n % 2 else -1)  # 3..5 mm along the key axis
        return _moved(ls, "occ_bone", shift * geo.direction[:, 0])

    spec = _variant(phantom, tmp_path / "off", off)
    assert discover_groups(spec) == []


def test_no_group_in_random_landmarks(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    names = [f"p{m}" for m in range(6)]
    cases = []
    for n in range(10):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        geo = Geometry((20, 24, 16), rng.uniform(0.8, 2.5, 3), rng.normal(0, 20, 3), q)
        img = geo.apply_to(sitk.Image(20, 24, 16, sitk.sitkInt16))
        sitk.WriteImage(img, str(tmp_path / f"c{n}.nii.gz"))
        pts = geo.index_to_world(rng.uniform(1, 14, size=(6, 3)))
        write_landmarks(LandmarkSet(names, pts), tmp_path / f"c{n}.json")
        cases.append({"id": f"c{n}", "image": f"c{n}.nii.gz", "landmarks": f"c{n}.json"})
    spec = {"name": "rand", "modality": "MR", "landmarks": names, "cases": cases}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    assert discover_groups(tmp_path) == []
    # everything agrees within the whole image: every axis joins all six, once each
    loose = discover_groups(tmp_path, tolerance_vox=100.0)
    assert [(len(g.landmarks), g.axis, g.coincident) for g in loose] == [(6, "i", True)]


def test_tolerance_and_fraction(phantom: Path, tmp_path: Path) -> None:
    def near(n: int, ls: LandmarkSet, geo: Geometry) -> LandmarkSet:  # 0.35 voxel off
        return _moved(ls, "occ_bone", 0.35 * geo.spacing[0] * geo.direction[:, 0])

    spec = _variant(phantom, tmp_path / "near", near)
    assert _summary(discover_groups(spec, tolerance_vox=0.5)) == [(["chin", "occ_bone"], "i")]
    assert discover_groups(spec, tolerance_vox=0.3) == []
    g = discover_groups(spec)[0]
    assert g.spread_mm > 0.3 and g.fraction == 1.0  # a 0.35-voxel spread, >= 0.9 mm

    def some(n: int, ls: LandmarkSet, geo: Geometry) -> LandmarkSet:  # 2 of 8 cases off
        return _moved(ls, "occ_bone", (6.0 if n in (1, 4) else 0.0) * geo.direction[:, 0])

    spec = _variant(phantom, tmp_path / "some", some)
    assert discover_groups(spec, min_fraction=0.9) == []
    found = discover_groups(spec, min_fraction=0.7)
    assert _summary(found) == [(["chin", "occ_bone"], "i")]
    assert found[0].fraction == pytest.approx(0.75) and found[0].max_spread_mm > 5.0


def test_missing_landmarks_are_left_out(phantom: Path, tmp_path: Path) -> None:
    def drop(n: int, ls: LandmarkSet, geo: Geometry) -> LandmarkSet:
        if n >= 3:
            return ls
        coords = ls.coords.copy()
        coords[ls.index("occ_bone")] = np.nan
        return LandmarkSet(list(ls.names), coords, {"occ_bone": "not visible"})

    spec = _variant(phantom, tmp_path / "drop", drop)
    (g,) = discover_groups(spec)
    assert g.landmarks == ["chin", "occ_bone"] and g.n_cases == N_CASES - 3
    assert discover_groups(spec, min_cases=N_CASES - 2) == []


def test_duplicates_are_reported_once(phantom: Path, tmp_path: Path) -> None:
    names = [*load_dataset(phantom).landmark_names, "chin_copy"]

    def dup(n: int, ls: LandmarkSet, geo: Geometry) -> LandmarkSet:
        chin = ls.get("chin")
        assert chin is not None
        return LandmarkSet(names, np.vstack([ls.coords, chin]))

    groups = discover_groups(_variant(phantom, tmp_path / "dup", dup, names))
    assert [(g.landmarks, g.axis, g.coincident) for g in groups] == [
        (["chin", "occ_bone", "chin_copy"], "i", False),
        (["chin", "chin_copy"], "j", True),
    ]


def test_bad_parameters_and_unannotated_data(phantom: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tolerance"):
        discover_groups(phantom, tolerance_vox=-1)
    with pytest.raises(ConfigError, match="min_fraction"):
        discover_groups(phantom, min_fraction=0.0)
    spec = json.loads(phantom.read_text())
    for c in spec["cases"]:
        c["image"] = str(phantom.parent / c["image"])
        c["landmarks"] = None
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match="annotations"):
        discover_groups(tmp_path)


def test_maximal_cliques() -> None:
    # 0-1-2 triangle, 2-3 edge, 4 alone
    adj = [{1, 2}, {0, 2}, {0, 1, 3}, {2}, set()]
    assert _maximal_cliques(adj) == [[0, 1, 2], [2, 3], [4]]


# ---------------------------------------------------------------------------- spec
def test_apply_groups_to_spec(phantom: Path, tmp_path: Path) -> None:
    spec_path = tmp_path / "dataset.json"
    spec_path.write_text(phantom.read_text())
    groups = discover_groups(phantom)
    before = json.loads(spec_path.read_text())
    assert apply_groups_to_spec(tmp_path, groups) == spec_path
    after = json.loads(spec_path.read_text())
    assert list(after) == list(before)  # key order kept
    assert {k: v for k, v in after.items() if k != "correlated_groups"} == {
        k: v for k, v in before.items() if k != "correlated_groups"
    }
    (entry,) = after["correlated_groups"]
    assert entry["landmarks"] == ["chin", "occ_bone"] and entry["axis"] == "i"
    assert entry["axis_name"] == "L-R" and entry["fraction"] == 1.0
    assert set(entry) >= {"landmarks", "axis", "axis_name", "fraction", "spread_mm"}
    assert CorrelatedGroup.from_dict(entry).landmarks == groups[0].landmarks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json"]  # no temporaries
    # the dataset loader accepts the result (image paths are relative to the phantom)
    (phantom.parent / "with_groups.json").write_text(spec_path.read_text())
    ds = load_dataset(phantom.parent / "with_groups.json")
    assert ds.correlated_groups[0]["landmarks"] == ["chin", "occ_bone"]
    (phantom.parent / "with_groups.json").unlink()
    # unknown landmark names are refused, and the spec is left as it was
    bad = CorrelatedGroup(["chin", "ocb_bone"], "i", "L-R", 1.0, 0.0, 0.0, 3)
    with pytest.raises(DatasetError, match="occ_bone"):
        apply_groups_to_spec(spec_path, [bad])
    assert json.loads(spec_path.read_text()) == after
    with pytest.raises(DatasetError):
        apply_groups_to_spec(tmp_path / "missing.json", groups)


def test_prior_write_warns_when_the_groups_saw_every_fold(
    phantom: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    """`prior --write` without --fold learns from the test folds too; stored groups are used
    by every fold, so the command says so. With --fold it learns from training cases only."""
    import shutil

    for fold, warned in ((None, True), (0, False)):
        root = tmp_path / f"copy{fold}"
        shutil.copytree(phantom.parent, root)
        args = ["prior", root / "dataset.json", "--write"]
        r = cli(*args) if fold is None else cli(*args, "--fold", str(fold))
        assert r.code == 0, r.err
        assert "wrote 1 group(s)" in r.out
        assert ("the test annotations took part" in " ".join(r.err.split())) == warned
        assert json.loads((root / "dataset.json").read_text())["correlated_groups"]
