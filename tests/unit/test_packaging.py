"""Model archives: package a run, predict from the zip exactly as from the run, refuse unsafe
archives; the Predictor also reads DICOM series directories."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CliResult
from landmark3d.data.dataset import load_dataset
from landmark3d.engine.run import STAGES
from landmark3d.errors import CheckpointError, OutputExistsError
from landmark3d.geometry.space import Geometry, Volume
from landmark3d.inference.predictor import Predictor
from landmark3d.io.images import write_image
from landmark3d.packaging import (
    MANIFEST,
    MODEL_CARD,
    extract_model_archive,
    package_run,
    read_manifest,
)

Cli = Callable[..., CliResult]

TOP = {"MODEL_CARD.md", "manifest.json", "config.json", "plan.json", "split.json"}
CKPT = ("weights.safetensors", "meta.json", "state.json")


def expected_members(run: Path) -> set[str]:
    """What an archive of ``run`` must hold: every trained stage's best checkpoint + metrics."""
    stages = [s for s in STAGES if (run / s / "checkpoints" / "best").is_dir()]
    assert stages[:2] == ["coarse", "fine"]
    calibration = {"calibration.json"} if (run / "calibration.json").is_file() else set()
    return (
        TOP
        | calibration
        | {f"{s}/metrics.csv" for s in stages}
        | {f"{s}/checkpoints/best/{f}" for s in stages for f in CKPT}
    )


