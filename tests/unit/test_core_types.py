"""Tests of the core types: errors, atomic writes, LandmarkSet, Geometry/Volume basics."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.errors import ImageError, OutputExistsError
from landmark3d.geometry import Geometry, Volume
from landmark3d.io.atomic import atomic_path, atomic_write_text
from landmark3d.io.landmark_set import LandmarkSet, lps_to_ras, ras_to_lps


def test_error_message_names_file_line_and_fix(tmp_path):
    err = ImageError("voxels are NaN.", path=tmp_path / "a.nii", line=3, fix="clean it.")
    assert str(err) == f"{tmp_path / 'a.nii'}:3: voxels are NaN. Fix: clean it."


def test_atomic_write_refuses_existing_without_overwrite(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "one")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        atomic_write_text(target, "two", overwrite=False)
    assert target.read_text() == "one"
    atomic_write_text(target, "two", overwrite=True)
    assert target.read_text() == "two"


def test_atomic_path_leaves_destination_untouched_on_crash(tmp_path):
    target = tmp_path / "pred.fcsv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.fcsv"]


def test_atomic_path_keeps_double_suffix(tmp_path):
    with atomic_path(tmp_path / "img.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "img.nii.gz").read_bytes() == b"x"


def test_landmark_set_missing_is_explicit():
    ls = LandmarkSet.from_dict({"a": (1, 2, 3), "b": None})
    assert ls.get("b") is None and ls.is_missing("b")
    assert ls.missing_reason["b"] == "missing"
    assert ls.present.tolist() == [True, False]
    np.testing.assert_array_equal(ls.get("a"), [1, 2, 3])
    with pytest.raises(KeyError, match="known: a, b"):
        ls.get("c")


def test_landmark_set_subset_and_partial_nan_rows():
    ls = LandmarkSet(["a", "b"], np.array([[1.0, np.nan, 0.0], [4.0, 5.0, 6.0]]))
    assert ls.is_missing("a")  # a partly-NaN row is wholly missing
    sub = ls.subset(["b", "z"])
    assert sub.names == ["b", "z"]
    assert sub.missing_reason["z"] == "not annotated"
    with pytest.raises(ValueError, match="duplicate"):
        LandmarkSet(["a", "a"], np.zeros((2, 3)))


def test_lps_ras_flip_is_involution():
    p = np.array([[1.0, -2.0, 3.0]])
    np.testing.assert_array_equal(lps_to_ras(p), [[-1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(ras_to_lps(lps_to_ras(p)), p)


def test_geometry_matches_simpleitk_on_oblique_image():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    img = sitk.Image(7, 5, 4, sitk.sitkFloat32)
    img.SetSpacing((0.8, 1.1, 2.5))
    img.SetOrigin((10.0, -20.0, 5.0))
    img.SetDirection(tuple(q.ravel()))
    geo = Geometry.from_sitk(img)
    idx = np.array([1.25, 3.5, 2.75])
    world = geo.index_to_world(idx)
    np.testing.assert_allclose(
        world, img.TransformContinuousIndexToPhysicalPoint(idx.tolist()), atol=1e-9
    )
    np.testing.assert_allclose(geo.world_to_index(world), idx, atol=1e-9)
    assert Geometry.from_dict(geo.to_dict()).is_close(geo)


def test_volume_uses_index_order():
    arr = np.zeros((4, 3, 2), np.float32)
    arr[3, 1, 0] = 7.0
    vol = Volume(arr, Geometry((4, 3, 2), np.ones(3), np.zeros(3)))
    img = vol.to_sitk()
    assert img.GetSize() == (4, 3, 2)
    assert img.GetPixel(3, 1, 0) == 7.0
    back = Volume.from_sitk(img)
    np.testing.assert_array_equal(back.array, arr)
