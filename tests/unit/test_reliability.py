"""Reliability (issue 8): bad images, resource limits, output safety and damaged checkpoints.

What ``tests/unit/test_images.py`` already proves (missing/empty/garbage/truncated files, 2D
and 4D images, zero-size axes, zero/NaN spacing, NaN/inf voxels, vector images) is not repeated
here; this file covers the remaining cases of ``docs/reliability.md``:

* NIfTI files with a damaged magic or header size (ITK read them as Analyze and dropped the
  origin and direction), uncompressed NIfTI named ``.nii.gz`` (the truncation / NaN scan
  skipped them), other formats with a wrong magic;
* integer images with huge ranges and float images beyond float32 (normalisation);
* absurd spacings (1e-6 mm, 1e6 mm, metres) and the voxel budget
  (``LANDMARK3D_MAX_VOXELS``), checked from the header before any voxel is read;
* ``plan --out``, ``verify --json``, ``prior --json`` and ``import pddca`` refuse to overwrite
  without ``--overwrite`` and write atomically;
* checkpoints of another format version, another landmark set, or with damaged bytes give a
  :class:`CheckpointError` through the :class:`Predictor` and ``landmark3d predict``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CliResult
from landmark3d.data.dataset import load_dataset
from landmark3d.data.preprocess import normalize, prepare_case
from landmark3d.errors import CheckpointError, ImageError
from landmark3d.geometry import Geometry, Volume
from landmark3d.geometry.resample import resample_to_spacing, rotation_matrix
from landmark3d.io.images import image_problems, read_image, write_image
from landmark3d.limits import DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV, max_voxels
from landmark3d.planning import Plan

Cli = Callable[..., CliResult]
OBLIQUE = rotation_matrix([0.2, 1.0, -0.3], np.deg2rad(20))
GEOM = Geometry((6, 5, 4), np.array([1.5, 2.0, 2.5]), np.array([10.0, -20.0, 30.0]), OBLIQUE)


def _image(dtype: type = np.int16, geometry: Geometry = GEOM) -> sitk.Image:
    values = (np.arange(np.prod(geometry.size)) % 97).reshape(geometry.size)
    return Volume(values.astype(dtype), geometry).to_sitk()


def _one_error_line(r: CliResult) -> str:
    assert r.code == 1, (r.code, r.err)
    assert "Traceback" not in r.err and len(r.err_lines) == 1, r.err
    assert r.err_lines[0].startswith("error:") and "Fix:" in r.err_lines[0]
    return r.err_lines[0]


# ====================================================================== wrong magic
def test_nifti_with_damaged_magic_is_refused_not_read_as_analyze(tmp_path: Path) -> None:
    """ITK read it as Analyze 7.5: same voxels, but origin (0,0,0) and identity direction."""
    good = write_image(_image(), tmp_path / "good.nii")
    raw = good.read_bytes()
    assert raw[344:348] == b"n+1\0"
    for name, data in {
        "magic.nii": raw[:344] + b"xx\0\0" + raw[348:],
        "magic.nii.gz": gzip.compress(raw[:344] + b"ab\0\0" + raw[348:]),
        "sizeof.nii": b"\0\0\0\0" + raw[4:],
    }.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match="not a valid NIfTI file") as info:
            read_image(tmp_path / name)
        assert info.value.path == tmp_path / name and "export the image again" in str(info.value)
    np.testing.assert_allclose(read_image(good).GetOrigin(), GEOM.origin, atol=1e-4)


def test_uncompressed_nifti_named_nii_gz_is_still_checked(tmp_path: Path) -> None:
    """ITK reads such a file; our truncation and NaN scans used to skip it (gzip failed)."""
    values = np.ones(GEOM.size, np.float32)
    raw = write_image(Volume(values, GEOM).to_sitk(), tmp_path / "a.nii").read_bytes()
    plain = tmp_path / "plain.nii.gz"
    plain.write_bytes(raw)
    assert read_image(plain).GetSize() == GEOM.size
    plain.write_bytes(raw[: len(raw) - 40])
    with pytest.raises(ImageError, match="is truncated"):
        read_image(plain)
    values[1, 2, 3] = np.nan
    raw = write_image(Volume(values, GEOM).to_sitk(), tmp_path / "nan.nii").read_bytes()
    plain.write_bytes(raw)
    with pytest.raises(ImageError, match=r"1 of 120 voxels are not finite"):
        read_image(plain)


def test_other_formats_with_a_wrong_magic(tmp_path: Path) -> None:
    nrrd = write_image(_image(), tmp_path / "a.nrrd").read_bytes()
    cases = {
        "magic.nrrd": b"XRRD" + nrrd[4:],
        "png.nii.gz": b"\x89PNG\r\n\x1a\n" + b"\0" * 400,
        "gzip_text.nii.gz": gzip.compress(b"hello world " * 60),
        "random.mha": np.random.default_rng(0).bytes(3000),
        "nifti.nrrd": write_image(_image(), tmp_path / "x.nii").read_bytes(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match="cannot read the image") as info:
            read_image(tmp_path / name)
        assert "\n" not in str(info.value) and info.value.fix


# ====================================================================== intensity ranges
MR = {"mode": "mr_zscore", "percentiles": [0.0, 100.0]}
CT = {"mode": "ct_window", "low": -1000.0, "high": 2000.0}


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [
        (np.uint32, 0, 2**32 - 1),
        (np.int64, -(2**63), 2**63 - 1),
        (np.uint64, 0, 2**64 - 1),
        (np.float64, -1e38, 3e38),
    ],
)
def test_huge_intensity_ranges_normalise_to_finite_values(
    dtype: type, low: float, high: float
) -> None:
    """No overflow: the z-score statistics are float64, the CT window clips first."""
    rng = np.random.default_rng(0)
    values = rng.uniform(0.0, 1.0, size=(8, 8, 8)) * (float(high) - float(low)) + float(low)
    array: np.ndarray = np.clip(values, low, high).astype(dtype)
    z = normalize(array, MR)
    assert z.dtype == np.float32 and np.isfinite(z).all()
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1.0) < 1e-3
    ct = normalize(array, CT)
    assert np.isfinite(ct).all() and ct.min() >= 0.0 and ct.max() <= 1.0


def test_float64_voxels_beyond_float32_are_refused_by_prepare_case() -> None:
    values = np.zeros(GEOM.size)
    values[1, 1, 1] = 1e300
    image = Volume(values, GEOM).to_sitk()
    plan = Plan(
        orientation="LPS",
        coarse_grid=(16, 16, 16),
        coarse_spacing_mm=(1.0, 1.0, 1.0),
        fine_spacing_mm=(2.0, 2.0, 2.0),
        patch_size=(16, 16, 16),
        intensity=CT,
        landmark_names=["a"],
    )
    with pytest.raises(ImageError, match=r"reach 1e\+300, beyond the float32 range"):
        prepare_case(image, None, plan, "big")
    values[1, 1, 1] = 3e9  # an ordinary large value is fine
    prepared = prepare_case(Volume(values, GEOM).to_sitk(), None, plan, "ok")
    assert np.isfinite(sitk.GetArrayViewFromImage(prepared.image)).all()


# ====================================================================== spacing and size
def _mhd(path: Path, spacing: str, dims: str = "4 5 4", element_bytes: int = 4) -> Path:
    raw = path.with_suffix(".raw")
    n = int(np.prod([int(d) for d in dims.split()]))
    raw.write_bytes(b"\0" * min(n * element_bytes, 1 << 20))
    path.write_text(
        f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementSpacing = {spacing}\n"
        f"ElementType = MET_FLOAT\nElementDataFile = {raw.name}\n"
    )
    return path


@pytest.mark.parametrize("spacing", ["1e-6 1 1", "1 1e6 1", "0.001 0.001 0.001", "1 1 250"])
def test_absurd_spacing_is_refused(tmp_path: Path, spacing: str) -> None:
    with pytest.raises(ImageError, match=r"outside the plausible range 0\.01-100 mm") as info:
        read_image(_mhd(tmp_path / "a.mhd", spacing))
    assert "metres" in str(info.value) and "multiply metres by 1000" in (info.value.fix or "")
    image = sitk.Image([3, 3, 3], sitk.sitkInt16)
    image.SetSpacing([float(s) for s in spacing.split()])
    assert any("plausible range" in p for p in image_problems(image))  # verify reports it too


def test_spacing_edges_are_accepted(tmp_path: Path) -> None:
    assert read_image(_mhd(tmp_path / "a.mhd", "0.01 100 1")).GetSpacing() == (0.01, 100.0, 1.0)


def test_voxel_budget_from_environment_and_parameter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_image(_image(), tmp_path / "a.nii.gz")  # 120 voxels
    monkeypatch.delenv(MAX_VOXELS_ENV, raising=False)
    assert max_voxels() == DEFAULT_MAX_VOXELS == 2**30
    monkeypatch.setenv(MAX_VOXELS_ENV, "100")
    with pytest.raises(ImageError, match=r"image has 120 voxels \(6x5x4; .*limit of 100") as info:
        read_image(path)
    assert MAX_VOXELS_ENV in (info.value.fix or "") and info.value.path == path
    assert read_image(path, max_voxels=120).GetSize() == GEOM.size  # the parameter wins
    monkeypatch.setenv(MAX_VOXELS_ENV, "1e3")
    assert max_voxels() == 1000 and read_image(path).GetSize() == GEOM.size
    for bad in ("lots", "-5", "0"):
        monkeypatch.setenv(MAX_VOXELS_ENV, bad)
        with pytest.raises(ImageError, match=f"{MAX_VOXELS_ENV}='{bad}' is not a positive"):
            read_image(path)


def test_huge_header_is_refused_before_any_voxel_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header claiming 40000^3 voxels (256 TB as float32): refused at once, no allocation."""
    monkeypatch.delenv(MAX_VOXELS_ENV, raising=False)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("voxels were read")

    monkeypatch.setattr(sitk, "ReadImage", forbidden)
    with pytest.raises(ImageError, match=r"64000000000000 voxels .*more than the limit"):
        read_image(_mhd(tmp_path / "huge.mhd", "1 1 1", dims="40000 40000 40000"))
    nii = write_image(_image(), tmp_path / "small.nii")
    header = bytearray(nii.read_bytes())
    header[42:48] = np.array([30000, 30000, 30000], "<i2").tobytes()  # dim[1..3]
    nii.write_bytes(bytes(header))
    with pytest.raises(ImageError, match="27000000000000 voxels"):
        read_image(nii)


