"""Tests of landmark file reading/writing: .fcsv, .mrk.json, .csv, .json in LPS and RAS."""

from __future__ import annotations

import json
import string
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from landmark3d.errors import LandmarkFileError, OutputExistsError
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import (
    LANDMARK_FORMATS,
    MISSING_IN_FILE,
    LandmarkWarning,
    landmark_format,
    read_landmarks,
    write_landmarks,
)

SUFFIX = {"fcsv": ".fcsv", "mrk.json": ".mrk.json", "csv": ".csv", "json": ".json"}

# A realistic file as 3D Slicer 5.x writes it: two trailing unlabelled columns (position
# status 2 = defined, 3 = missing), a quoted label and a quoted description with commas.
SLICER5_FCSV = """\
# Markups fiducial file version = 5.6
# CoordinateSystem = LPS
# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID
1,-12.5,34.25,-101.0,0,0,0,1,1,1,0,nasion,,vtkMRMLScalarVolumeNode1,2,0
2,30.125,-5.5,88.75,0,0,0,1,1,1,0,"sella, turcica","pituitary fossa, midline",\
vtkMRMLScalarVolumeNode1,2,0
3,0,0,0,0,0,0,1,1,1,0,menton,,vtkMRMLScalarVolumeNode1,3,0
4,1.5e1,-2.0,3,0,0,0,1,1,1,0,gonion_L,confidence=0.875;model=unet,,2,0
"""

SLICER5_MRK_JSON = """\
{
    "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/\
Markups/Resources/Schema/markups-schema-v1.0.3.json#",
    "markups": [
        {
            "type": "Fiducial",
            "coordinateSystem": "RAS",
            "coordinateUnits": "mm",
            "locked": false,
            "fixedNumberOfControlPoints": false,
            "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": 3,
            "controlPoints": [
                {
                    "id": "1",
                    "label": "porion_L",
                    "description": "",
                    "associatedNodeID": "vtkMRMLScalarVolumeNode1",
                    "position": [61.2, -10.5, -20.25],
                    "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                    "selected": true,
                    "locked": false,
                    "visibility": true,
                    "positionStatus": "defined"
                },
                {
                    "id": "2",
                    "label": "porion_R",
                    "description": "",
                    "associatedNodeID": "vtkMRMLScalarVolumeNode1",
                    "position": [0.0, 0.0, 0.0],
                    "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                    "selected": true,
                    "locked": false,
                    "visibility": true,
                    "positionStatus": "missing"
                },
                {
                    "id": "3",
                    "label": "orbitale_L",
                    "description": "confidence=0.75",
                    "associatedNodeID": "",
                    "position": [40.0, 55.5, 2.0],
                    "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                    "selected": false,
                    "locked": true,
                    "visibility": true,
                    "positionStatus": "defined"
                }
            ],
            "measurements": [],
            "display": {
                "visibility": true,
                "opacity": 1.0,
                "color": [0.4, 1.0, 1.0],
                "selectedColor": [1.0, 0.5000076295109484, 0.5000076295109484],
                "glyphType": "Sphere3D",
                "glyphScale": 3.0,
                "pointLabelsVisibility": true
            }
        }
    ]
}
"""

VALID_CSV = "# CoordinateSystem = LPS\nname,x,y,z,confidence\nA,1,2,3,0.5\nB,,,,\n"
VALID_JSON = (
    '{"coordinate_system": "RAS", "units": "mm", "landmarks": {"A": [1, 2, 3], "B": null},'
    ' "extras": {"A": {"confidence": 0.5}}}\n'
)
VALID_TEXT = {"fcsv": SLICER5_FCSV, "mrk.json": SLICER5_MRK_JSON, "csv": VALID_CSV}
VALID_TEXT["json"] = VALID_JSON


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------- formats
@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.fcsv", "fcsv"),
        ("case.001.mrk.json", "mrk.json"),
        ("A.MRK.JSON", "mrk.json"),
        ("p.csv", "csv"),
        ("p.CSV", "csv"),
        ("x.mrk.json.json", "json"),
        ("pred.json", "json"),
    ],
)
def test_landmark_format_by_suffix(name, fmt):
    assert landmark_format(name) == fmt


