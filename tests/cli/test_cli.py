"""The ``landmark3d`` command line: help, phantom, verify, evaluate and error reporting.

Commands run in-process through the console-script entry point ``landmark3d.cli.main``
(``cli`` fixture); one test runs the installed ``landmark3d`` script as a subprocess to see
the traceback behaviour exactly as a user does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CliResult
from landmark3d.data.dataset import load_dataset
from landmark3d.errors import DatasetError
from landmark3d.geometry.space import Geometry
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import read_landmarks, write_landmarks

Cli = Callable[..., CliResult]
COMMANDS = ("phantom", "verify", "evaluate", "plan", "train", "predict")


def _no_traceback(r: CliResult) -> None:
    assert "Traceback" not in r.err and "Traceback" not in r.out


def _one_error_line(r: CliResult) -> str:
    """The single stderr line of a failed command (a Landmark3dError), checked for form."""
    assert r.code != 0
    _no_traceback(r)
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("error:"), line
    assert "Fix:" in line, line
    return line


# ---------------------------------------------------------------------------------- help
def test_command_help_is_reflowed_so_the_terminal_wraps_it_once() -> None:
    """Docstrings are hard-wrapped at 100 columns; Typer's rich mode keeps every newline, so at
    80 columns each line was wrapped again, leaving fragments like '(done,' on a line."""
    from landmark3d.cli import app
    from landmark3d.cli.app import reflow_help

    assert reflow_help("one\ntwo\n\n- a\n- b") == "one two\n\n- a\n- b"
    for info in app.registered_commands:
        assert info.help, info.callback
        for para in info.help.split("\n\n"):
            lines = para.splitlines()
            assert len(lines) == 1 or any(line.startswith((" ", "-", "*", "|")) for line in lines)


def test_top_level_help_lists_every_command(cli: Cli) -> None:
    r = cli("--help")
    assert r.code == 0
    for name in COMMANDS:
        assert name in r.out, name


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_shows_an_example(cli: Cli, command: str) -> None:
    r = cli(command, "--help")
    assert r.code == 0, r.err
    assert "Example" in r.out
    assert f"landmark3d {command}" in r.out


def test_version(cli: Cli) -> None:
    from landmark3d import __version__

    r = cli("--version")
    assert r.code == 0
    assert __version__ in r.out


# ---------------------------------------------------------------------------------- phantom
def test_phantom_writes_a_dataset_and_refuses_to_overwrite_it(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "ph"
    r = cli("phantom", "--out", out, "--cases", "3", "--size", "32", "--seed", "1")
    assert r.code == 0, r.err
    ds = load_dataset(out)
    assert ds.case_ids == ["case000", "case001", "case002"]
    assert len(ds.folds) == 3
    for case in ds.cases:
        assert case.image.is_file() and case.landmarks is not None and case.landmarks.is_file()
        assert len(ds.read_landmarks(case.id).names) == 6
    before = (out / "dataset.json").read_bytes()

    again = cli("phantom", "--out", out, "--cases", "3", "--size", "32", "--seed", "2")
    line = _one_error_line(again)
    assert "--overwrite" in line and str(out) in line
    assert (out / "dataset.json").read_bytes() == before


# ---------------------------------------------------------------------------------- verify
def test_verify_accepts_the_phantom(cli: Cli, phantom_dir: Path) -> None:
    r = cli("verify", phantom_dir)
    assert r.code == 0, r.out + r.err
    assert "0 error(s)" in r.out


def _empty_image(d: Path) -> tuple[Path, str, str]:
    path = d / "images" / "case001.nii.gz"
    path.write_bytes(b"")
    return path, "image file is empty", "export it again"


def _nan_voxels(d: Path) -> tuple[Path, str, str]:
    # .mha keeps NaN (ITK's NIfTI reader turns NaN into 0)
    image = sitk.ReadImage(str(d / "images" / "case001.nii.gz"), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(image)
    arr[3, 4, 5] = np.nan
    broken = sitk.GetImageFromArray(arr)
    broken.CopyInformation(image)
    path = d / "images" / "case001.mha"
    sitk.WriteImage(broken, str(path))
    spec = json.loads((d / "dataset.json").read_text())
    assert spec["cases"][1]["id"] == "case001"
    spec["cases"][1]["image"] = "images/case001.mha"
    (d / "dataset.json").write_text(json.dumps(spec, indent=2))
    return path, "not finite", "replace the non-finite voxels"


def _ras_claiming_lps(d: Path) -> tuple[Path, str, str]:
    """Rewrite a case's landmarks with RAS numbers under an LPS header."""
    ds = load_dataset(d)
    for case in ds.cases:
        truth = ds.read_landmarks(case.id)
        as_ras = truth.coords * np.array([-1.0, -1.0, 1.0])
        if not Geometry.from_sitk(ds.read_image(case.id)).contains_world(as_ras).all():
            break
    else:  # pragma: no cover - depends on the phantom's poses
        raise AssertionError("no phantom case where RAS numbers fall outside the image")
    assert case.landmarks is not None
    wrong = LandmarkSet(list(truth.names), as_ras)
    write_landmarks(wrong, case.landmarks, coords="LPS")  # states LPS, holds RAS numbers
    return case.landmarks, "outside the image", "probably RAS"


