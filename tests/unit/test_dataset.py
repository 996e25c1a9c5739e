"""Dataset specs: dataset.json and the original layout, folds, writing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from landmark3d.data.dataset import (
    CaseSpec,
    Dataset,
    closest_match,
    load_dataset,
    stated_coordinate_system,
    write_dataset_spec,
)
from landmark3d.errors import DatasetError, OutputExistsError
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import write_landmarks

NAMES = ["chin", "mand_l", "mand_r", "odont_proc", "occ_bone"]
BASE = np.array(
    [[16.0, 10.0, 0.0], [22.0, 16.0, 4.0], [10.0, 16.0, 4.0], [16.0, 20.0, -4.0], [16.0, 24.0, 8.0]]
)


def points(i: int) -> np.ndarray:
    """LPS mm landmarks of case ``i`` (inside the test image, outside when x, y are negated)."""
    return BASE + 0.5 * i


def write_image(path: Path, size: int = 16) -> Path:
    arr = np.random.default_rng(0).normal(size=(size, size, size)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 2.0))
    img.SetOrigin((5.0, 5.0, -10.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def make_spec(root: Path, n: int = 4, suffix: str = ".csv", **overrides: object) -> Path:
    """A dataset.json dataset of ``n`` cases; returns the spec path."""
    cases = []
    for i in range(n):
        cid = f"c{i}"
        write_image(root / "images" / f"{cid}.nii.gz")
        lm = root / "landmarks" / f"{cid}{suffix}"
        lm.parent.mkdir(parents=True, exist_ok=True)
        write_landmarks(LandmarkSet(NAMES, points(i)), lm)
        cases.append(
            {"id": cid, "image": f"images/{cid}.nii.gz", "landmarks": f"landmarks/{cid}{suffix}"}
        )
    half = n // 2
    spec: dict[str, object] = {
        "name": "toy",
        "modality": "CT",
        "landmarks": NAMES,
        "cases": cases,
        "folds": [[f"c{i}" for i in range(half)], [f"c{i}" for i in range(half, n)]],
        "correlated_groups": [{"landmarks": ["chin", "occ_bone"]}],
    }
    spec.update(overrides)
    path = root / "dataset.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def make_original(root: Path, n: int = 6, system: str | None = "RAS", extra_rows: str = "") -> Path:
    """The original layout: images/, setup/landmark.csv (in ``system``), setup/cv0..cv2."""
    lines = [] if system is None else [f"# CoordinateSystem = {system}"]
    lines.append("case,landmark,x,y,z")
    for i in range(n):
        write_image(root / "images" / f"case{i + 1}.nii.gz")
        pts = points(i) if system != "RAS" else points(i) * [-1, -1, 1]
        lines += [
            f"case{i + 1},{name},{p[0]},{p[1]},{p[2]}" for name, p in zip(NAMES, pts, strict=True)
        ]
    (root / "setup").mkdir(parents=True)
    (root / "setup" / "landmark.csv").write_text("\n".join(lines) + "\n" + extra_rows)
    per = n // 3
    for k in range(3):
        ids = [f"case{i + 1}" for i in range(k * per, (k + 1) * per)]
        (root / "setup" / f"cv{k}").write_text("# held out\n\n" + "\n".join(ids) + "\n")
    return root


# ---------------------------------------------------------------------------- dataset.json
def test_load_spec_file_and_directory(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, description="toy data")
    for ds in (load_dataset(spec), load_dataset(tmp_path)):
        assert ds.name == "toy" and ds.modality == "CT" and ds.layout == "spec"
        assert ds.landmark_names == NAMES
        assert ds.case_ids == ["c0", "c1", "c2", "c3"]
        assert ds.extra == {"description": "toy data"}
        assert ds.correlated_groups == [{"landmarks": ["chin", "occ_bone"]}]
        c1 = ds.case("c1")
        assert c1.image.is_absolute() and c1.image == tmp_path / "images" / "c1.nii.gz"
        assert c1.landmarks == tmp_path / "landmarks" / "c1.csv"
        ls = ds.read_landmarks("c1")
        assert ls.names == NAMES
        np.testing.assert_allclose(ls.coords, points(1))
        assert ds.read_image(c1).GetSize() == (16, 16, 16)


def test_read_landmarks_orders_and_fills_missing(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, n=2)
    lm = tmp_path / "landmarks" / "c0.csv"
    write_landmarks(LandmarkSet(["occ_bone", "chin"], points(0)[[4, 0]]), lm)
    ls = load_dataset(spec).read_landmarks("c0")
    assert ls.names == NAMES
    np.testing.assert_allclose(ls.coords[[0, 4]], points(0)[[0, 4]])
    assert ls.is_missing("mand_l") and ls.missing_reason["mand_l"] == "not annotated"


def test_read_landmarks_unknown_name_suggests(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, n=2)
    write_landmarks(
        LandmarkSet(["chinn", "mand_l"], points(0)[:2]), tmp_path / "landmarks" / "c0.csv"
    )
    ds = load_dataset(spec)
    with pytest.raises(DatasetError, match=r"unknown landmark.*'chinn'.*Did you mean 'chin'") as e:
        ds.read_landmarks("c0")
    assert e.value.path == tmp_path / "landmarks" / "c0.csv"
    assert "occ_bone" in str(e.value)  # the known list is given


def test_unknown_case_suggests(tmp_path: Path) -> None:
    ds = load_dataset(make_spec(tmp_path, n=2))
    with pytest.raises(DatasetError, match="Did you mean 'c1'"):
        ds.case("C1x")


def test_split(tmp_path: Path) -> None:
    ds = load_dataset(make_spec(tmp_path, n=6, folds=[["c4", "c0"], ["c1", "c3"], ["c2"]]))
    assert ds.split(0) == (["c1", "c2", "c3"], ["c0", "c4"])
    assert ds.split(2) == (["c0", "c1", "c3", "c4"], ["c2"])
    assert ds.fold_of("c3") == 1 and ds.fold_of("c5") is None
    assert "c5" not in ds.split(1)[0]  # cases in no fold take no part
    with pytest.raises(DatasetError, match=r"folds 0\.\.2"):
        ds.split(3)
    no_folds = load_dataset(make_spec(tmp_path / "b", n=2, folds=[]))
    with pytest.raises(DatasetError, match="no cross-validation folds"):
        no_folds.split(0)


def test_dataset_coordinate_system_is_a_default(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, n=2, coordinate_system="RAS")
    ras = points(0) * [-1, -1, 1]
    rows = "\n".join(f"{n},{p[0]},{p[1]},{p[2]}" for n, p in zip(NAMES, ras, strict=True))
    (tmp_path / "landmarks" / "c0.csv").write_text("name,x,y,z\n" + rows + "\n")  # no header
    ds = load_dataset(spec)
    np.testing.assert_allclose(ds.read_landmarks("c0").coords, points(0))
    # c1's file states LPS: the dataset default does not override (nor conflict with) it.
    np.testing.assert_allclose(ds.read_landmarks("c1").coords, points(1))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"landmark": ["chin"]}, r"unknown key 'landmark'\. Did you mean 'landmarks'"),
        ({"fold": []}, "Did you mean 'folds'"),
        ({"modality": "PET"}, "modality 'PET'"),
        ({"coordinate_system": "XYZ"}, "not LPS or RAS"),
        ({"landmarks": ["a", "a"]}, "listed twice"),
        ({"folds": [["c0", "nope"]]}, "'nope', which is not a case"),
        ({"folds": [["c0"], ["c1", "c0"]]}, "case 'c0' is in fold 0 and in fold 1"),
        ({"folds": [["c0", "c0"]]}, "twice"),
        ({"folds": "c0"}, "list of lists"),
        ({"correlated_groups": [{"landmarks": ["chin", "ocb_bone"]}]}, "Did you mean 'occ_bone'"),
        ({"name": ""}, '"name" must be'),
    ],
)
def test_malformed_spec(tmp_path: Path, change: dict[str, object], pattern: str) -> None:
    spec = make_spec(tmp_path, n=2, **change)
    with pytest.raises(DatasetError, match=pattern) as e:
        load_dataset(spec)
    assert e.value.path == spec and e.value.fix


def test_malformed_spec_structure(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, n=2)
    data = json.loads(spec.read_text())
    del data["modality"]
    spec.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"missing required key.*modality"):
        load_dataset(spec)
    data["modality"] = "mri"
    data["cases"].append(dict(data["cases"][0]))
    spec.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="case id 'c0' appears twice"):
        load_dataset(spec)
    data["cases"][-1] = {"id": "c9", "imgae": "x.nii.gz"}
    spec.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="Did you mean 'image'"):
        load_dataset(spec)
    spec.write_text('{\n  "name": "toy",\n  "modality": "CT",\n  oops\n}')
    with pytest.raises(DatasetError, match="not valid JSON") as e:
        load_dataset(spec)
    assert e.value.line == 4
    spec.write_text('{"name": "a", "name": "b"}')
    with pytest.raises(DatasetError, match="'name' appears twice"):
        load_dataset(spec)


def test_modality_mri_and_unannotated_case(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, n=2)
    data = json.loads(spec.read_text())
    data["modality"] = "mri"
    data["cases"].append({"id": "new", "image": "images/c0.nii.gz", "landmarks": None, "site": 3})
    spec.write_text(json.dumps(data))
    ds = load_dataset(spec)
    assert ds.modality == "MR"
    assert not ds.has_landmarks("new") and ds.case("new").extra == {"site": 3}
    with pytest.raises(DatasetError, match="has no landmarks"):
        ds.read_landmarks("new")


def test_load_dataset_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"neither dataset\.json nor"):
        load_dataset(tmp_path)


def test_write_spec_roundtrip(tmp_path: Path) -> None:
    ds = load_dataset(make_spec(tmp_path / "src", n=4, description="d"))
    out = write_dataset_spec(ds, tmp_path / "elsewhere" / "spec.json")
    data = json.loads(out.read_text())
    assert data["cases"][0]["image"] == "../src/images/c0.nii.gz"
    again = load_dataset(out)
    assert again.cases == ds.cases and again.folds == ds.folds
    assert again.extra == {"description": "d"} and again.correlated_groups == ds.correlated_groups
    with pytest.raises(OutputExistsError):
        write_dataset_spec(ds, out)
    write_dataset_spec(ds, out, overwrite=True)
    assert not list(out.parent.glob(".*"))  # no temporary left behind


def test_closest_match_and_stated_system(tmp_path: Path) -> None:
    assert closest_match("Chin", NAMES) == "chin"
    assert closest_match("mand_left", NAMES) in ("mand_l", "mand_r")
    assert closest_match("zzz", NAMES) is None
    cases = {
        "a.csv": "# CoordinateSystem = RAS\nname,x,y,z\n",
        "b.fcsv": "# CoordinateSystem = 1\n",
        "c.mrk.json": '{"markups": [{"coordinateSystem": "LPS"}]}',
        "d.json": '{"coordinate_system": "ras"}',
        "e.csv": "name,x,y,z\n",
    }
    expected = {
        "a.csv": "RAS",
        "b.fcsv": "LPS",
        "c.mrk.json": "LPS",
        "d.json": "RAS",
        "e.csv": None,
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert stated_coordinate_system(tmp_path / name) == expected[name], name
    assert stated_coordinate_system(tmp_path / "missing.csv") is None


# ---------------------------------------------------------------------------- original layout
def test_original_layout(tmp_path: Path) -> None:
    ds = load_dataset(make_original(tmp_path, n=6, system="RAS"))
    assert ds.layout == "original" and ds.name == tmp_path.name and ds.modality == "CT"
    assert ds.landmark_names == NAMES
    assert ds.case_ids == [f"case{i}" for i in range(1, 7)]
    assert ds.folds == [["case1", "case2"], ["case3", "case4"], ["case5", "case6"]]
    assert ds.coordinate_system == "RAS"
    c3 = ds.case("case3")
    assert c3.landmarks is None and c3.image == tmp_path / "images" / "case3.nii.gz"
    assert ds.landmark_source(c3) == tmp_path / "setup" / "landmark.csv"
    np.testing.assert_allclose(ds.read_landmarks("case3").coords, points(2))  # RAS -> LPS
    assert ds.split(1) == (["case1", "case2", "case5", "case6"], ["case3", "case4"])


def test_original_layout_details(tmp_path: Path) -> None:
    root = make_original(
        tmp_path, n=3, system="LPS", extra_rows="case1,extra_pt,,,\ncase99,chin,1,2,3\n"
    )
    csv_path = root / "setup" / "landmark.csv"
    csv_path.write_text("# Modality = MR\n" + csv_path.read_text())
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "setup" / "cv1").write_text("case2  # comment\n")
    (root / "setup" / "cv2").write_text("case3\n")
    ds = load_dataset(root)
    assert ds.modality == "MR"
    assert ds.landmark_names == [*NAMES, "extra_pt"]  # order of first appearance
    assert ds.case_ids == ["case1", "case2", "case3", "case99"]
    assert ds.case("case99").image == root / "images" / "case99.nii.gz"  # expected, absent
    ls = ds.read_landmarks("case1")
    assert ls.is_missing("extra_pt") and "landmark.csv" in ls.missing_reason["extra_pt"]
    np.testing.assert_allclose(ls.coords[:5], points(0))
    assert ds.read_landmarks("case2").missing_reason["extra_pt"] == "not annotated"


def test_original_layout_natural_case_order(tmp_path: Path) -> None:
    root = make_original(tmp_path, n=3, system="LPS")
    write_image(root / "images" / "case10.nii")
    assert load_dataset(root).case_ids == ["case1", "case2", "case3", "case10"]


@pytest.mark.parametrize(
    ("edit", "pattern", "line"),
    [
        (
            lambda t: t.replace("# CoordinateSystem = LPS\n", ""),
            "does not say which coordinate system",
            None,
        ),
        (
            lambda t: t.replace("# CoordinateSystem = LPS", "# CoordinateSystem = XYZ"),
            "not LPS or RAS",
            1,
        ),
        (lambda t: t.replace("case,landmark,x,y,z", "id,name,x,y,z"), "header", 2),
        (lambda t: t.replace("case1,chin,16.0", "case1,chin,abc"), "not three finite numbers", 3),
        (lambda t: t + "case1,chin,1,2,3\n", "given twice \\(first on line 3\\)", 18),
        (
            lambda t: t.replace("case1,chin,16.0,10.0,0.0", "case1,chin,16.0,,0.0"),
            "finite numbers",
            3,
        ),
    ],
)
def test_original_layout_bad_csv(
    tmp_path: Path, edit: object, pattern: str, line: int | None
) -> None:
    root = make_original(tmp_path, n=3, system="LPS")
    csv_path = root / "setup" / "landmark.csv"
    csv_path.write_text(edit(csv_path.read_text()))  # type: ignore[operator]
    with pytest.raises(DatasetError, match=pattern) as e:
        load_dataset(root)
    assert e.value.path == csv_path and e.value.line == line and e.value.fix


def test_original_layout_bad_folds(tmp_path: Path) -> None:
    root = make_original(tmp_path, n=3, system="LPS")
    cv1 = root / "setup" / "cv1"
    cv1.write_text("\ncase2\ncase_3\n")
    with pytest.raises(DatasetError, match=r"'case_3' is not a case.*Did you mean 'case3'") as e:
        load_dataset(root)
    assert e.value.path == cv1 and e.value.line == 3
    cv1.write_text("case1\n")
    with pytest.raises(DatasetError, match="already listed in cv0 line 3") as e:
        load_dataset(root)
    assert e.value.line == 1
    cv1.unlink()
    with pytest.raises(DatasetError, match="without gaps"):
        load_dataset(root)
    (root / "setup" / "cv2").unlink()
    assert load_dataset(root).folds == [["case1"]]
    (root / "setup" / "landmark.csv").unlink()
    with pytest.raises(DatasetError, match=r"landmark\.csv is missing"):
        load_dataset(root)


def test_original_layout_to_spec(tmp_path: Path) -> None:
    ds = load_dataset(make_original(tmp_path / "orig", n=3, system="RAS"))
    with pytest.raises(DatasetError, match="held in memory"):
        ds.to_spec_dict()
    out = write_dataset_spec(ds, tmp_path / "converted")
    assert out == tmp_path / "converted" / "dataset.json"
    again = load_dataset(out)
    assert again.folds == ds.folds and again.coordinate_system == "LPS"
    for cid in ds.case_ids:
        assert again.case(cid).landmarks == tmp_path / "converted" / "landmarks" / f"{cid}.mrk.json"
        np.testing.assert_allclose(again.read_landmarks(cid).coords, ds.read_landmarks(cid).coords)
    assert again.case("case2").image == ds.case("case2").image


def test_programmatic_dataset(tmp_path: Path) -> None:
    img = write_image(tmp_path / "a.nii.gz")
    ds = Dataset("p", tmp_path, ["chin"], "CT", [CaseSpec("a", img, None)])
    assert ds.to_spec_dict()["cases"] == [{"id": "a", "image": "a.nii.gz", "landmarks": None}]
    assert ds.folds == [] and ds.coordinate_system is None and ds.layout == "spec"