@pytest.mark.parametrize("name", ["a.txt", "fcsv", "a.fcsv.bak", "noext"])
def test_unknown_format_error_lists_formats(name):
    with pytest.raises(LandmarkFileError) as info:
        landmark_format(name)
    assert info.value.path == Path(name)
    assert all(f".{f}" in str(info.value.fix) for f in LANDMARK_FORMATS)


# --------------------------------------------------------------------------- round trips
_NAME = st.text(string.ascii_letters + string.digits + " ,;=\"'#%-_.()/äµ", min_size=1, max_size=10)
_NAMES = _NAME.filter(lambda s: s == s.strip())
_COORD = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
_NOTE = st.text(string.ascii_letters + " ;=%,", min_size=1, max_size=8).map(lambda s: "n:" + s)
_EXTRAS = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"confidence": st.floats(0.0, 1.0)}),
    st.fixed_dictionaries({"confidence": st.floats(0.0, 1.0), "note": _NOTE}),
)
_ENTRIES = st.lists(
    st.tuples(_NAMES, st.one_of(st.none(), st.tuples(_COORD, _COORD, _COORD)), _EXTRAS),
    unique_by=lambda e: e[0],
    max_size=7,
)


def _landmark_set(entries) -> LandmarkSet:
    ls = LandmarkSet.from_dict({n: p for n, p, _ in entries})
    ls.extras = {n: dict(e) for n, _, e in entries if e}
    return ls


def _assert_round_trip(original: LandmarkSet, back: LandmarkSet, fmt: str) -> None:
    keep = [n for n in original.names if fmt != "fcsv" or not original.is_missing(n)]
    assert back.names == keep
    expected = original.subset(keep)
    np.testing.assert_allclose(back.coords, expected.coords, atol=1e-6, equal_nan=True)
    for name in keep:
        want, got = original.extras.get(name, {}), back.extras.get(name, {})
        assert set(got) == set(want), name
        for key, value in want.items():
            if isinstance(value, str):
                assert got[key] == value.strip()
            else:
                assert got[key] == pytest.approx(value, abs=1e-12)
        if back.is_missing(name):
            assert back.missing_reason[name]


@pytest.mark.parametrize("coords", ["LPS", "RAS"])
@pytest.mark.parametrize("fmt", LANDMARK_FORMATS)
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entries=_ENTRIES)
def test_round_trip_every_format_and_coordinate_system(tmp_path, fmt, coords, entries):
    original = _landmark_set(entries)
    path = tmp_path / f"points{SUFFIX[fmt]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LandmarkWarning)
        write_landmarks(original, path, coords=coords)
    text = path.read_text(encoding="utf-8")
    assert coords in text  # the file states its coordinate system
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # files we write read back without any warning
        back = read_landmarks(path)
    _assert_round_trip(original, back, fmt)


@pytest.mark.parametrize("fmt", LANDMARK_FORMATS)
def test_ras_output_negates_x_and_y(tmp_path, fmt):
    ls = LandmarkSet.from_dict({"a": (1.25, -2.5, 3.75)})
    lps_text = write_landmarks(ls, tmp_path / f"l{SUFFIX[fmt]}", coords="LPS").read_text()
    ras_path = write_landmarks(ls, tmp_path / f"r{SUFFIX[fmt]}", coords="ras")
    ras_text = ras_path.read_text()
    assert "-1.25" not in lps_text and "-2.5" in lps_text
    assert "-1.25" in ras_text and "-2.5" not in ras_text and "3.75" in ras_text
    np.testing.assert_allclose(read_landmarks(ras_path).coords, [[1.25, -2.5, 3.75]])