def test_dicom_series_beyond_the_budget_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    series = tmp_path / "dicom"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(4):
        plane = sitk.Image([8, 8, 1], sitk.sitkInt16)
        for key, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.3.4",
            "0020|000e": "1.2.3.4.5",
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{2.0 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0018": f"1.2.3.4.5.{k + 1}",
        }.items():
            plane.SetMetaData(key, value)
        writer.SetFileName(str(series / f"{k}.dcm"))
        writer.Execute(plane)
    assert read_image(series).GetSize() == (8, 8, 4)
    monkeypatch.setenv(MAX_VOXELS_ENV, "255")
    with pytest.raises(ImageError, match=r"DICOM series has 256 voxels \(8x8x4"):
        read_image(series)


def test_resampling_beyond_the_budget_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """100 voxels of 50 mm resampled to 0.05 mm would be 1e15 voxels: refused, not allocated."""
    monkeypatch.delenv(MAX_VOXELS_ENV, raising=False)
    image = sitk.Image([100, 100, 100], sitk.sitkFloat32)
    image.SetSpacing((50.0, 50.0, 50.0))
    with pytest.raises(ImageError, match=r"to \[0.05, 0.05, 0.05\] mm has 10{15} voxels"):
        resample_to_spacing(image, 0.05)
    small = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    assert resample_to_spacing(small, 0.5).GetSize() == (8, 8, 8)


