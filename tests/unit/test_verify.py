"""verify_dataset: every check triggered by a hand-broken copy of a clean toy dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.data.dataset import CaseSpec, Dataset, load_dataset
from landmark3d.data.verify import Problem, VerifyReport, verify_dataset
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import write_landmarks

NAMES = ["chin", "mand_l", "mand_r", "odont_proc", "occ_bone"]
BASE = np.array(
    [[16.0, 10.0, 0.0], [22.0, 16.0, 4.0], [10.0, 16.0, 4.0], [16.0, 20.0, -4.0], [16.0, 24.0, 8.0]]
)
SPACING, ORIGIN = (1.5, 1.5, 2.0), (5.0, 5.0, -10.0)


def points(i: int) -> np.ndarray:
    """LPS mm landmarks of case ``i``: inside the image, outside when x and y are negated."""
    return BASE + 0.5 * i


def image_array(i: int) -> np.ndarray:
    """Voxels of case ``i`` in SimpleITK [k, j, i] order; values in [i, i + 100]."""
    return (np.arange(16**3, dtype=np.float32).reshape(16, 16, 16) % 101) + i


def write_image(path: Path, arr: np.ndarray, spacing: tuple[float, ...] = SPACING) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(ORIGIN)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def make_spec(root: Path, n: int = 4) -> Path:
    """A clean dataset.json dataset of ``n`` cases (csv landmark files stating LPS)."""
    cases = []
    for i in range(n):
        write_image(root / "images" / f"c{i}.nii.gz", image_array(i))
        lm = root / "landmarks" / f"c{i}.csv"
        lm.parent.mkdir(parents=True, exist_ok=True)
        write_landmarks(LandmarkSet(NAMES, points(i)), lm)
        cases.append(
            {"id": f"c{i}", "image": f"images/c{i}.nii.gz", "landmarks": f"landmarks/c{i}.csv"}
        )
    spec = {
        "name": "toy",
        "modality": "CT",
        "landmarks": NAMES,
        "cases": cases,
        "folds": [[f"c{i}" for i in range(0, n, 2)], [f"c{i}" for i in range(1, n, 2)]],
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(spec))
    return path


def make_original(
    root: Path, n: int = 3, declared: str = "LPS", flip: tuple[int, ...] = ()
) -> Path:
    """A clean original layout; cases in ``flip`` have their x, y negated in landmark.csv."""
    rows = [f"# CoordinateSystem = {declared}", "case,landmark,x,y,z"]
    for i in range(n):
        write_image(root / "images" / f"case{i}.nii.gz", image_array(i))
        pts = points(i) * ([-1, -1, 1] if (declared == "RAS") != (i in flip) else 1)
        rows += [f"case{i},{m},{p[0]},{p[1]},{p[2]}" for m, p in zip(NAMES, pts, strict=True)]
    (root / "setup").mkdir(parents=True)
    (root / "setup" / "landmark.csv").write_text("\n".join(rows) + "\n")
    for k in range(n):
        (root / "setup" / f"cv{k}").write_text(f"case{k}\n")
    return root


def only(report: VerifyReport, severity: str | None = None) -> Problem:
    found = [p for p in report.problems if severity is None or p.severity == severity]
    assert len(found) == 1, [p.message for p in report.problems]
    return found[0]


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return make_spec(tmp_path)


# ---------------------------------------------------------------------------- clean data
def test_clean_spec_dataset_passes(spec: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    report = verify_dataset(load_dataset(spec), progress=lambda d, t, c: calls.append((d, t, c)))
    assert report.ok and report.problems == []
    assert calls == [(1, 4, "c0"), (2, 4, "c1"), (3, 4, "c2"), (4, 4, "c3")]
    s = report.summary
    assert (s.n_cases, s.n_annotated, s.n_folds) == (4, 4, 2)
    np.testing.assert_allclose(s.spacing_median, SPACING)
    np.testing.assert_allclose(s.spacing_min, SPACING)
    assert list(s.size_min) == [16, 16, 16] and list(s.size_max) == [16, 16, 16]
    assert s.intensity_range == (0.0, 103.0)
    assert s.cases[2].intensity == (2.0, 102.0) and s.cases[2].landmarks_present == 5
    chin = s.landmarks[0]
    assert chin.name == "chin" and chin.count == 4
    # x, y, z of chin are 16 + 0.5 i: sample SD of (0, .5, 1, 1.5) per axis
    sd = np.std([0, 0.5, 1.0, 1.5], ddof=1)
    np.testing.assert_allclose(chin.sd_mm, [sd, sd, sd])
    np.testing.assert_allclose(chin.spread_mm, sd * np.sqrt(3))
    np.testing.assert_allclose(chin.mean_mm, BASE[0] + 0.75)
    text = json.dumps(report.to_dict())
    assert '"ok": true' in text and '"spread_mm"' in text


def test_clean_original_layout_passes(tmp_path: Path) -> None:
    report = verify_dataset(load_dataset(make_original(tmp_path, declared="RAS")))
    assert report.ok and report.problems == []


def test_headers_only(spec: Path) -> None:
    lm = spec.parent / "landmarks" / "c1.csv"
    write_landmarks(LandmarkSet(NAMES, points(1) - 100.0), lm, overwrite=True)
    report = verify_dataset(load_dataset(spec), check_images=False)
    assert only(report).case == "c1" and "outside the image" in only(report).message
    assert report.summary.cases[0].intensity is None and report.summary.cases[0].size == (
        16,
        16,
        16,
    )


# ---------------------------------------------------------------------------- images
def use_image(spec: Path, index: int, name: str) -> None:
    data = json.loads(spec.read_text())
    data["cases"][index]["image"] = f"images/{name}"
    spec.write_text(json.dumps(data))


def test_nan_voxel(spec: Path) -> None:
    # ITK's NIfTI reader turns NaN/inf voxels into 0 (verify cannot see them there): use .mha.
    arr = image_array(1)
    arr[3, 4, 5] = np.nan
    write_image(spec.parent / "images" / "c1.mha", arr)
    use_image(spec, 1, "c1.mha")
    report = verify_dataset(load_dataset(spec))
    p = only(report)
    assert not report.ok and p.severity == "error" and p.case == "c1"
    assert "nan" in p.message.lower() and p.fix
    assert report.summary.cases[1].intensity == (1.0, 101.0)  # finite values only


def test_zero_spacing_mha(spec: Path) -> None:
    # ITK refuses zero/negative spacing in memory; in a MetaImage header it can be written by
    # hand (a negative one is read back as a flipped direction, zero cannot be read at all).
    mha = spec.parent / "images" / "c2.mha"
    write_image(mha, image_array(2))
    mha.write_bytes(
        mha.read_bytes().replace(b"ElementSpacing = 1.5 1.5 2", b"ElementSpacing = 1.5 0 2")
    )
    use_image(spec, 2, "c2.mha")
    p = only(verify_dataset(load_dataset(spec)))
    assert p.severity == "error" and p.case == "c2" and p.path == mha
    assert "cannot read the image" in p.message


def test_empty_and_missing_image(spec: Path) -> None:
    (spec.parent / "images" / "c0.nii.gz").write_bytes(b"")
    (spec.parent / "images" / "c3.nii.gz").unlink()
    report = verify_dataset(load_dataset(spec))
    assert [(p.case, p.severity) for p in report.problems] == [("c0", "error"), ("c3", "error")]
    assert "empty" in report.problems[0].message
    assert "not found" in report.problems[1].message and '"image"' in report.problems[1].fix


def test_garbage_image(spec: Path) -> None:
    (spec.parent / "images" / "c0.nii.gz").write_bytes(b"this is not an image" * 10)
    p = only(verify_dataset(load_dataset(spec)))
    assert p.case == "c0" and "cannot read the image" in p.message


# ---------------------------------------------------------------------------- landmarks
def test_ras_lps_swap_detected(spec: Path) -> None:
    lm = spec.parent / "landmarks" / "c2.csv"
    # Values are RAS, but the file says LPS: they land on the wrong side of the body.
    write_landmarks(LandmarkSet(NAMES, points(2) * [-1, -1, 1]), lm, overwrite=True)
    p = only(verify_dataset(load_dataset(spec)))
    assert p.severity == "error" and p.case == "c2" and p.path == lm
    assert "5 of 5 landmarks lie outside" in p.message and "RAS <-> LPS" in p.message
    assert "probably RAS: set '# CoordinateSystem = RAS'" in p.fix
    assert p.code == "landmarks_mirrored"
    lm.write_text(lm.read_text().replace("CoordinateSystem = LPS", "CoordinateSystem = RAS"))
    assert verify_dataset(load_dataset(spec)).ok  # the suggested fix works


def test_training_refuses_mirrored_landmarks_but_not_a_cropped_scan(
    spec: Path, tmp_path: Path
) -> None:
    """`train` on a case whose landmarks are certainly mirrored fails before writing anything
    (verify's error, and where to see them all); landmarks merely outside the image (a
    cropped scan, trained as absent) are not refused."""
    from landmark3d.config import load_config
    from landmark3d.data.verify import coordinate_mistakes
    from landmark3d.engine.run import train_run
    from landmark3d.errors import DatasetError

    ids = ["c0", "c1", "c2", "c3"]
    lm = spec.parent / "landmarks"
    cropped = points(1).copy()
    cropped[0] = [16.0, 10.0, 500.0]  # beyond the top of the image, not mirrored
    write_landmarks(LandmarkSet(NAMES, cropped), lm / "c1.csv", overwrite=True)
    assert coordinate_mistakes(load_dataset(spec), ids) == []
    write_landmarks(LandmarkSet(NAMES, points(2) * [-1, -1, 1]), lm / "c2.csv", overwrite=True)
    (mistake,) = coordinate_mistakes(load_dataset(spec), ids)
    assert mistake.case == "c2" and mistake.code == "landmarks_mirrored"
    run = tmp_path / "run"
    with pytest.raises(DatasetError) as info:
        train_run(load_dataset(spec), load_config("phantom_demo"), run, fold=None, progress=False)
    assert "case 'c2'" in str(info.value) and "RAS <-> LPS" in str(info.value)
    assert "landmark3d verify" in str(info.value.fix) and "CoordinateSystem = RAS" in str(
        info.value.fix
    )
    assert not run.exists()  # refused before the run directory was made


def test_ras_lps_swap_mrk_json(spec: Path) -> None:
    lm = spec.parent / "landmarks" / "c1.mrk.json"
    write_landmarks(LandmarkSet(NAMES, points(1)), lm, coords="LPS")
    lm.write_text(lm.read_text().replace('"coordinateSystem": "LPS"', '"coordinateSystem": "RAS"'))
    data = json.loads(spec.read_text())
    data["cases"][1]["landmarks"] = "landmarks/c1.mrk.json"
    spec.write_text(json.dumps(data))
    p = only(verify_dataset(load_dataset(spec)))
    assert 'probably LPS: set "coordinateSystem": "LPS"' in p.fix


def test_misspelt_case_in_landmark_csv_suggests_the_image_that_exists(tmp_path: Path) -> None:
    root = make_original(tmp_path, n=3)
    csv = root / "setup" / "landmark.csv"
    csv.write_text(csv.read_text().replace("\ncase1,", "\ncase_1,"))
    report = verify_dataset(load_dataset(root), check_images=False)
    (missing,) = [p for p in report.problems if "image file not found" in p.message]
    assert missing.case == "case_1" and "Did you mean 'case1'?" in missing.message


def test_ras_lps_swap_original_layout(tmp_path: Path) -> None:
    report = verify_dataset(load_dataset(make_original(tmp_path, declared="LPS", flip=(1,))))
    p = only(report)
    assert p.case == "case1" and p.path == tmp_path / "setup" / "landmark.csv"
    assert "set '# CoordinateSystem = RAS' in landmark.csv" in p.fix


def test_voxel_indices_detected(spec: Path) -> None:
    idx = np.array(
        [[3.0, 4.0, 5.0], [7.0, 8.0, 2.0], [1.0, 1.0, 1.0], [2.0, 9.0, 3.0], [4.0, 4.0, 4.0]]
    )
    write_landmarks(LandmarkSet(NAMES, idx), spec.parent / "landmarks" / "c0.csv", overwrite=True)
    p = only(verify_dataset(load_dataset(spec)))
    assert "look like indices" in p.message and "mm" in p.fix


def test_outside_without_diagnosis(spec: Path) -> None:
    pts = points(0)
    pts[1] = [500.0, 500.0, 500.0]
    write_landmarks(LandmarkSet(NAMES, pts), spec.parent / "landmarks" / "c0.csv", overwrite=True)
    p = only(verify_dataset(load_dataset(spec)))
    assert p.message == "1 of 5 landmarks lie outside the image: mand_l."
    assert "belongs to this image" in p.fix


def test_unknown_landmark_name(spec: Path) -> None:
    names = ["chin", "mand_l", "mand_r", "odont_proc", "occ_bon"]
    write_landmarks(
        LandmarkSet(names, points(3)), spec.parent / "landmarks" / "c3.csv", overwrite=True
    )
    report = verify_dataset(load_dataset(spec))
    err = only(report, "error")
    assert err.case == "c3" and "unknown landmark 'occ_bon'" in err.message
    assert "Did you mean 'occ_bone'" in err.message
    warn = only(report, "warning")  # occ_bone itself is then missing
    assert warn.case == "c3" and "missing landmark(s): occ_bone" in warn.message


def test_duplicate_landmark_names(spec: Path) -> None:
    lm = spec.parent / "landmarks" / "c1.csv"
    lm.write_text(lm.read_text() + "chin,16,10,0\n")
    p = only(verify_dataset(load_dataset(spec)))
    assert (
        p.severity == "error" and p.case == "c1" and "duplicate landmark name 'chin'" in p.message
    )


def test_missing_landmark(spec: Path) -> None:
    pts = points(0)
    pts[2] = np.nan
    write_landmarks(LandmarkSet(NAMES, pts), spec.parent / "landmarks" / "c0.csv", overwrite=True)
    report = verify_dataset(load_dataset(spec))
    p = only(report)
    assert report.ok and p.severity == "warning" and p.case == "c0"
    assert "mand_r" in p.message and "annotated in 3 of 3 other cases" in p.message


def test_differing_landmark_set(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    data = json.loads(spec.read_text())
    data["landmarks"] = [*NAMES, "extra"]
    spec.write_text(json.dumps(data))
    ls = LandmarkSet([*NAMES, "extra"], np.vstack([points(1), [[16.0, 16.0, 0.0]]]))
    write_landmarks(ls, tmp_path / "landmarks" / "c1.csv", overwrite=True)
    report = verify_dataset(load_dataset(spec))
    assert report.ok
    differs = [p for p in report.problems if "differs from the rest" in p.message]
    assert len(differs) == 1 and differs[0].case == "c1"
    assert "extra (only 1 of 4 cases)" in differs[0].message
    missing = [p.case for p in report.problems if "missing landmark" in p.message]
    assert missing == ["c0", "c2", "c3"]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (None, "landmark file not found"),
        ("", "landmark file is empty"),
        ("name,x,y,z\nchin,1,2\n", "landmarks unreadable (line 2)"),
    ],
)
def test_bad_landmark_file(spec: Path, content: str | None, pattern: str) -> None:
    lm = spec.parent / "landmarks" / "c2.csv"
    if content is None:
        lm.unlink()
    else:
        lm.write_text(content)
    p = only(verify_dataset(load_dataset(spec)))
    assert p.severity == "error" and p.case == "c2" and pattern in p.message and p.fix


def test_reader_warning_becomes_problem(spec: Path) -> None:
    lm = spec.parent / "landmarks" / "c0.fcsv"
    write_landmarks(LandmarkSet(NAMES, points(0)), lm, coords="RAS")
    lm.write_text(lm.read_text().replace("# CoordinateSystem = RAS\n", ""))
    data = json.loads(spec.read_text())
    data["cases"][0]["landmarks"] = "landmarks/c0.fcsv"
    spec.write_text(json.dumps(data))
    p = only(verify_dataset(load_dataset(spec)))
    assert p.severity == "warning" and "assuming RAS" in p.message


# ---------------------------------------------------------------------------- folds
def test_fold_problems(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    ds = load_dataset(spec)
    unannotated = CaseSpec("u", ds.cases[0].image, None)
    ds.cases.append(unannotated)
    ds.folds = [["c0", "c1", "ghost"], ["c1", "u"]]
    report = verify_dataset(ds)
    messages = [(p.severity, p.case, p.message) for p in report.problems]
    assert ("error", None, "fold 0 lists 'ghost', which is not a case.") in messages
    assert ("error", None, "case 'c1' is in fold 0 and in fold 1.") in messages
    assert any(
        s == "error" and c == "u" and "fold 1 but has no landmarks" in m for s, c, m in messages
    )
    assert any(s == "warning" and "c2, c3" in m and "no fold" in m for s, _, m in messages)
    ds.folds = []
    report = verify_dataset(ds)
    assert report.ok
    assert (
        next(p.message for p in report.problems if p.case is None) == "no cross-validation folds."
    )
    assert any("no landmarks and are in no fold: u" in p.message for p in report.problems)


def test_everything_broken_never_raises(tmp_path: Path) -> None:
    ds = Dataset(
        "broken",
        tmp_path,
        ["a", "a"],
        "CT",
        [CaseSpec("x", tmp_path / "no.nii.gz", tmp_path / "no.csv"), CaseSpec("x", tmp_path, None)],
        folds=[[]],
        correlated_groups=[{"landmarks": ["b"]}],
    )
    report = verify_dataset(ds)
    assert not report.ok
    text = " ".join(p.message for p in report.problems)
    for expected in ("'a' appears more than once", "'x' appears more than once", "fold 0 is empty"):
        assert expected in text
    assert "unknown landmark 'b'" in text
    json.dumps(report.to_dict())