def test_ras_csv_is_read_as_lps(tmp_path):
    path = _write(tmp_path, "r.csv", "# CoordinateSystem = RAS\nname,x,y,z\nA,1.5,-2,3\n")
    np.testing.assert_allclose(read_landmarks(path).coords, [[-1.5, 2.0, 3.0]])


# ------------------------------------------------------------------------------------ fcsv
_FCSV_ROW = "1,10.0,-20.0,30.0,0,0,0,1,1,1,0,A,,\n"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("RAS", [-10.0, 20.0, 30.0]),
        ("ras", [-10.0, 20.0, 30.0]),
        ("0", [-10.0, 20.0, 30.0]),
        ("LPS", [10.0, -20.0, 30.0]),
        ("1", [10.0, -20.0, 30.0]),
    ],
)
def test_fcsv_coordinate_system_header_forms(tmp_path, header, expected):
    text = f"# Markups fiducial file version = 4.11\n# CoordinateSystem = {header}\n{_FCSV_ROW}"
    path = _write(tmp_path, "p.fcsv", text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(read_landmarks(path).coords, [expected])


def test_fcsv_without_coordinate_header_is_ras_with_warning(tmp_path):
    path = _write(tmp_path, "p.fcsv", "# Markups fiducial file version = 4.4\n" + _FCSV_ROW)
    with pytest.warns(LandmarkWarning, match="assuming RAS"):
        ls = read_landmarks(path)
    np.testing.assert_allclose(ls.coords, [[-10.0, 20.0, 30.0]])
    with warnings.catch_warnings():  # an explicit --coords silences the assumption
        warnings.simplefilter("error")
        np.testing.assert_allclose(read_landmarks(path, coords="LPS").coords, [[10, -20, 30]])


def test_fcsv_header_and_coords_argument_must_agree(tmp_path):
    path = _write(tmp_path, "p.fcsv", "# CoordinateSystem = LPS\n" + _FCSV_ROW)
    assert read_landmarks(path, coords="LPS").names == ["A"]
    with pytest.raises(LandmarkFileError, match="states LPS"):
        read_landmarks(path, coords="RAS")


def test_fcsv_with_empty_coordinates_says_how_slicer_marks_a_missing_point(tmp_path):
    """An .fcsv marks a missing point by its position status column, not by empty x, y, z:
    the error says so (and the line), instead of the CSV advice 'leave it empty'."""
    p = tmp_path / "gap.fcsv"
    p.write_text(
        "# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_0,,,,0,0,0,1,1,1,0,nasion,,\n"
    )
    with pytest.raises(LandmarkFileError) as info:
        read_landmarks(p)
    assert info.value.line == 4 and "coordinate x '' is not a number" in str(info.value)
    assert "position status" in str(info.value.fix) and "empty" not in str(info.value.fix)


def test_slicer5_fcsv_fixture(tmp_path):
    ls = read_landmarks(_write(tmp_path, "slicer.fcsv", SLICER5_FCSV))
    assert ls.names == ["nasion", "sella, turcica", "menton", "gonion_L"]
    np.testing.assert_allclose(ls.get("nasion"), [-12.5, 34.25, -101.0])
    np.testing.assert_allclose(ls.get("sella, turcica"), [30.125, -5.5, 88.75])
    np.testing.assert_allclose(ls.get("gonion_L"), [15.0, -2.0, 3.0])
    assert ls.is_missing("menton") and ls.missing_reason["menton"] == MISSING_IN_FILE
    assert ls.extras["sella, turcica"] == {"description": "pituitary fossa, midline"}
    assert ls.extras["gonion_L"] == {"confidence": 0.875, "model": "unet"}
    assert "nasion" not in ls.extras


def test_fcsv_writes_all_columns_and_omits_missing_with_warning(tmp_path):
    ls = LandmarkSet.from_dict({"a, b": (1.0, 2.0, 3.0), "gone": None})
    ls.extras = {"a, b": {"confidence": 0.25, "note": "x;y=z%"}}
    path = tmp_path / "p.fcsv"
    with pytest.warns(LandmarkWarning, match="gone"):
        write_landmarks(ls, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "# Markups fiducial file version = 4.11"
    assert lines[1] == "# CoordinateSystem = LPS"
    assert lines[2] == "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
    assert len(lines) == 4 and lines[3].startswith('1,1.0,2.0,3.0,0,0,0,1,1,1,0,"a, b",')
    back = read_landmarks(path)
    assert back.names == ["a, b"]
    assert back.extras["a, b"] == {"confidence": 0.25, "note": "x;y=z%"}


# -------------------------------------------------------------------------------- mrk.json
def test_slicer5_mrk_json_fixture(tmp_path):
    ls = read_landmarks(_write(tmp_path, "slicer.mrk.json", SLICER5_MRK_JSON))
    assert ls.names == ["porion_L", "porion_R", "orbitale_L"]
    np.testing.assert_allclose(ls.get("porion_L"), [-61.2, 10.5, -20.25])  # RAS -> LPS
    np.testing.assert_allclose(ls.get("orbitale_L"), [-40.0, -55.5, 2.0])
    assert ls.is_missing("porion_R") and ls.missing_reason["porion_R"] == MISSING_IN_FILE
    assert ls.extras == {"orbitale_L": {"confidence": 0.75}}


@pytest.mark.parametrize("status", ["missing", "undefined"])
def test_mrk_json_missing_point_stays_missing(tmp_path, status):
    data = json.loads(SLICER5_MRK_JSON)
    data["markups"][0]["controlPoints"][0]["positionStatus"] = status
    del data["markups"][0]["controlPoints"][0]["position"]
    ls = read_landmarks(_write(tmp_path, "m.mrk.json", json.dumps(data)))
    assert ls.names == ["porion_L", "porion_R", "orbitale_L"]
    assert ls.is_missing("porion_L") and ls.missing_reason["porion_L"] == "missing in file"


def test_mrk_json_written_missing_point_has_status_and_no_position(tmp_path):
    ls = LandmarkSet.from_dict({"a": (1.0, 2.0, 3.0), "b": None})
    path = write_landmarks(ls, tmp_path / "m.mrk.json", coords="RAS")
    node = json.loads(path.read_text())["markups"][0]
    assert node["type"] == "Fiducial" and node["coordinateSystem"] == "RAS"
    assert node["coordinateUnits"] == "mm"
    a, b = node["controlPoints"]
    assert a["position"] == [-1.0, -2.0, 3.0] and a["positionStatus"] == "defined"
    assert "position" not in b and b["positionStatus"] == "missing"
    assert len(a["orientation"]) == 9


def test_mrk_json_multiple_markups_reads_first_point_list(tmp_path):
    data = json.loads(SLICER5_MRK_JSON)
    line = {"type": "Line", "controlPoints": [{"label": "L", "position": [0, 0, 0]}]}
    data["markups"].insert(0, line)
    with pytest.warns(LandmarkWarning, match="2 markups"):
        ls = read_landmarks(_write(tmp_path, "m.mrk.json", json.dumps(data)))
    assert ls.names[0] == "porion_L"
    data["markups"] = [line]
    with pytest.raises(LandmarkFileError, match="no point list"):
        read_landmarks(_write(tmp_path, "m.mrk.json", json.dumps(data)))


def test_mrk_json_micrometre_units_and_default_lps(tmp_path):
    point = {"label": "a", "position": [1000, -2000, 500]}
    data = {"markups": [{"type": "Fiducial", "coordinateUnits": "um", "controlPoints": [point]}]}
    path = _write(tmp_path, "m.mrk.json", json.dumps(data))
    with pytest.warns(LandmarkWarning, match="assuming LPS"):
        ls = read_landmarks(path)
    np.testing.assert_allclose(ls.coords, [[1.0, -2.0, 0.5]])
    np.testing.assert_allclose(read_landmarks(path, coords="RAS").coords, [[-1.0, 2.0, 0.5]])


# ------------------------------------------------------------------------------------- csv
def test_csv_without_coordinate_system_is_an_error(tmp_path):
    path = _write(tmp_path, "p.csv", "name,x,y,z\nA,1,2,3\n")
    with pytest.raises(LandmarkFileError) as info:
        read_landmarks(path)
    assert info.value.path == path and "--in-coords" in str(info.value.fix)
    assert "coordinate_system" in str(info.value.fix)
    np.testing.assert_allclose(read_landmarks(path, coords="RAS").coords, [[-1, -2, 3]])


def test_csv_comment_and_coords_argument_must_agree(tmp_path):
    path = _write(tmp_path, "p.csv", "# CoordinateSystem = RAS\nname,x,y,z\nA,1,2,3\n")
    np.testing.assert_allclose(read_landmarks(path, coords="RAS").coords, [[-1, -2, 3]])
    with pytest.raises(LandmarkFileError, match="states RAS coordinates but LPS"):
        read_landmarks(path, coords="LPS")


@pytest.mark.parametrize("column", ["label", "Landmark", "NAME"])
def test_csv_name_column_variants_extras_and_missing(tmp_path, column):
    text = (
        f"# CoordinateSystem = LPS\n{column}, X ,y,z,confidence,expected_error_mm,model\n"
        "A,1,2,3,0.9,1.5,unet\nB,,,,0.1,,\n"
    )
    ls = read_landmarks(_write(tmp_path, "p.csv", text))
    assert ls.names == ["A", "B"]
    np.testing.assert_allclose(ls.get("A"), [1, 2, 3])
    assert ls.is_missing("B") and ls.missing_reason["B"] == MISSING_IN_FILE
    assert ls.extras == {
        "A": {"confidence": 0.9, "expected_error_mm": 1.5, "model": "unet"},
        "B": {"confidence": 0.1},
    }
    out = write_landmarks(ls, tmp_path / "out.csv")
    assert out.read_text().splitlines()[1] == "name,x,y,z,confidence,expected_error_mm,model"


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("\ufeff# CoordinateSystem = LPS\r\nname,x,y,z\r\nA,1,2,3\r\n".encode())
    assert read_landmarks(path).names == ["A"]


# ------------------------------------------------------------------------------------ json
def test_json_own_format_null_extras_and_reasons(tmp_path):
    ls = read_landmarks(_write(tmp_path, "p.json", VALID_JSON))
    np.testing.assert_allclose(ls.get("A"), [-1, -2, 3])
    assert ls.is_missing("B") and ls.extras == {"A": {"confidence": 0.5}}
    ls.missing_reason["B"] = "outside the field of view"
    back = read_landmarks(write_landmarks(ls, tmp_path / "q.json"))
    assert back.missing_reason["B"] == "outside the field of view"
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["coordinate_system"] == "LPS" and data["units"] == "mm"
    assert data["landmarks"]["B"] is None


# ---------------------------------------------------------------------------------- writer
def test_writer_options_and_refusals(tmp_path):
    ls = LandmarkSet.from_dict({"a": (1.0, 2.0, 3.0)})
    path = write_landmarks(ls, tmp_path / "p.txt", fmt="csv")
    assert read_landmarks(path.rename(tmp_path / "p.csv")).names == ["a"]
    with pytest.raises(OutputExistsError):
        write_landmarks(ls, tmp_path / "p.csv", overwrite=False)
    with pytest.raises(LandmarkFileError, match="format"):
        write_landmarks(ls, tmp_path / "p.xyz")
    with pytest.raises(LandmarkFileError, match="coordinate system"):
        write_landmarks(ls, tmp_path / "q.csv", coords="XYZ")
    for bad in [" a", "a\nb"]:
        with pytest.raises(LandmarkFileError, match="cannot be stored"):
            write_landmarks(LandmarkSet.from_dict({bad: (0, 0, 0)}), tmp_path / "q.json")
    inf = LandmarkSet(["a"], np.array([[np.inf, 0.0, 0.0]]))
    with pytest.raises(LandmarkFileError, match="non-finite"):
        write_landmarks(inf, tmp_path / "q.json")
    ls.extras = {"a": {"x": 1.0}}
    with pytest.raises(LandmarkFileError, match="extra field"):
        write_landmarks(ls, tmp_path / "q.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]  # no temporaries left


# ------------------------------------------------------------------------------- malformed
_HDR = "# CoordinateSystem = LPS\nname,x,y,z\n"
_FC = "# CoordinateSystem = LPS\n"
MALFORMED = [
    ("csv", _HDR + "A,1,2\n", 3, "columns"),
    ("csv", _HDR + "A,1,2,3,4\n", 3, "columns"),
    ("csv", _HDR + "A,1,2,3\nB,1,two,3\n", 4, "not a number"),
    ("csv", _HDR + "A,nan,2,3\n", 3, "finite"),
    ("csv", _HDR + "A,1,-inf,3\n", 3, "finite"),
    ("csv", _HDR + "A,1,2,3\nB,1,2,3\nA,4,5,6\n", 5, "duplicate landmark name 'A'"),
    ("csv", _HDR + " ,1,2,3\n", 3, "empty landmark name"),
    ("csv", _HDR + "A,1,,3\n", 3, "not all"),
    ("csv", _HDR + 'A,1,2,3\n"B,1,2,3\n', 4, "CSV"),
    ("csv", "# CoordinateSystem = XYZ\nname,x,y,z\n", 1, "coordinate system"),
    ("csv", "# CoordinateSystem = 1\nname,x,y,z\n", 1, "coordinate system"),
    ("csv", "# CoordinateSystem = LPS\nid,x,y,z\n", 2, "header"),
    ("csv", "# CoordinateSystem = LPS\n", None, "no header"),
    ("csv", "", None, "empty"),
    ("csv", " \n\n", None, "empty"),
    ("fcsv", "", None, "empty"),
    ("fcsv", "# CoordinateSystem = 2\n" + _FCSV_ROW, 1, "coordinate system"),
    ("fcsv", _FC + "1,1,2,3,0,0,0,1,1,1,0,A\n", 2, "columns"),
    ("fcsv", _FC + _FCSV_ROW + "2,x,2,3,0,0,0,1,1,1,0,B,,\n", 3, "not a number"),
    ("fcsv", _FC + "1,1,2,3,0,0,0,1,1,1,0,,,\n", 2, "empty landmark name"),
    ("fcsv", _FC + _FCSV_ROW + _FCSV_ROW, 3, "duplicate landmark name 'A'"),
    ("fcsv", _FC + "1,1,2,NaN,0,0,0,1,1,1,0,A,,\n", 2, "finite"),
    ("fcsv", _FC + "# columns = id,x,y,label\n", 2, "columns"),
    ("json", "", None, "empty"),
    ("json", '{"coordinate_system": "LPS",\n "landmarks": {\n  "a": [1, 2, 3],\n }\n}', 4, "JSON"),
    (
        "json",
        '{"coordinate_system": "LPS",\n"landmarks": {\n"a": [1,2,3],\n"a": [4,5,6]}}',
        4,
        "'a'",
    ),
    ("json", '{"coordinate_system": "LPS", "landmarks": {"a": [1, 2]}}', None, "3 numbers"),
    ("json", '{"coordinate_system": "LPS", "landmarks": {"a": [1, NaN, 2]}}', None, "finite"),
    ("json", '{"coordinate_system": "LPS", "landmarks": {"a": [1, "2", 3]}}', None, "numbers"),
    ("json", '{"coordinate_system": "LPS", "landmarks": {"": [1, 2, 3]}}', None, "empty"),
    ("json", '{"coordinate_system": "XYZ", "landmarks": {}}', None, "coordinate system"),
    ("json", '{"landmarks": {"a": [1, 2, 3]}}', None, "does not state"),
    ("json", '{"coordinate_system": "LPS", "units": "cm", "landmarks": {}}', None, "units"),
    ("json", "[1, 2, 3]", None, "landmarks"),
    ("mrk.json", '{"markups": [\n{"type": "Fiducial"\n', 3, "JSON"),
    ("mrk.json", '{"markups": {}}', None, "markups"),
    (
        "mrk.json",
        '{"markups": [{"type": "Fiducial", "controlPoints": [{"label": "a"}]}]}',
        None,
        "position",
    ),
    (
        "mrk.json",
        '{"markups": [{"type": "Fiducial", "coordinateSystem": "IJK"}]}',
        None,
        "coordinate system",
    ),
    (
        "mrk.json",
        '{"markups": [{"type": "Fiducial", "controlPoints": '
        '[{"label": "a", "position": [0, 0, 0]}, {"label": "a", "position": [1, 1, 1]}]}]}',
        None,
        "duplicate landmark name 'a'",
    ),
    (
        "mrk.json",
        '{"markups": [{"type": "Fiducial", "controlPoints": '
        '[{"label": "a", "position": [0, 0, 0], "positionStatus": "maybe"}]}]}',
        None,
        "positionStatus",
    ),
]


@pytest.mark.parametrize(("fmt", "text", "line", "match"), MALFORMED)
def test_malformed_files_raise_landmark_file_error(tmp_path, fmt, text, line, match):
    path = _write(tmp_path, f"bad{SUFFIX[fmt]}", text)
    with pytest.raises(LandmarkFileError, match=match) as info:
        read_landmarks(path)
    assert info.value.path == path
    assert info.value.line == line
    assert str(path) in str(info.value)


def test_unreadable_files_raise_landmark_file_error(tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"# CoordinateSystem = LPS\nname,x,y,z\nM\xfcller,1,2,3\n")
    with pytest.raises(LandmarkFileError, match="UTF-8"):
        read_landmarks(bad)
    with pytest.raises(LandmarkFileError, match="cannot read"):
        read_landmarks(tmp_path / "absent.fcsv")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(LandmarkFileError, match="cannot read"):
        read_landmarks(tmp_path / "dir.json")
    with pytest.raises(LandmarkFileError, match="coordinate system"):
        read_landmarks(_write(tmp_path, "ok.csv", VALID_CSV), coords="up")


# ------------------------------------------------------------------------------------ fuzz
_JUNK = st.one_of(
    st.binary(min_size=1, max_size=4),
    st.text(",;=#\"'\n\r {}[]:0123456789.eE-+naifNULLtrue", min_size=1, max_size=6).map(str.encode),
    st.text(min_size=1, max_size=3).map(lambda s: s.encode("utf-8", "replace")),
)


@st.composite
def _mutations(draw, data: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "delete", "duplicate", "insert", "insert"]))
        pos = draw(st.integers(0, len(data)))
        if op == "truncate":
            data = data[:pos]
        elif op == "delete":
            data = data[:pos] + data[pos + 1 :]
        elif op == "duplicate":
            data = data[:pos] + data[pos : pos + 1] + data[pos:]
        else:
            junk = draw(_JUNK)
            data = data[:pos] + junk + data[pos:]
    return data


@pytest.mark.parametrize("fmt", LANDMARK_FORMATS)
@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_mutated_files_parse_or_raise_landmark_file_error(tmp_path, fmt, data):
    """Truncated/garbled files either parse or raise LandmarkFileError (4 x 50 examples)."""
    mutated = data.draw(_mutations(VALID_TEXT[fmt].encode("utf-8")))
    path = tmp_path / f"fuzz{SUFFIX[fmt]}"
    path.write_bytes(mutated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LandmarkWarning)
        try:
            ls = read_landmarks(path)
        except LandmarkFileError as exc:
            assert exc.path == path
            return
    assert isinstance(ls, LandmarkSet)
    assert np.isfinite(ls.coords[ls.present]).all()
    assert len(set(ls.names)) == len(ls.names) and all(n and n == n.strip() for n in ls.names)
