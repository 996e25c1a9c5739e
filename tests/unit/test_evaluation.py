"""Tests of landmark3d.evaluation on tiny datasets built in tmp_path."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from landmark3d.data.dataset import CaseSpec, Dataset
from landmark3d.errors import DatasetError, LandmarkFileError, OutputExistsError
from landmark3d.evaluation import (
    evaluate,
    find_predictions,
    prediction_case_id,
    summary_lines,
    write_evaluation,
)
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import write_landmarks

NAMES = ["chin", "occ_bone"]
TRUTH = {
    "c1": {"chin": [10.0, 20.0, 30.0], "occ_bone": [-5.0, 40.0, 12.0]},
    "c2": {"chin": [11.0, 21.0, 31.0], "occ_bone": [-6.0, 41.0, 13.0]},
    "c3": {"chin": [12.0, 22.0, 32.0], "occ_bone": None},  # occ_bone not annotated
}


def _dataset(tmp_path: Path, folds: list[list[str]] | None = None) -> Dataset:
    gt = tmp_path / "gt"
    gt.mkdir()
    cases = []
    for cid, pts in TRUTH.items():
        lm = gt / f"{cid}.json"
        write_landmarks(LandmarkSet.from_dict(pts), lm)
        cases.append(CaseSpec(cid, tmp_path / "images" / f"{cid}.nii.gz", lm))
    cases.append(CaseSpec("c4", tmp_path / "images" / "c4.nii.gz", None))  # unannotated
    return Dataset(
        name="tiny",
        root=tmp_path,
        landmark_names=list(NAMES),
        modality="CT",
        cases=cases,
        folds=folds or [],
        source=tmp_path / "dataset.json",
    )


def _shifted(cid: str, shift) -> LandmarkSet:
    pts = {n: (None if p is None else np.add(p, shift)) for n, p in TRUTH[cid].items()}
    return LandmarkSet.from_dict(pts)


def test_prediction_case_id_strips_landmark_suffixes():
    assert prediction_case_id(Path("case07.mrk.json")) == "case07"
    assert prediction_case_id(Path("case07.JSON")) == "case07"
    assert prediction_case_id(Path("a.b.fcsv")) == "a.b"
    assert prediction_case_id(Path("c1.nii.gz")) is None
    assert prediction_case_id(Path(".json")) is None


def test_shift_of_3mm_gives_hand_computed_metrics(tmp_path):
    ds = _dataset(tmp_path)
    pred = tmp_path / "pred"
    shift = [1.0, 2.0, 2.0]  # |shift| = 3 mm
    write_landmarks(_shifted("c1", shift), pred / "c1.fcsv")
    write_landmarks(_shifted("c2", shift), pred / "c2.mrk.json", coords="RAS")
    write_landmarks(_shifted("c3", shift), pred / "c3.csv")
    result = evaluate(pred, ds)
    s = result.summary
    assert result.case_ids == ["c1", "c2", "c3"]  # c4 has no annotations: not evaluated
    assert s.n_evaluated == 5 and s.n_missing_truth == 1 and s.n_missing_prediction == 0
    assert s.mre == pytest.approx(3.0) and s.sd == pytest.approx(0.0, abs=1e-9)
    assert s.sdr == {2.0: 0.0, 2.5: 0.0, 3.0: 100.0, 4.0: 100.0, 8.0: 100.0}
    assert s.per_landmark["occ_bone"].n == 2 and s.per_landmark["occ_bone"].n_missing_truth == 1
    assert result.cases_without_prediction == [] and result.unmatched_predictions == []
    row = next(r for r in result.rows if (r.case, r.landmark) == ("c3", "occ_bone"))
    assert row.status == "missing_truth" and math.isnan(row.error_mm)
    assert [m["case"] for m in result.missing("missing_truth")] == ["c3"]


def test_missing_prediction_file_and_landmark_and_unmatched_files(tmp_path):
    ds = _dataset(tmp_path)
    pred = tmp_path / "pred"
    write_landmarks(_shifted("c1", [0.0, 0.0, 1.0]), pred / "c1.json")  # errors 1, 1
    partial = LandmarkSet.from_dict(
        {"chin": np.add(TRUTH["c2"]["chin"], [0, 4.0, 0]), "nose": [0, 0, 0]}
    )
    write_landmarks(partial, pred / "c2.json")  # chin error 4, occ_bone absent, "nose" unknown
    write_landmarks(_shifted("c1", [0, 0, 0]), pred / "c99.json")  # no such case
    (pred / "notes.txt").write_text("hello")
    result = evaluate(pred, ds)
    s = result.summary
    # c3 has no file: its chin is a missing prediction, its occ_bone is not evaluable.
    assert result.cases_without_prediction == ["c3"]
    assert s.n_evaluated == 3 and s.n_missing_prediction == 2 and s.n_missing_truth == 1
    assert s.mre == pytest.approx(2.0)
    assert s.sdr[2.0] == pytest.approx(40.0)  # 2 of 5 (missing predictions fail)
    assert s.sdr[8.0] == pytest.approx(60.0)
    missing = {(m["case"], m["landmark"]): m["note"] for m in result.missing("missing_prediction")}
    assert missing == {
        ("c2", "occ_bone"): "not in prediction file",
        ("c3", "chin"): "no prediction file",
    }
    assert sorted(p.name for p in result.unmatched_predictions) == ["c99.json", "notes.txt"]
    text = " ".join(result.warnings)
    assert "c99" in text and "'nose'" in text and "notes.txt" in text
    lines = summary_lines(result)
    assert any("no prediction file for: c3" in line for line in lines)


def test_explicit_cases_unknown_and_unannotated(tmp_path):
    ds = _dataset(tmp_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    with pytest.raises(DatasetError, match="c1"):
        evaluate(pred, ds, cases=["c01"])
    write_landmarks(_shifted("c1", [0.0, 0.0, 0.0]), pred / "c4.json")
    result = evaluate(pred, ds, cases=["c4"])
    assert result.summary.n_missing_truth == 2 and result.summary.n_evaluated == 0
    assert any("no annotations" in w for w in result.warnings)
    assert math.isnan(result.summary.mre)


def test_no_prediction_file_matching_any_case_is_an_error_not_a_table(tmp_path):
    """Predictions named after something else (e.g. subject ids) evaluate nothing: a clear
    error naming the directory, a mismatched file and the dataset's case ids."""
    ds = _dataset(tmp_path)
    pred = tmp_path / "pred"
    write_landmarks(_shifted("c1", [0.0, 0.0, 0.0]), pred / "subj001.json")
    with pytest.raises(LandmarkFileError) as info:
        evaluate(pred, ds)
    text = str(info.value)
    assert str(pred) in text and "subj001.json: no case 'subj001'" in text
    assert "'c1'" in str(info.value.fix)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LandmarkFileError, match="0 file"):
        evaluate(empty, ds)


