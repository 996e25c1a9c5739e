"""``landmark3d import pddca|layout``, ``export layout``, ``convert`` and ``package`` +
``predict --model model.zip``, run in-process through the console-script entry point."""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CliResult
from landmark3d.data.dataset import load_dataset
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import read_landmarks, write_landmarks

Cli = Callable[..., CliResult]
NEW_COMMANDS = (
    ("import", "pddca"),
    ("import", "layout"),
    ("export", "layout"),
    ("convert",),
    ("package",),
)
POINTS = {  # LPS, inside the image written by _nrrd (x 0..38, y 0..38, z 0..30 mm)
    "chin": (19.0, 5.5, 4.0),
    "mand_l": (30.0, 20.0, 25.0),
    "mand_r": (8.0, 20.0, 25.25),
    "odont_proc": (19.0, 25.0, 15.0),
    "occ_bone": (19.5, 35.0, 20.0),
}


def _one_error_line(r: CliResult) -> str:
    assert r.code != 0
    assert "Traceback" not in r.err
    assert len(r.err_lines) == 1, r.err
    assert r.err_lines[0].startswith("error:") and "Fix:" in r.err_lines[0]
    return r.err_lines[0]


def _nrrd(path: Path) -> None:
    image = sitk.Image(20, 20, 16, sitk.sitkInt16)
    image.SetSpacing((2.0, 2.0, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def _fcsv(
    path: Path, points: dict[str, tuple[float, float, float]], header: str, ras: bool
) -> None:
    rows = [
        f"# CoordinateSystem = {header}",
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
    ]
    for i, (name, (x, y, z)) in enumerate(points.items()):
        if ras:
            x, y = -x, -y
        rows.append(f"{i},{x},{y},{z},0,0,0,1,1,1,0,{name.upper()},,")
    path.write_text("\n".join(rows) + "\n")


def _pddca(src: Path) -> Path:
    for n in range(1, 5):
        _nrrd(src / f"0522c000{n}" / "img.nrrd")
    _fcsv(src / "0522c0001" / "Landmarks_0001.fcsv", POINTS, "0", ras=True)
    _fcsv(src / "0522c0002" / "Landmarks_0002.fcsv", POINTS, "LPS", ras=False)
    _fcsv(src / "0522c0003" / "Landmarks_0003.fcsv", POINTS, "LPS", ras=True)  # wrong header
    return src  # 0522c0004 has no fcsv


# ---------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", NEW_COMMANDS)
def test_new_commands_have_help_with_an_example(cli: Cli, command: tuple[str, ...]) -> None:
    r = cli(*command, "--help")
    assert r.code == 0, r.err
    assert "Example" in r.out and f"landmark3d {' '.join(command)}" in r.out


# ---------------------------------------------------------------------------------- pddca
def test_import_pddca_reports_skips_and_the_coordinate_override(cli: Cli, tmp_path: Path) -> None:
    src = _pddca(tmp_path / "PDDCA")
    r = cli("import", "pddca", src, "--out", tmp_path / "ds", "--folds", "2")
    assert r.code == 0, r.err
    assert "kept 2 patient(s)" in r.out and "skipped 2" in r.out
    assert "no landmark file" in r.out and "--fcsv-coords RAS" in r.out
    ds = load_dataset(tmp_path / "ds")
    assert ds.case_ids == ["0522c0001", "0522c0002"] and len(ds.folds) == 2
    np.testing.assert_allclose(ds.read_landmarks("0522c0001").coords, list(POINTS.values()))

    r = cli("import", "pddca", src, "--out", tmp_path / "ds", "--fcsv-coords", "auto")
    assert "--overwrite" in _one_error_line(r)
    r = cli(
        "import", "pddca", src, "--out", tmp_path / "ds", "--fcsv-coords", "auto",
        "--folds", "3", "--copy", "--overwrite",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "kept 3 patient(s)" in r.out and "RAS (auto-flipped): 1" in r.out
    assert not (tmp_path / "ds" / "images" / "0522c0001.nrrd").is_symlink()

    line = _one_error_line(cli("import", "pddca", tmp_path / "nowhere", "--out", tmp_path / "x"))
    assert "PDDCA folder not found" in line


# ---------------------------------------------------------------------------------- layout
def test_import_and_export_layout_round_trip(cli: Cli, tmp_path: Path) -> None:
    orig = tmp_path / "orig"
    for cid in ("a1", "a2", "a3"):
        _nrrd(tmp_path / "tmp" / f"{cid}.nrrd")
        image = sitk.ReadImage(str(tmp_path / "tmp" / f"{cid}.nrrd"))
        (orig / "images").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(orig / "images" / f"{cid}.nii.gz"))
    (orig / "setup").mkdir()
    (orig / "setup" / "landmark.csv").write_text(
        "# CoordinateSystem = LPS\ncase,landmark,x,y,z\n"
        "a1,chin,1.125,2.0,3.0\na1,occ_bone,4.0,5.0,6.0\n"
        "a2,chin,7.0,8.0,9.333333333333334\na2,occ_bone,,,\n"
        "a3,chin,1.0,1.0,1.0\na3,occ_bone,2.0,2.0,2.0\n"
    )
    for k, cid in enumerate(("a2", "a1", "a3")):
        (orig / "setup" / f"cv{k}").write_text(cid + "\n")

    r = cli("import", "layout", orig, "--out", tmp_path / "spec")
    assert r.code == 0, r.err
    assert "3 case(s), 2 landmark(s), 3 fold(s)" in r.out
    r = cli("export", "layout", tmp_path / "spec", "--out", tmp_path / "back")
    assert r.code == 0, r.err
    before = (orig / "setup" / "landmark.csv").read_text().splitlines()
    after = (tmp_path / "back" / "setup" / "landmark.csv").read_text().splitlines()

    def rows(lines: list[str]) -> list[tuple[str, ...]]:
        return sorted(tuple(r) for r in csv.reader(ln for ln in lines if not ln.startswith("#")))

    assert rows(after) == rows(before)
    for k in range(3):
        assert (tmp_path / "back" / "setup" / f"cv{k}").read_text() == (
            orig / "setup" / f"cv{k}"
        ).read_text()
    again = cli("export", "layout", tmp_path / "spec", "--out", tmp_path / "back")
    assert "--overwrite" in _one_error_line(again)


# ---------------------------------------------------------------------------------- convert
def test_convert_between_formats_and_systems(cli: Cli, tmp_path: Path) -> None:
    truth = LandmarkSet.from_dict(
        {"chin": (1.5, -2.25, 3.0), "occ_bone": None, "nasion": (4.0, 5.0, 6.0)}
    )
    src = write_landmarks(truth, tmp_path / "in.mrk.json", coords="RAS")

    r = cli("convert", src, tmp_path / "out.fcsv")
    assert r.code == 0, r.err
    assert "RAS" in r.out  # the input's system is kept by default
    assert "CoordinateSystem = RAS" in (tmp_path / "out.fcsv").read_text()
    assert "left out occ_bone" in r.err  # .fcsv cannot hold a missing landmark: warned
    back = read_landmarks(tmp_path / "out.fcsv")
    np.testing.assert_array_equal(back.coords, truth.subset(back.names).coords)

    r = cli("convert", src, tmp_path / "out.csv", "--coords", "LPS")
    assert r.code == 0, r.err
    text = (tmp_path / "out.csv").read_text()
    assert text.startswith("# CoordinateSystem = LPS") and "chin,1.5,-2.25,3.0" in text
    np.testing.assert_array_equal(read_landmarks(tmp_path / "out.csv").coords, truth.coords)

    line = _one_error_line(cli("convert", src, tmp_path / "out.csv"))
    assert "--overwrite" in line
    assert cli("convert", src, tmp_path / "out.csv", "--coords", "RAS", "--overwrite").code == 0
    assert "CoordinateSystem = RAS" in (tmp_path / "out.csv").read_text()

    bare = tmp_path / "bare.csv"
    bare.write_text("name,x,y,z\nchin,1,2,3\n")
    line = _one_error_line(cli("convert", bare, tmp_path / "b.json"))
    assert "does not state its coordinate system" in line
    assert "--in-coords" in line and "dataset.json" in line  # the options that exist
    r = cli("convert", bare, tmp_path / "b.json", "--in-coords", "RAS")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "b.json").read_text())["coordinate_system"] == "RAS"
    np.testing.assert_array_equal(read_landmarks(tmp_path / "b.json").coords, [[-1.0, -2.0, 3.0]])
    assert "unknown landmark file format" in _one_error_line(
        cli("convert", bare, tmp_path / "b.txt")
    )