# ====================================================================== outputs
def test_plan_out_refuses_to_overwrite(cli: Cli, phantom_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    out.write_text("keep me")
    line = _one_error_line(cli("plan", phantom_dir, "--out", out))
    assert "output exists" in line and "--overwrite" in line and str(out) in line
    assert out.read_text() == "keep me"
    r = cli("plan", phantom_dir, "--out", out, "--overwrite")
    assert r.code == 0, r.err
    assert json.loads(out.read_text())["orientation"] == "LPS"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temporaries


def test_verify_and_prior_json_refuse_to_overwrite(
    cli: Cli, phantom_dir: Path, tmp_path: Path
) -> None:
    for command, extra in (("verify", ["--no-images"]), ("prior", [])):
        out = tmp_path / f"{command}.json"
        out.write_text("keep me")
        line = _one_error_line(cli(command, phantom_dir, "--json", out, *extra))
        assert "--overwrite" in line and out.read_text() == "keep me"
        r = cli(command, phantom_dir, "--json", out, *extra, "--overwrite")
        assert r.code == 0, r.err
        json.loads(out.read_text())


def test_a_crash_while_writing_leaves_the_old_output(
    cli: Cli, phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.replace fails (disk full, kill): the old file stays whole, no temporary is left."""
    out = tmp_path / "verify.json"
    out.write_text("old report")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    r = cli("verify", phantom_dir, "--no-images", "--json", out, "--overwrite")
    assert r.code == 2 and "No space left" in r.err  # an internal error, reported in one line
    assert out.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["verify.json"]


def test_import_pddca_refuses_leftover_files_without_a_spec(cli: Cli, tmp_path: Path) -> None:
    """A dataset.json-less output (an earlier import that crashed) is not overwritten silently."""
    patient = tmp_path / "PDDCA" / "0522c0001"
    patient.mkdir(parents=True)
    image = sitk.Image(20, 20, 16, sitk.sitkInt16)
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(patient / "img.nrrd"))
    points = {"chin": (19, 5, 4), "mand_l": (30, 20, 25), "mand_r": (8, 20, 25)}
    rows = ["# CoordinateSystem = LPS"] + [
        f"{i},{x},{y},{z},0,0,0,1,1,1,0,{name},,"
        for i, (name, (x, y, z)) in enumerate(points.items())
    ]
    (patient / "lm.fcsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ds"
    leftover = out / "landmarks" / "0522c0001.fcsv"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("hand-edited")
    args = ["import", "pddca", tmp_path / "PDDCA", "--out", out, "--require", "chin"]
    args += ["--folds", "0"]
    line = _one_error_line(cli(*args))
    assert "0522c0001.fcsv" in line and "--overwrite" in line
    assert leftover.read_text() == "hand-edited" and not (out / "images").exists()
    assert cli(*args, "--overwrite").code == 0
    assert load_dataset(out).case_ids == ["0522c0001"]


# ====================================================================== checkpoints
@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny run, free to damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _meta(run: Path, stage: str) -> Path:
    return run / stage / "checkpoints" / "best" / "meta.json"


def _damage(run: Path, how: str) -> str:
    """Damage the copy; return a fragment the error must contain."""
    if how == "version":
        meta = _meta(run, "coarse")
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 99}))
        return "format version 99 is not supported"
    if how == "landmarks":
        meta = _meta(run, "fine")
        data = json.loads(meta.read_text())
        data["landmark_names"] = ["gnathion", *data["landmark_names"][1:]]
        meta.write_text(json.dumps(data))
        return "landmark_names: checkpoint lacks"
    weights = run / "fine" / "checkpoints" / "best" / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    if how == "bitflip":  # inside the tensor data: safetensors alone would load it silently
        blob[len(blob) - 100] ^= 0x40
        weights.write_bytes(bytes(blob))
        return "does not match the sha256 recorded in meta.json"
    if how == "truncated":
        weights.write_bytes(bytes(blob[: len(blob) // 3]))
        return "weights.safetensors"
    assert how == "meta_garbage"
    _meta(run, "coarse").write_text('{"format_version": 1,,')
    return "cannot read checkpoint file"


DAMAGES = ["version", "landmarks", "bitflip", "truncated", "meta_garbage"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_checkpoint_through_the_predictor(run_copy: Path, how: str) -> None:
    from landmark3d.inference.predictor import Predictor

    fragment = _damage(run_copy, how)
    with pytest.raises(CheckpointError, match=fragment) as info:
        Predictor(run_copy, device="cpu", stage="fine")
    assert info.value.path is not None and info.value.fix
    assert str(run_copy) in str(info.value.path)


@pytest.mark.parametrize("how", ["version", "landmarks", "bitflip"])
def test_damaged_checkpoint_through_predict_cli(
    cli: Cli, run_copy: Path, phantom_dir: Path, tmp_path: Path, how: str
) -> None:
    fragment = _damage(run_copy, how)
    image = load_dataset(phantom_dir).cases[0].image
    out = tmp_path / "pred"
    r = cli("predict", "--model", run_copy, "--input", image, "--out", out, "--stage", "fine")
    line = _one_error_line(r)
    assert fragment in line and "Fix:" in line
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_bitflip_would_load_silently_without_the_digest(run_copy: Path) -> None:
    """Why meta.json records sha256: safetensors has no checksum of its own."""
    from safetensors.torch import load_file

    _damage(run_copy, "bitflip")
    weights = run_copy / "fine" / "checkpoints" / "best" / "weights.safetensors"
    assert load_file(str(weights))  # loads without complaint
