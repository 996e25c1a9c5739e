"""Image reading/writing: round trips keeping geometry, DICOM series, and every bad input."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.errors import ImageError, OutputExistsError
from landmark3d.geometry import Geometry, Volume
from landmark3d.geometry.resample import rotation_matrix
from landmark3d.io.images import (
    IMAGE_SUFFIXES,
    image_problems,
    image_suffix,
    is_image_path,
    read_image,
    read_volume,
    validate_image,
    write_image,
)

OBLIQUE = rotation_matrix([0.3, -1.0, 0.4], np.deg2rad(17)) @ np.diag([1.0, -1.0, 1.0])
GEOM = Geometry((7, 6, 5), (0.7, 1.3, 2.9), (-120.25, 33.125, 17.5), OBLIQUE)

# Largest geometry error seen per format (mm / direction units); NIfTI stores the direction as
# a float32 quaternion (qform) and float32 sform, and the origin as float32.
TOLERANCE = {".nii": 1e-4, ".nii.gz": 1e-4}


def _image(dtype=np.int16, geometry: Geometry = GEOM) -> sitk.Image:
    values = (np.arange(np.prod(geometry.size)) % 251 - 100).reshape(geometry.size)
    return Volume(values.astype(dtype), geometry).to_sitk()


def _assert_same_geometry(image: sitk.Image, geometry: Geometry, tol: float) -> None:
    got = Geometry.from_sitk(image)
    assert got.size == geometry.size
    np.testing.assert_allclose(got.spacing, geometry.spacing, atol=tol)
    np.testing.assert_allclose(got.origin, geometry.origin, atol=tol)
    np.testing.assert_allclose(got.direction, geometry.direction, atol=tol)


def _write_mhd(path: Path, header: str, dims: str = "4 5 4", data_bytes: int | None = None):
    """A hand-made MetaImage header (float32 data file) to produce bad headers."""
    raw = path.with_suffix(".raw")
    n = int(np.prod([int(d) for d in dims.split()])) if data_bytes is None else data_bytes
    raw.write_bytes(np.zeros(n, np.float32).tobytes())
    path.write_text(
        f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\n{header}\n"
        f"ElementType = MET_FLOAT\nElementDataFile = {raw.name}\n"
    )
    return path


def _write_dicom_series(
    directory: Path, volume: Volume, series_uid: str, study_uid: str = "1.2.826.0.1.3680043.8.498.1"
) -> None:
    """Write an int16 volume as one DICOM file per k-slice with full geometry tags."""
    directory.mkdir(parents=True, exist_ok=True)
    g = volume.geometry
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    iop = list(g.direction[:, 0]) + list(g.direction[:, 1])
    image = sitk.Cast(volume.to_sitk(), sitk.sitkInt16)
    for k in range(g.size[2]):
        plane = image[:, :, k : k + 1]  # 3D single slice: keeps spacing, origin, direction
        position = g.index_to_world([0, 0, k])
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",  # SOPInstanceUID
            "0008|0060": "CT",
            "0010|0010": "Phantom^Test",
            "0010|0020": "P001",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0011": "1",
            "0020|0013": str(k + 1),  # InstanceNumber
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.8f}" for v in iop),
            "0028|0030": f"{g.spacing[1]:.6f}\\{g.spacing[0]:.6f}",  # row\column spacing
            "0018|0050": f"{g.spacing[2]:.6f}",  # SliceThickness
            "0018|0088": f"{g.spacing[2]:.6f}",  # SpacingBetweenSlices
            "0028|1052": "0",  # RescaleIntercept
            "0028|1053": "1",  # RescaleSlope
        }
        for key, value in tags.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(directory / f"{series_uid}-{k:03d}.dcm"))
        writer.Execute(plane)


# ---------------------------------------------------------------------------------- suffixes
def test_suffix_helpers():
    assert set(IMAGE_SUFFIXES) == {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"}
    assert image_suffix("a/b/CT.NII.GZ") == ".nii.gz"
    assert image_suffix("x.nii") == ".nii"
    assert is_image_path(Path("scan.mhd")) and is_image_path("scan.nhdr")
    assert not is_image_path("scan.fcsv") and not is_image_path(".nii") and not is_image_path("gz")


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, suffix, dtype):
    path = tmp_path / f"img{suffix}"
    assert write_image(_image(dtype), path) == path
    back = read_image(path)
    _assert_same_geometry(back, GEOM, TOLERANCE.get(suffix, 1e-9))
    assert back.GetPixelID() == _image(dtype).GetPixelID()
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(_image(dtype))
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert all(not n.startswith(".") for n in names), names  # no temporaries left behind
    if suffix in (".nhdr", ".mhd"):
        assert len(names) == 2  # header + data file under the final name
    # a landmark at a voxel centre maps to the same world point before and after
    idx = [3.0, 2.0, 4.0]
    np.testing.assert_allclose(
        back.TransformContinuousIndexToPhysicalPoint(idx), GEOM.index_to_world(idx), atol=1e-3
    )


def test_nifti_geometry_precision_is_float32(tmp_path):
    """Documents what NIfTI keeps: errors are float32-sized, not exact (see coordinates.md)."""
    write_image(_image(), tmp_path / "a.nii.gz")
    got = Geometry.from_sitk(read_image(tmp_path / "a.nii.gz"))
    err = max(
        np.max(np.abs(got.direction - GEOM.direction)),
        np.max(np.abs(got.origin - GEOM.origin)),
        np.max(np.abs(got.spacing - GEOM.spacing)),
    )
    assert err < 1e-4
    assert np.allclose(got.direction.T @ got.direction, np.eye(3), atol=1e-6)


def test_compression_by_suffix(tmp_path):
    image = Volume(
        np.zeros((30, 30, 30), np.int16), Geometry((30, 30, 30), (1, 1, 1), (0, 0, 0))
    ).to_sitk()
    write_image(image, tmp_path / "a.nii.gz")
    write_image(image, tmp_path / "a.nii")
    write_image(image, tmp_path / "a.mha")
    write_image(image, tmp_path / "a.nrrd")
    assert (tmp_path / "a.nii.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "a.nii.gz").stat().st_size < (tmp_path / "a.nii").stat().st_size / 10
    assert b"CompressedData = True" in (tmp_path / "a.mha").read_bytes()[:1000]
    assert b"encoding: gzip" in (tmp_path / "a.nrrd").read_bytes()[:1000]


def test_write_image_overwrite_and_unknown_suffix(tmp_path):
    path = tmp_path / "sub" / "out.nrrd"
    write_image(_image(), path)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_image(_image(), path, overwrite=False)
    with pytest.raises(OutputExistsError):
        write_image(_image(), tmp_path / "sub" / "out.nrrd", overwrite=False)
    with pytest.raises(ImageError, match=r"unknown image file suffix.*\.nii\.gz"):
        write_image(_image(), tmp_path / "out.png")
    write_image(_image(), tmp_path / "d.mhd")
    with pytest.raises(OutputExistsError):
        write_image(_image(), tmp_path / "d.mhd", overwrite=False)


def test_read_volume_is_float32_in_index_order(tmp_path):
    write_image(_image(), tmp_path / "a.mha")
    vol = read_volume(tmp_path / "a.mha")
    assert vol.array.dtype == np.float32 and vol.array.shape == GEOM.size
    image = _image()
    assert vol.array[6, 1, 3] == image.GetPixel(6, 1, 3)
    assert vol.geometry.is_close(GEOM)


# ---------------------------------------------------------------------------------- DICOM
def test_dicom_series_round_trip(tmp_path):
    geom = Geometry(
        (8, 6, 5), (0.6, 0.75, 2.5), (-30.5, 12.25, 101.0), OBLIQUE @ np.diag([1, -1, 1])
    )
    assert np.linalg.det(geom.direction) > 0  # DICOM's slice axis is row x column
    vol = Volume.from_sitk(_image(np.int16, geom), np.int16)
    _write_dicom_series(tmp_path / "series", vol, "1.2.826.0.1.3680043.8.498.10")
    image = read_image(tmp_path / "series")
    _assert_same_geometry(image, geom, 1e-3)
    np.testing.assert_array_equal(Volume.from_sitk(image, np.int16).array, vol.array)


def test_dicom_directory_with_two_series_or_none(tmp_path):
    geom = Geometry((4, 4, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    vol = Volume(np.ones(geom.size, np.int16), geom)
    _write_dicom_series(tmp_path / "d", vol, "1.2.3.4.100")
    shifted = Geometry(geom.size, geom.spacing, (0.0, 0.0, 50.0))
    _write_dicom_series(tmp_path / "d", Volume(vol.array * 2, shifted), "1.2.3.4.200")
    with pytest.raises(ImageError, match=r"2 DICOM series: 1\.2\.3\.4\.100, 1\.2\.3\.4\.200") as e:
        read_image(tmp_path / "d")
    assert "pass one series" in str(e.value) and str(tmp_path / "d") in str(e.value)
    second = read_image(tmp_path / "d", series_uid="1.2.3.4.200")
    assert second.GetOrigin() == pytest.approx((0.0, 0.0, 50.0))
    assert float(sitk.GetArrayViewFromImage(second).max()) == 2
    with pytest.raises(ImageError, match="not in the directory"):
        read_image(tmp_path / "d", series_uid="9.9")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no DICOM series"):
        read_image(tmp_path / "empty")
    with pytest.raises(ImageError, match="pass the directory"):
        read_image(next((tmp_path / "d").iterdir()))


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path, capfd):
    """ITK would stack the slices evenly (mean step) and only print a warning: every slice
    past the gap would be ~1 slice step off. We check the positions and refuse."""
    geom = Geometry((6, 5, 9), (0.8, 0.9, 2.5), (-10.0, 20.0, 30.0), OBLIQUE @ np.diag([1, -1, 1]))
    vol = Volume.from_sitk(_image(np.int16, geom), np.int16)
    uid = "1.2.826.0.1.3680043.8.498.20"
    _write_dicom_series(tmp_path / "s", vol, uid)
    image = read_image(tmp_path / "s")  # intact: reads with the right geometry
    _assert_same_geometry(image, geom, 1e-3)
    (tmp_path / "s" / f"{uid}-004.dcm").unlink()
    capfd.readouterr()
    with pytest.raises(ImageError, match=r"not evenly spaced") as e:
        read_image(tmp_path / "s")
    message = str(e.value)
    assert str(tmp_path / "s") in message
    assert f"{uid}-003.dcm" in message and f"{uid}-005.dcm" in message  # the slices either side
    assert "5.00 mm apart, 1 slice(s) missing" in message and "usual step is 2.50 mm" in message
    assert "complete series" in (e.value.fix or "")
    assert "Non uniform sampling" not in capfd.readouterr().err  # ITK's raw warning is silenced
    (tmp_path / "s" / f"{uid}-005.dcm").unlink()  # two missing: named as such
    with pytest.raises(ImageError, match=r"7\.50 mm apart, 2 slice\(s\) missing"):
        read_image(tmp_path / "s")


def test_dicom_series_with_a_repeated_position_is_refused(tmp_path):
    geom = Geometry((4, 4, 5), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    vol = Volume(np.ones(geom.size, np.int16), geom)
    _write_dicom_series(tmp_path / "s", vol, "1.2.3.4.300")
    repeat = sitk.ReadImage(str(tmp_path / "s" / "1.2.3.4.300-002.dcm"))
    repeat.SetMetaData("0008|0018", "1.2.3.4.300.99")
    repeat.SetMetaData("0020|0013", "99")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(tmp_path / "s" / "1.2.3.4.300-099.dcm"))
    writer.Execute(repeat)
    with pytest.raises(ImageError, match=r"are at the same position") as e:
        read_image(tmp_path / "s")
    assert "one acquisition per directory" in (e.value.fix or "")


# ---------------------------------------------------------------------------------- bad files
def test_missing_empty_and_garbage_files(tmp_path):
    with pytest.raises(ImageError, match="not found") as e:
        read_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(e.value) and "Fix:" in str(e.value)
    (tmp_path / "empty.nii.gz").touch()
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        read_image(tmp_path / "empty.nii.gz")
    (tmp_path / "junk.nii").write_bytes(b"not an image at all" * 30)
    with pytest.raises(ImageError, match="cannot read the image") as e:
        read_image(tmp_path / "junk.nii")
    message = str(e.value)
    assert "\n" not in message and "junk.nii" in message and "Exception thrown" not in message


@pytest.mark.parametrize(
    ("suffix", "dtype"),
    [
        (".nii", np.float32),
        (".nii", np.int16),
        (".nii.gz", np.float32),
        (".nii.gz", np.int16),
        (".nrrd", np.float32),
        (".mha", np.int16),
    ],
)
def test_truncated_files_are_refused(tmp_path, suffix, dtype):
    """ITK would zero-fill a truncated NIfTI silently; we compare sizes with the header."""
    values = (np.random.default_rng(0).normal(size=(40, 40, 40)) * 100).astype(dtype)
    path = tmp_path / f"t{suffix}"
    write_image(Volume(values, Geometry((40, 40, 40), (1, 1, 1), (0, 0, 0))).to_sitk(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expected = "is truncated" if suffix.startswith(".nii") else "cannot read"
    with pytest.raises(ImageError, match=expected) as e:
        read_image(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_nifti_gz_with_trailing_bytes_is_accepted(tmp_path):
    path = tmp_path / "a.nii.gz"
    write_image(_image(), path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw + b"\0" * 7))  # trailer no longer matches exactly
    assert read_image(path).GetSize() == GEOM.size


def test_not_3d(tmp_path):
    write_image(sitk.Image([5, 6], sitk.sitkInt16), tmp_path / "flat.nii")
    with pytest.raises(ImageError, match=r"2D.*not 3D"):
        read_image(tmp_path / "flat.nii")
    four = sitk.Image([3, 4, 5, 2], sitk.sitkFloat32)
    write_image(four, tmp_path / "four.nii.gz")
    with pytest.raises(ImageError, match=r"4D \(size 3x4x5x2\)"):
        read_image(tmp_path / "four.nii.gz")


def test_4d_with_singleton_axis_is_squeezed(tmp_path):
    four = sitk.Image([4, 5, 6, 1], sitk.sitkInt16)
    four.SetSpacing((0.5, 0.6, 0.7, 3.0))
    four.SetOrigin((1.0, 2.0, 3.0, 0.0))
    d4 = np.eye(4)
    d4[:3, :3] = OBLIQUE
    four.SetDirection(d4.ravel().tolist())
    four.SetPixel([2, 3, 4, 0], 42)
    write_image(four, tmp_path / "four.nrrd")
    image = read_image(tmp_path / "four.nrrd")
    assert image.GetDimension() == 3 and image.GetSize() == (4, 5, 6)
    assert image.GetPixel(2, 3, 4) == 42
    _assert_same_geometry(image, Geometry((4, 5, 6), (0.5, 0.6, 0.7), (1, 2, 3), OBLIQUE), 1e-9)


@pytest.mark.parametrize("size", [(98, 102, 1), (1, 40, 40), (30, 3, 30)])
def test_single_slice_or_thin_volume_is_refused(tmp_path, size):
    """A "3D" image of one slice (or a 3-slice slab) gives meaningless 3D landmarks."""
    path = write_image(sitk.Image(list(size), sitk.sitkInt16), tmp_path / "thin.nii.gz")
    shown = "x".join(map(str, size))
    with pytest.raises(ImageError, match=rf"size {shown}, fewer than 4 voxels") as e:
        read_image(path)
    assert e.value.path == path and "whole 3D volume" in (e.value.fix or "")
    assert any("too thin" in p for p in image_problems(sitk.Image(list(size), sitk.sitkInt16)))
    assert image_problems(sitk.Image([4, 4, 4], sitk.sitkInt16)) == []  # 4 per axis is enough


def test_vector_image(tmp_path):
    vec = sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3)
    write_image(vec, tmp_path / "v.mha")
    with pytest.raises(ImageError, match="3 components per voxel"):
        read_image(tmp_path / "v.mha")
    assert any("components" in p for p in image_problems(vec))


def test_zero_size_axis(tmp_path):
    path = _write_mhd(tmp_path / "z.mhd", "ElementSpacing = 1 1 1", dims="0 3 2", data_bytes=0)
    with pytest.raises(ImageError, match="zero-size axis"):
        read_image(path)


def test_bad_spacing(tmp_path):
    with pytest.raises(ImageError, match="spacing") as e:
        read_image(_write_mhd(tmp_path / "zero.mhd", "ElementSpacing = 0 1 1"))
    assert "positive" in e.value.fix
    with pytest.raises(ImageError, match="spacing"):
        read_image(_write_mhd(tmp_path / "nan.mhd", "ElementSpacing = nan 1 1"))
    # In memory SimpleITK refuses zero/negative spacing but accepts NaN and inf.
    image = sitk.Image([3, 3, 3], sitk.sitkFloat32)
    image.SetSpacing((float("nan"), 1.0, float("inf")))
    assert any("spacing" in p and "positive and finite" in p for p in image_problems(image))
    with pytest.raises(ImageError, match="spacing"):
        validate_image(image, "mem.nii")


def test_negative_spacing_in_header_becomes_a_flip(tmp_path):
    """ITK turns a negative spacing into a flipped direction: world positions stay right."""
    image = read_image(_write_mhd(tmp_path / "neg.mhd", "ElementSpacing = -2 1 1"))
    assert image.GetSpacing() == (2.0, 1.0, 1.0)
    assert image.GetDirection()[0] == -1.0
    assert image.TransformIndexToPhysicalPoint((1, 0, 0)) == (-2.0, 0.0, 0.0)


def test_non_orthonormal_direction(tmp_path):
    path = _write_mhd(tmp_path / "shear.mhd", "TransformMatrix = 1 0 0 0.5 1 0 0 0 1")
    with pytest.raises(ImageError, match="not orthonormal") as e:
        read_image(path)
    assert "resample" in e.value.fix
    image = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    image.SetDirection((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0 + 1e-6))  # float32-level noise is fine
    assert image_problems(image) == []


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_with_sheared_sform_says_not_orthonormal(tmp_path, suffix):
    """A sheared sform without a qform: ITK refuses it; we say why (not "damaged")."""
    path = write_image(_image(), tmp_path / f"good{suffix}")
    opener = gzip.open if suffix == ".nii.gz" else open
    with opener(path, "rb") as fh:
        data = bytearray(fh.read())
    data[252:256] = struct.pack("<2h", 0, 2)  # qform_code 0, sform_code 2 (aligned)
    data[280:328] = struct.pack("<12f", -1, 0.5, 0, 0, 0, -1, 0, 0, 0, 0, 2, 0)  # x += 0.5 y
    sheared = tmp_path / f"shear{suffix}"
    with opener(sheared, "wb") as fh:
        fh.write(bytes(data))
    with pytest.raises(ImageError, match="direction matrix is not orthonormal") as e:
        read_image(sheared)
    message = str(e.value)
    assert "0.447 in the sform" in message  # 0.5 / |(-1, 0.5, 0)| = 0.447
    assert "damaged" not in message and "truncated" not in message
    assert "resample the image onto an orthonormal grid" in (e.value.fix or "")
    assert e.value.path == sheared


def test_itk_warnings_are_silenced_and_our_check_reports_the_problem(tmp_path, capfd):
    """ITK would print "WARNING: In .../itkNiftiImageIO.cxx ... unexpected scales in sform"
    and use the qform; the raw line stays off the console and our own error says why."""
    path = write_image(_image(), tmp_path / "a.nii")
    data = bytearray(path.read_bytes())  # qform kept (code 1), sform sheared
    data[280:328] = struct.pack("<12f", -1, 0.5, 0, 0, 0, -1, 0, 0, 0, 0, 2, 0)
    path.write_bytes(bytes(data))
    capfd.readouterr()
    with pytest.raises(ImageError, match=r"not orthonormal .*0\.447 in the sform.*qform"):
        read_image(path)
    err = capfd.readouterr().err
    assert "WARNING" not in err and "itkNiftiImageIO" not in err, err
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # switched back on afterwards


def test_nonfinite_voxels(tmp_path):
    values = np.zeros(GEOM.size, np.float32)
    values[0, 0, 0] = np.nan
    values[1, 2, 3] = np.inf
    values[2, 2, 2] = -np.inf
    path = tmp_path / "nan.nii.gz"
    write_image(Volume(values, GEOM).to_sitk(), path)
    with pytest.raises(ImageError, match=r"3 of 210 voxels are not finite \(1 NaN, 2 inf\)") as e:
        read_image(path)
    fix = e.value.fix or ""  # what a CLI user can do; the API argument only as such
    assert "replace the NaN/inf voxels by the background value" in fix
    assert "leave the case out" in fix
    assert "(Python API: allow_nonfinite=True" in fix and fix.count("allow_nonfinite") == 1
    image = read_image(path, allow_nonfinite=True)
    assert image_problems(image) == ["3 of 210 voxels are not finite (1 NaN, 2 inf)."]
    # ITK's NIfTI reader turns NaN/inf into 0; we scan the file and put them back
    kept = read_volume(path, allow_nonfinite=True).array
    assert np.isnan(kept[0, 0, 0]) and kept[1, 2, 3] == np.inf and kept[2, 2, 2] == -np.inf
    assert np.count_nonzero(~np.isfinite(kept)) == 3


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii"])
def test_nonfinite_voxels_other_formats(tmp_path, suffix):
    values = np.ones(GEOM.size, np.float64)
    values[3, 3, 3] = np.nan
    write_image(Volume(values, GEOM).to_sitk(), tmp_path / f"a{suffix}")
    with pytest.raises(ImageError, match=r"1 of 210 voxels are not finite \(1 NaN, 0 inf\)"):
        read_image(tmp_path / f"a{suffix}")
    assert np.isnan(read_volume(tmp_path / f"a{suffix}", allow_nonfinite=True).array[3, 3, 3])


def test_image_problems_lists_every_problem_and_valid_image_has_none():
    assert image_problems(_image()) == []
    bad = sitk.Image([4, 4, 4], sitk.sitkFloat64)
    bad.SetSpacing((float("nan"), 1.0, 1.0))
    bad.SetDirection((1.0, 0.3, 0, 0, 1.0, 0, 0, 0, 1.0))
    bad.SetPixel(0, 0, 0, float("nan"))
    problems = image_problems(bad)
    assert len(problems) == 3
    assert "spacing" in problems[0] and "orthonormal" in problems[1] and "NaN" in problems[2]
    assert image_problems(sitk.Image([4, 4], sitk.sitkUInt8)) == ["image is 2D (size 4x4), not 3D."]