def test_folds_and_pooled(tmp_path):
    ds = _dataset(tmp_path, folds=[["c1"], ["c2", "c3"]])
    pred = tmp_path / "pred"
    write_landmarks(_shifted("c1", [1.0, 0.0, 0.0]), pred / "c1.json")
    write_landmarks(_shifted("c2", [0.0, 3.0, 0.0]), pred / "c2.json")
    write_landmarks(_shifted("c3", [0.0, 0.0, 3.0]), pred / "c3.json")
    result = evaluate(pred, ds)
    assert set(result.folds) == {"fold0", "fold1"}
    assert result.folds["fold0"].mre == pytest.approx(1.0)
    assert result.folds["fold1"].mre == pytest.approx(3.0)
    assert result.summary.mre == pytest.approx((2 * 1.0 + 3 * 3.0) / 5)
    assert {r.case: r.fold for r in result.rows} == {"c1": 0, "c2": 1, "c3": 1}


def test_write_evaluation_json_and_csv(tmp_path):
    ds = _dataset(tmp_path, folds=[["c1", "c2", "c3"]])
    pred = tmp_path / "pred"
    write_landmarks(_shifted("c1", [0.0, 0.0, 2.0]), pred / "c1.json")
    write_landmarks(_shifted("c2", [0.0, 0.0, 2.0]), pred / "c2.json")
    result = evaluate(pred, ds)
    out = tmp_path / "eval"
    jpath, cpath = write_evaluation(result, out)
    data = json.loads(jpath.read_text())
    assert data["summary"]["mre"] == pytest.approx(2.0)
    assert data["summary"]["sdr"]["2"] == pytest.approx(80.0)  # 4 of 5 (c3 chin missing)
    assert data["thresholds_mm"] == [2.0, 2.5, 3.0, 4.0, 8.0]
    assert data["missing"]["cases_without_prediction"] == ["c3"]
    assert [(m["case"], m["landmark"]) for m in data["missing"]["missing_truth"]] == [
        ("c3", "occ_bone")
    ]
    assert data["folds"]["fold0"]["n_evaluated"] == 4
    assert len(data["rows"]) == 6 and data["rows"][0]["pred"] is not None
    with open(cpath, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    c1 = rows[0]
    assert (c1["case"], c1["landmark"], c1["status"], c1["fold"]) == (
        "c1",
        "chin",
        "evaluated",
        "0",
    )
    assert float(c1["error_mm"]) == pytest.approx(2.0)
    assert float(c1["pred_z"]) - float(c1["truth_z"]) == pytest.approx(2.0)
    c3 = rows[4]
    assert c3["status"] == "missing_prediction" and c3["error_mm"] == "" and c3["pred_x"] == ""
    with pytest.raises(OutputExistsError):
        write_evaluation(result, out)
    write_evaluation(result, out, overwrite=True)
    # Our own outputs written into the prediction directory are not taken for predictions.
    write_evaluation(result, pred)
    again = evaluate(pred, ds)
    assert again.unmatched_predictions == [] and again.summary.mre == pytest.approx(2.0)


def test_two_files_for_one_case_and_missing_directory(tmp_path):
    pred = tmp_path / "pred"
    write_landmarks(_shifted("c1", [0, 0, 0]), pred / "c1.json")
    write_landmarks(_shifted("c1", [0, 0, 0]), pred / "c1.fcsv")
    with pytest.raises(LandmarkFileError, match="two prediction files"):
        find_predictions(pred)
    with pytest.raises(LandmarkFileError, match="not a directory"):
        find_predictions(tmp_path / "nope")


def test_predict_report_files_are_not_predictions(tmp_path):
    from landmark3d.evaluation import is_predict_report

    pred = tmp_path / "pred"
    write_landmarks(_shifted("c1", [0, 0, 0]), pred / "c1.json")
    for name in ("timings.json", "timings.shard-2-of-3.json"):
        (pred / name).write_text('{"unit": "seconds", "cases": {}}')
    found, others = find_predictions(pred)
    assert list(found) == ["c1"] and others == []
    assert is_predict_report("timings.json") and not is_predict_report("timings_a.json")
    assert not is_predict_report("c1.json")