# ---------------------------------------------------------------------------------- package
def test_package_then_predict_with_the_archive(
    cli: Cli, tiny_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model.zip"
    r = cli("package", tiny_run, "--out", model)
    assert r.code == 0, r.err
    assert "sha256" in r.out and model.is_file()
    assert "--overwrite" in _one_error_line(cli("package", tiny_run, "--out", model))

    image = load_dataset(phantom_dir).cases[0].image
    for name, source in (("run", tiny_run), ("zip", model)):
        r = cli(
            "predict", "--model", source, "--input", image, "--out", tmp_path / name,
            "--format", "json", "--device", "cpu",
        )  # fmt: skip
        assert r.code == 0, r.err
    case_id = image.name.split(".")[0]
    a, b = (tmp_path / name / f"{case_id}.json" for name in ("run", "zip"))
    np.testing.assert_array_equal(read_landmarks(a).coords, read_landmarks(b).coords)

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(model) as zin, zipfile.ZipFile(evil, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
        zout.writestr("payload.py", "raise SystemExit('pwned')\n")
    r = cli(
        "predict", "--model", evil, "--input", image, "--out", tmp_path / "evil", "--device", "cpu"
    )
    line = _one_error_line(r)
    assert "payload.py" in line and "nothing executable or pickled" in line