@pytest.fixture(scope="module")
def archive(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return package_run(tiny_run, tmp_path_factory.mktemp("pkg") / "model.zip")


@pytest.fixture(scope="module")
def predictors(tiny_run: Path, archive: Path) -> tuple[Predictor, Predictor]:
    return Predictor(tiny_run, device="cpu"), Predictor(archive, device="cpu")


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _rezip(
    src: Path, dest: Path, extra: dict[str, bytes] | None = None, drop: tuple[str, ...] = ()
) -> Path:
    """A copy of archive ``src`` with members added/replaced (``extra``) or removed."""
    members = {n: b for n, b in _members(src).items() if n not in drop}
    members.update(extra or {})
    with zipfile.ZipFile(dest, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dest


# ---------------------------------------------------------------------------------- package
def test_archive_holds_only_the_expected_files(archive: Path, tiny_run: Path) -> None:
    members = _members(archive)
    assert set(members) == expected_members(tiny_run)
    assert not any("optimizer" in n for n in members)
    for name in ("config.json", "plan.json", "coarse/checkpoints/best/weights.safetensors"):
        assert members[name] == (tiny_run / name).read_bytes()
    manifest = read_manifest(archive)
    assert manifest["landmark_names"] == json.loads(members["plan.json"])["landmark_names"]
    assert (
        manifest["files"]["plan.json"]["sha256"] == hashlib.sha256(members["plan.json"]).hexdigest()
    )


def test_model_card_describes_the_model(archive: Path, tiny_run: Path) -> None:
    card = _members(archive)[MODEL_CARD].decode()
    plan = json.loads((tiny_run / "plan.json").read_text())
    for name in plan["landmark_names"]:
        assert f"| {name} |" in card
    assert f"**{plan['modality']}**" in card
    assert f"{len(plan['case_ids'])} used for planning" in card
    best = json.loads((tiny_run / "coarse/checkpoints/best/state.json").read_text())["best_metric"]
    assert f"| coarse | val_mre_mm | {best:.2f} |" in card
    for heading in (
        "## Training data",
        "## Validation metrics",
        "## Intended use",
        "## Limitations",
    ):
        assert heading in card


def test_packaging_is_reproducible_and_refuses_overwrite(
    archive: Path, tiny_run: Path, tmp_path: Path
) -> None:
    again = package_run(tiny_run, tmp_path / "again.zip")
    assert again.read_bytes() == archive.read_bytes()
    with pytest.raises(OutputExistsError):
        package_run(tiny_run, again)
    with pytest.raises(CheckpointError, match="not a landmark3d run directory"):
        package_run(tmp_path, tmp_path / "x.zip")


@pytest.mark.parametrize("stage", ["fine", "correlated"])
def test_an_incomplete_run_is_refused(cli: Cli, tiny_run: Path, tmp_path: Path, stage: str) -> None:
    """A stage the plan needs without its best checkpoint: refused, naming the stage (the
    archive would fail in predict, or its card would advertise a model it lacks)."""
    assert json.loads((tiny_run / "plan.json").read_text())["correlated_groups"]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("cache", "last"))
    shutil.rmtree(run / stage / "checkpoints" / "best")
    with pytest.raises(CheckpointError, match=f"the {stage} stage has no 'best' checkpoint") as e:
        package_run(run, tmp_path / "model.zip")
    assert e.value.path == run / stage / "checkpoints" / "best" and "--resume" in str(e.value)
    assert not (tmp_path / "model.zip").exists()
    r = cli("package", run, "--out", tmp_path / "model.zip")
    assert r.code == 1 and len(r.err_lines) == 1, r.err
    assert stage in r.err_lines[0] and "Fix:" in r.err_lines[0]
    assert not (tmp_path / "model.zip").exists()


def test_correlated_is_optional_without_correlated_groups(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("cache", "last"))
    shutil.rmtree(run / "correlated")
    plan = json.loads((run / "plan.json").read_text())
    (run / "plan.json").write_text(json.dumps({**plan, "correlated_groups": []}))
    names = set(_members(package_run(run, tmp_path / "model.zip")))
    assert "fine/checkpoints/best/weights.safetensors" in names
    assert not any(n.startswith("correlated/") for n in names)


def test_archive_checkpoint_errors_name_the_archive(archive: Path, tmp_path: Path) -> None:
    """Not the temporary directory it was unpacked into (gone once the predictor is)."""
    with pytest.raises(CheckpointError, match="archives hold only 'best'") as e:
        Predictor(archive, device="cpu", checkpoint="last")
    assert e.value.path == archive and "landmark3d-model-" not in str(e.value)
    members = _members(archive)  # an archive without a fine stage (as older versions wrote)
    manifest = json.loads(members[MANIFEST])
    drop = tuple(n for n in members if n.startswith(("fine/", "correlated/")))
    manifest["files"] = {n: v for n, v in manifest["files"].items() if n not in drop}
    partial = _rezip(
        archive, tmp_path / "partial.zip", {MANIFEST: json.dumps(manifest).encode()}, drop
    )
    assert Predictor(partial, device="cpu", stage="coarse").fine == {}
    with pytest.raises(CheckpointError, match="no 'best' checkpoint of the fine stage") as e:
        Predictor(partial, device="cpu", stage="fine")
    assert e.value.path == partial and "landmark3d-model-" not in str(e.value)


# ---------------------------------------------------------------------------------- predict
def test_prediction_from_the_archive_equals_the_run(
    predictors: tuple[Predictor, Predictor], phantom_dir: Path, archive: Path
) -> None:
    from_run, from_zip = predictors
    assert from_zip.archive == archive and from_zip.run.is_dir()
    assert from_zip.landmark_names == from_run.landmark_names
    ds = load_dataset(phantom_dir)
    for cid in ds.case_ids[:1]:
        a = from_run.predict_file(ds.case(cid).image).landmarks
        b = from_zip.predict_file(ds.case(cid).image).landmarks
        np.testing.assert_array_equal(a.coords, b.coords)
        assert a.extras == b.extras  # the calibration travels in the archive too


def test_predictor_reads_a_dicom_series_directory(
    predictors: tuple[Predictor, Predictor], phantom_dir: Path, tmp_path: Path
) -> None:
    from test_importers import write_dicom_series

    ds = load_dataset(phantom_dir)
    image = sitk.Cast(ds.read_image(ds.case_ids[0]), sitk.sitkInt16)
    vol = Volume.from_sitk(image, np.float32)
    g = vol.geometry  # DICOM needs a right-handed slice stack: store it with identity axes
    upright = Volume(vol.array, Geometry(g.size, g.spacing, g.origin, np.eye(3)))
    write_dicom_series(tmp_path / "series", upright, "1.2.826.0.1.3680043.8.498.55")
    write_image(upright.to_sitk(), tmp_path / "same.nii.gz")
    predictor = predictors[1]
    from_dicom = predictor.predict_file(tmp_path / "series").landmarks
    from_nifti = predictor.predict_file(tmp_path / "same.nii.gz").landmarks
    np.testing.assert_allclose(from_dicom.coords, from_nifti.coords, atol=0.05)


# ---------------------------------------------------------------------------------- refuse
@pytest.mark.parametrize(
    ("member", "message"),
    [
        ("evil.py", r"\.py file; a model archive holds only"),
        ("coarse/checkpoints/best/weights.pkl", r"\.pkl file"),
        ("coarse/checkpoints/best/model.pt", r"\.pt file"),
        ("../escape.json", r"outside the archive root"),
        ("coarse/../../escape.json", r"outside the archive root"),
        ("/etc/escape.json", r"absolute"),
        ("notes/readme.md", r"not a file a landmark3d model archive holds"),
    ],
)
def test_unsafe_members_are_refused(
    archive: Path, tmp_path: Path, member: str, message: str
) -> None:
    bad = _rezip(archive, tmp_path / "bad.zip", {member: b"import os\nos.system('echo pwned')\n"})
    dest = tmp_path / "out"
    with pytest.raises(CheckpointError, match=message) as e:
        extract_model_archive(bad, dest)
    assert "Fix:" in str(e.value) and str(bad) in str(e.value)
    assert not dest.exists()  # nothing unpacked
    assert not (tmp_path / "escape.json").exists()
    with pytest.raises(CheckpointError, match=message):
        Predictor(bad, device="cpu")


def test_tampered_missing_unlisted_and_symlink_members_are_refused(
    archive: Path, tmp_path: Path
) -> None:
    tampered = _rezip(archive, tmp_path / "t.zip", {"config.json": b'{"seed": 1}'})
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        extract_model_archive(tampered, tmp_path / "o1")
    no_weights = _rezip(
        archive, tmp_path / "w.zip", drop=("coarse/checkpoints/best/weights.safetensors",)
    )
    with pytest.raises(CheckpointError, match=r"members differ from manifest\.json"):
        extract_model_archive(no_weights, tmp_path / "o2")
    no_manifest = _rezip(archive, tmp_path / "m.zip", drop=(MANIFEST,))
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        extract_model_archive(no_manifest, tmp_path / "o3")

    link = tmp_path / "l.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("plan.json")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(CheckpointError, match="symbolic link"):
        extract_model_archive(link, tmp_path / "o4")

    not_zip = tmp_path / "model.zip"
    not_zip.write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(CheckpointError, match="not a readable zip"):
        Predictor(not_zip, device="cpu")


def test_lying_size_header_is_refused(archive: Path, tmp_path: Path) -> None:
    """A member that decompresses to more than its header declares is not unpacked."""
    raw = bytearray(archive.read_bytes())
    pos = raw.find(b"PK\x01\x02")  # central directory entries
    while pos >= 0:
        name_len = int.from_bytes(raw[pos + 28 : pos + 30], "little")
        if raw[pos + 46 : pos + 46 + name_len] == b"plan.json":
            raw[pos + 24 : pos + 28] = (5).to_bytes(4, "little")  # uncompressed size
            break
        pos = raw.find(b"PK\x01\x02", pos + 4)
    assert pos >= 0
    bad = tmp_path / "size.zip"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"plan\.json"):
        extract_model_archive(bad, tmp_path / "out")