def _unknown_landmark_name(d: Path) -> tuple[Path, str, str]:
    path = d / "landmarks" / "case001.fcsv"
    text = path.read_text()
    assert ",nasion," in text
    path.write_text(text.replace(",nasion,", ",nasoin,"))
    return path, "Did you mean 'nasion'?", "rename it in the landmark file"


def _missing_landmark_file(d: Path) -> tuple[Path, str, str]:
    path = d / "landmarks" / "case001.fcsv"
    path.unlink()
    return path, "landmark file not found", 'check "landmarks"'


BREAKERS = {
    "empty_image": _empty_image,
    "nan_voxels": _nan_voxels,
    "ras_claiming_lps": _ras_claiming_lps,
    "unknown_landmark_name": _unknown_landmark_name,
    "missing_landmark_file": _missing_landmark_file,
}


@pytest.mark.parametrize("kind", list(BREAKERS))
def test_verify_reports_a_broken_copy_in_one_line(
    cli: Cli, phantom_dir: Path, tmp_path: Path, kind: str
) -> None:
    d = tmp_path / "broken"
    shutil.copytree(phantom_dir, d)
    path, message, fix = BREAKERS[kind](d)

    r = cli("verify", d)
    assert r.code == 1, r.out + r.err
    _no_traceback(r)
    lines = [ln for ln in r.out.splitlines() if ln.startswith("error") and path.name in ln]
    assert len(lines) == 1, r.out
    line = lines[0]
    assert str(path) in line, line
    assert message in line, line
    assert "Fix:" in line and fix in line.split("Fix:", 1)[1], line
    assert "1 error(s)" in r.out


def test_verify_json_report(cli: Cli, phantom_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "broken"
    shutil.copytree(phantom_dir, d)
    path, _, _ = _missing_landmark_file(d)
    report_path = tmp_path / "report.json"
    r = cli("verify", d, "--json", report_path)
    assert r.code == 1
    report = json.loads(report_path.read_text())
    assert report["ok"] is False and report["n_errors"] == 1
    assert [p["path"] for p in report["problems"] if p["severity"] == "error"] == [str(path)]


# ---------------------------------------------------------------------------------- errors
def _bad_inputs(root: Path, data: Path) -> dict[str, tuple[list[str], str]]:
    """Commands failing on bad input: argv and a text the one error line must contain."""
    r, d = str(root), str(data)
    return {
        "missing_dataset": (["verify", f"{r}/nope"], f"{r}/nope"),
        "unknown_config": (
            ["train", "--config", "phantom_dem", "--dataset", d, "--out", f"{r}/x"],
            "phantom_dem",
        ),
        "bad_override": (
            ["train", "--config", "phantom_demo", "--dataset", d, "--out", f"{r}/x",
             "--set", "fine.epoch=3"],
            "fine.epoch",
        ),
        "not_a_run": (
            ["predict", "--model", r, "--input", f"{d}/images", "--out", f"{r}/p"],
            "not a landmark3d run directory",
        ),
        "missing_pred_dir": (
            ["evaluate", "--pred", f"{r}/nope", "--truth", d], f"{r}/nope"
        ),
        "bad_fold": (["plan", d, "--fold", "7"], "fold 7 does not exist"),
    }  # fmt: skip


BAD_INPUTS = (
    "missing_dataset", "unknown_config", "bad_override", "not_a_run", "missing_pred_dir",
    "bad_fold",
)  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_1(
    cli: Cli, phantom_dir: Path, tmp_path: Path, case: str
) -> None:
    argv, expected = _bad_inputs(tmp_path, phantom_dir)[case]
    r = cli(*argv)
    assert r.code == 1
    line = _one_error_line(r)
    assert expected in line, line
    assert not (tmp_path / "x").exists()  # nothing was created on the way to the error
    assert not (tmp_path / "p").exists()


def test_error_line_shows_paths_verbatim(cli: Cli, tmp_path: Path) -> None:
    """Square brackets in a message are text, not console markup."""
    odd = tmp_path / "[bold]scans"
    line = _one_error_line(cli("verify", odd))
    assert str(odd) in line


def test_config_errors_suggest_the_closest_name(
    cli: Cli, phantom_dir: Path, tmp_path: Path
) -> None:
    bad = _bad_inputs(tmp_path, phantom_dir)
    assert "phantom_demo" in _one_error_line(cli(*bad["unknown_config"][0]))
    assert "'epochs'" in _one_error_line(cli(*bad["bad_override"][0]))


@pytest.mark.parametrize(
    "argv",
    [
        ["phantom", "--out", "x", "--cases", "1"],  # below the minimum
        ["predict", "--model", "m"],  # required --out missing
        ["evaluate", "--pred", "p", "--truth", "t", "--no-such-option"],
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2_without_traceback(cli: Cli, argv: list[str]) -> None:
    r = cli(*argv)
    assert r.code == 2
    _no_traceback(r)
    assert "Error" in r.err


def test_debug_raises_instead_of_printing(cli: Cli, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        cli("--debug", "verify", tmp_path / "nope")


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "landmark3d"
    return [str(script)] if script.exists() else [sys.executable, "-m", "landmark3d.cli"]


def test_installed_script_traceback_only_with_debug(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    plain = subprocess.run(
        [*_console_script(), "verify", missing], capture_output=True, text=True, timeout=120
    )
    assert plain.returncode == 1
    assert "Traceback" not in plain.stderr
    lines = [ln for ln in plain.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and missing in lines[0] and "Fix:" in lines[0], plain.stderr

    debug = subprocess.run(
        [*_console_script(), "--debug", "verify", missing],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "DatasetError" in debug.stderr


# ---------------------------------------------------------------------------------- evaluate
def _shifted_predictions(dataset: Path, out: Path, shift_mm: np.ndarray) -> list[str]:
    """Write every case's truth shifted by ``shift_mm`` as ``<case>.json``; the case ids."""
    ds = load_dataset(dataset)
    out.mkdir()
    for cid in ds.case_ids:
        truth = ds.read_landmarks(cid)
        write_landmarks(
            LandmarkSet(list(truth.names), truth.coords + shift_mm), out / f"{cid}.json"
        )
    return ds.case_ids


def test_evaluate_three_mm_shift(cli: Cli, phantom_dir: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    ids = _shifted_predictions(phantom_dir, pred, np.array([0.0, 0.0, 3.0]))

    r = cli("evaluate", "--pred", pred, "--truth", phantom_dir)
    assert r.code == 0, r.err
    assert "3.00" in r.out
    metrics = json.loads((pred / "metrics.json").read_text())
    s = metrics["summary"]
    assert s["n_cases"] == len(ids) and s["n_evaluated"] == 6 * len(ids)
    assert s["n_missing_prediction"] == 0
    assert s["mre"] == pytest.approx(3.0, abs=1e-9)
    assert f"{s['mre']:.3f}" == "3.000"
    assert s["sd"] == pytest.approx(0.0, abs=1e-9)
    assert s["sdr"]["2"] == 0.0
    assert s["sdr"]["4"] == 100.0
    assert (pred / "metrics.csv").is_file()

    # a second run refuses to replace the results and leaves them as they were
    json_before = (pred / "metrics.json").read_bytes()
    csv_before = (pred / "metrics.csv").read_bytes()
    again = cli("evaluate", "--pred", pred, "--truth", phantom_dir)
    line = _one_error_line(again)
    assert "metrics.json" in line and "--overwrite" in line
    assert (pred / "metrics.json").read_bytes() == json_before
    assert (pred / "metrics.csv").read_bytes() == csv_before

    forced = cli("evaluate", "--pred", pred, "--truth", phantom_dir, "--overwrite")
    assert forced.code == 0, forced.err


def test_evaluate_prints_its_warnings_and_refuses_when_nothing_matches(
    cli: Cli, phantom_dir: Path, tmp_path: Path
) -> None:
    """Files named after something other than the case ids: every one is reported, and a
    directory where none matches fails instead of printing a table of dashes."""
    pred = tmp_path / "pred"
    ids = _shifted_predictions(phantom_dir, pred, np.array([1.0, 0.0, 0.0]))
    (pred / f"{ids[0]}.json").rename(pred / "subj001.json")
    r = cli("evaluate", "--pred", pred, "--truth", phantom_dir)
    assert r.code == 0, r.err
    assert "warning: subj001.json: no case 'subj001'" in r.err
    assert f"no prediction file for 1 case(s): {ids[0]}" in r.err

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, f in enumerate(sorted(pred.glob("*.json"))):
        if f.name != "metrics.json":
            f.rename(renamed / f"subj{i:03d}.json")
    line = _one_error_line(cli("evaluate", "--pred", renamed, "--truth", phantom_dir))
    assert "no prediction file here names one of the" in line and "subj000.json" in line
    assert not (renamed / "metrics.json").exists()


def test_warnings_are_one_line_without_python_source_locations(
    cli: Cli, phantom_dir: Path, tmp_path: Path
) -> None:
    """A reader's warning (here: an .fcsv without '# CoordinateSystem', read as RAS) shows as
    one 'warning:' line, not Python's 'file.py:118: LandmarkWarning' plus the source line."""
    pred = tmp_path / "pred"
    ids = _shifted_predictions(phantom_dir, pred, np.array([1.0, 0.0, 0.0]))
    truth = read_landmarks(pred / f"{ids[0]}.json")
    fcsv = pred / f"{ids[0]}.fcsv"
    write_landmarks(truth, fcsv, coords="RAS")
    fcsv.write_text(fcsv.read_text().replace("# CoordinateSystem = RAS\n", ""))
    (pred / f"{ids[0]}.json").unlink()
    r = cli("evaluate", "--pred", pred, "--truth", phantom_dir)
    assert r.code == 0, r.err
    lines = [line for line in r.err_lines if "CoordinateSystem" in line]
    assert lines and lines[0].startswith("warning: ") and "assuming RAS" in lines[0]
    assert "LandmarkWarning" not in r.err and "warnings.warn" not in r.err


def test_evaluate_one_fold_into_another_directory(
    cli: Cli, phantom_dir: Path, tmp_path: Path
) -> None:
    pred, out = tmp_path / "pred", tmp_path / "metrics"
    _shifted_predictions(phantom_dir, pred, np.array([1.0, 0.0, 0.0]))
    out.mkdir()
    r = cli("evaluate", "--pred", pred, "--truth", phantom_dir, "--fold", "1", "--out", out)
    assert r.code == 0, r.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cases"] == load_dataset(phantom_dir).split(1)[1]
    assert metrics["summary"]["sdr"]["2"] == 100.0
    assert not (pred / "metrics.json").exists()
