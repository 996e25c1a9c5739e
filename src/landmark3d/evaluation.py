"""Evaluate a directory of predicted landmark files against a dataset's annotations.

Matching: a prediction file belongs to the case whose id equals the file name without its
landmark suffix (``.fcsv``, ``.mrk.json``, ``.csv``, ``.json``; e.g. ``case07.mrk.json`` ->
``case07``). Hidden files and our own ``metrics.json`` / ``metrics.csv`` are ignored.

Nothing is dropped silently:

* a case without a prediction file has all its annotated landmarks counted as missing
  predictions (SDR failures, see :mod:`landmark3d.metrics`) and is listed;
* a landmark the prediction file lacks (or marks missing) is a missing prediction;
* a landmark without annotation is "missing truth" — not evaluable, counted and listed;
* a prediction file whose name matches no case, and predicted landmark names the dataset does
  not have, are listed as warnings.

:func:`write_evaluation` writes ``metrics.json`` (summary, per landmark, per fold, per case x
landmark rows, the missing lists) and ``metrics.csv`` (one row per case x landmark).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from landmark3d.data.dataset import Dataset, did_you_mean
from landmark3d.errors import DatasetError, LandmarkFileError
from landmark3d.io.atomic import atomic_write_text, check_writable
from landmark3d.io.landmark_set import LandmarkSet
from landmark3d.io.landmarks import LANDMARK_FORMATS, read_landmarks
from landmark3d.metrics import (
    DEFAULT_SDR_THRESHOLDS_MM,
    ErrorTable,
    Summary,
    summarize_table,
    threshold_key,
)

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
STATUS_EVALUATED = "evaluated"
STATUS_MISSING_PREDICTION = "missing_prediction"
STATUS_MISSING_TRUTH = "missing_truth"
CSV_COLUMNS = (
    "case", "fold", "landmark", "status", "error_mm",
    "pred_x", "pred_y", "pred_z", "truth_x", "truth_y", "truth_z", "note",
)  # fmt: skip


@dataclass
class EvaluationRow:
    """One case x landmark.

    Attributes:
        case: case id.
        landmark: landmark name.
        pred: predicted position, shape (3,), LPS mm; NaN if missing.
        truth: annotated position, shape (3,), LPS mm; NaN if missing.
        error_mm: radial error in mm; NaN unless ``status == "evaluated"``.
        status: ``"evaluated"``, ``"missing_prediction"`` or ``"missing_truth"``.
        fold: the dataset fold holding the case out, or None.
        note: why something is missing (e.g. "no prediction file").
    """

    case: str
    landmark: str
    pred: NDArray[np.float64]
    truth: NDArray[np.float64]
    error_mm: float
    status: str
    fold: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "fold": self.fold,
            "landmark": self.landmark,
            "status": self.status,
            "error_mm": _num(self.error_mm),
            "pred": _xyz(self.pred),
            "truth": _xyz(self.truth),
            "note": self.note,
        }


@dataclass
class EvaluationResult:
    """Everything :func:`evaluate` found.

    Attributes:
        summary: metrics over all evaluated cases (pooled over folds).
        folds: ``"fold<k>"`` -> metrics of the evaluated cases of dataset fold k (empty when the
            dataset has no folds or no evaluated case is in any fold).
        rows: one :class:`EvaluationRow` per case x landmark, in case then landmark order.
        landmark_names: the dataset's landmarks (column order of the metrics).
        case_ids: the cases evaluated.
        prediction_files: case id -> the prediction file used.
        cases_without_prediction: cases with no prediction file.
        unmatched_predictions: prediction files whose name is no evaluated case.
        warnings: human-readable notes (unmatched files, unknown landmark names, ...).
        thresholds: SDR thresholds, mm.
        pred_dir: the directory evaluated.
    """

    summary: Summary
    folds: dict[str, Summary]
    rows: list[EvaluationRow]
    landmark_names: list[str]
    case_ids: list[str]
    prediction_files: dict[str, Path]
    cases_without_prediction: list[str]
    unmatched_predictions: list[Path]
    warnings: list[str] = field(default_factory=list)
    thresholds: tuple[float, ...] = DEFAULT_SDR_THRESHOLDS_MM
    pred_dir: Path | None = None

    def missing(self, status: str) -> list[dict[str, str]]:
        """``[{"case", "landmark", "note"}]`` of the rows with ``status``."""
        return [
            {"case": r.case, "landmark": r.landmark, "note": r.note}
            for r in self.rows
            if r.status == status
        ]

    def to_dict(self) -> dict[str, Any]:
        """The content of ``metrics.json``."""
        return {
            "pred_dir": None if self.pred_dir is None else str(self.pred_dir),
            "thresholds_mm": list(self.thresholds),
            "landmarks": list(self.landmark_names),
            "cases": list(self.case_ids),
            "summary": self.summary.to_dict(),
            "folds": {k: s.to_dict() for k, s in self.folds.items()},
            "missing": {
                "cases_without_prediction": list(self.cases_without_prediction),
                "missing_predictions": self.missing(STATUS_MISSING_PREDICTION),
                "missing_truth": self.missing(STATUS_MISSING_TRUTH),
            },
            "unmatched_prediction_files": [str(p) for p in self.unmatched_predictions],
            "prediction_files": {k: str(v) for k, v in self.prediction_files.items()},
            "warnings": list(self.warnings),
            "rows": [r.to_dict() for r in self.rows],
        }


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _xyz(p: NDArray[np.float64]) -> list[float] | None:
    return None if np.isnan(p).any() else [float(v) for v in p]


# ------------------------------------------------------------------------------ matching
def prediction_case_id(path: Path) -> str | None:
    """The case id a prediction file names (its name minus the landmark suffix), or None."""
    name = path.name
    lowered = name.lower()
    for fmt in LANDMARK_FORMATS:  # "mrk.json" before "json"
        if lowered.endswith("." + fmt) and len(name) > len(fmt) + 1:
            return name[: -(len(fmt) + 1)]
    return None


_PREDICT_REPORT = re.compile(r"^timings(\.shard-\d+-of-\d+)?\.json$")
"""The per-case report ``landmark3d predict`` writes beside its landmark files (not a case)."""


def is_predict_report(file_name: str) -> bool:
    """Whether ``file_name`` is ``predict``'s report (``timings.json``, ``timings.shard-K-of-N.json``)."""
    return _PREDICT_REPORT.match(file_name) is not None


def find_predictions(pred_dir: str | Path) -> tuple[dict[str, Path], list[Path]]:
    """Prediction files of ``pred_dir`` (not recursive): ``({case_id: path}, other_files)``.

    ``predict``'s own report (``timings.json``, ``timings.shard-K-of-N.json``) is neither.

    ``other_files`` are visible files that are not landmark files. Two landmark files naming
    the same case (e.g. ``c1.fcsv`` and ``c1.json``) are ambiguous: LandmarkFileError.
    """
    d = Path(pred_dir)
    if not d.is_dir():
        raise LandmarkFileError(
            "the prediction directory does not exist or is not a directory.",
            path=d,
            fix="give the directory `landmark3d predict` wrote its landmark files to.",
        )
    found: dict[str, Path] = {}
    others: list[Path] = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.name in (METRICS_JSON, METRICS_CSV):
            continue
        if is_predict_report(p.name):
            continue
        cid = prediction_case_id(p)
        if cid is None:
            others.append(p)
            continue
        if cid in found:
            raise LandmarkFileError(
                f"two prediction files for case {cid!r}: {found[cid].name} and {p.name}.",
                path=d,
                fix="keep one landmark file per case in the prediction directory.",
            )
        found[cid] = p
    return found, others


# ------------------------------------------------------------------------------ evaluation
def _case_rows(
    cid: str,
    names: Sequence[str],
    pred: LandmarkSet,
    truth: LandmarkSet,
    fold: int | None,
    no_file: bool,
) -> list[EvaluationRow]:
    rows: list[EvaluationRow] = []
    for j, name in enumerate(names):
        p, t = pred.coords[j], truth.coords[j]
        if np.isnan(t).any():
            status, err = STATUS_MISSING_TRUTH, math.nan
            note = truth.missing_reason.get(name, "not annotated")
        elif np.isnan(p).any():
            status, err = STATUS_MISSING_PREDICTION, math.nan
            note = "no prediction file" if no_file else pred.missing_reason.get(name, "missing")
        else:
            status, err, note = STATUS_EVALUATED, float(np.linalg.norm(p - t)), ""
        rows.append(EvaluationRow(cid, name, p.copy(), t.copy(), err, status, fold, note))
    return rows


def _table(rows: Sequence[EvaluationRow], case_ids: Sequence[str], n: int) -> ErrorTable:
    c = len(case_ids)
    errors = np.array([r.error_mm for r in rows], dtype=np.float64).reshape(c, n)
    status = np.array([r.status for r in rows], dtype=object).reshape(c, n)
    return ErrorTable(
        errors,
        np.asarray(status == STATUS_MISSING_PREDICTION, dtype=bool),
        np.asarray(status == STATUS_MISSING_TRUTH, dtype=bool),
        list(case_ids),
    )


def evaluate(
    pred_dir: str | Path,
    dataset: Dataset,
    cases: Iterable[str] | None = None,
    thresholds: Iterable[float] = DEFAULT_SDR_THRESHOLDS_MM,
    coords: str | None = None,
) -> EvaluationResult:
    """Compare the prediction files in ``pred_dir`` with ``dataset``'s annotations.

    Args:
        pred_dir: directory of prediction files named ``<case id>.<fcsv|mrk.json|csv|json>``.
        dataset: the dataset with the ground truth.
        cases: case ids to evaluate; default: every case with annotations.
        thresholds: SDR radii in mm.
        coords: ``"LPS"``/``"RAS"`` for prediction CSV/JSON files that do not state their
            coordinate system (files written by landmark3d always state it).

    Returns:
        :class:`EvaluationResult`.

    Raises:
        DatasetError: ``cases`` names a case the dataset does not have.
        LandmarkFileError: a prediction file is unreadable, two files name one case, or no
            file names any evaluated case.
    """
    pred_root = Path(pred_dir)
    thr = tuple(float(t) for t in thresholds)
    names = list(dataset.landmark_names)
    if cases is None:
        case_ids = [c.id for c in dataset.cases if dataset.has_landmarks(c)]
    else:
        case_ids = [dataset.case(c).id for c in cases]
    if not case_ids:
        raise DatasetError(
            f"dataset {dataset.name!r} has no annotated case to evaluate.",
            path=dataset.source,
            fix="add landmark files to the dataset's cases.",
        )
    found, others = find_predictions(pred_root)
    warnings: list[str] = []
    wanted = set(case_ids)
    unmatched = [p for cid, p in found.items() if cid not in wanted] + others
    for cid, p in found.items():
        if cid not in dataset.case_ids:
            hint = did_you_mean(cid, dataset.case_ids)
            warnings.append(
                f"{p.name}: no case {cid!r} in dataset {dataset.name!r}; ignored.{hint}"
            )
    elsewhere = [
        p.name for cid, p in found.items() if cid not in wanted and cid in dataset.case_ids
    ]
    if elsewhere:  # e.g. with --fold, the other folds' predictions: one line for all
        warnings.append(
            f"{len(elsewhere)} prediction file(s) of dataset cases not evaluated here (e.g. "
            f"{elsewhere[0]}); ignored."
        )
    for p in others:
        warnings.append(f"{p.name}: not a landmark file (.fcsv/.mrk.json/.csv/.json); ignored.")
    if not wanted & found.keys():  # nothing to evaluate: an error, not a table of dashes
        example = f" (e.g. {warnings[0]})" if warnings else ""
        raise LandmarkFileError(
            f"no prediction file here names one of the {len(case_ids)} evaluated case(s) of "
            f"dataset {dataset.name!r} ({len(found) + len(others)} file(s) found){example}.",
            path=pred_root,
            fix="name prediction files <case id>.<fcsv|mrk.json|csv|json> after the dataset's "
            f"case ids (e.g. {case_ids[0]!r}; `landmark3d predict --dataset` does), or check "
            "--truth and --fold.",
        )

    rows: list[EvaluationRow] = []
    without: list[str] = []
    used: dict[str, Path] = {}
    for cid in case_ids:
        if dataset.has_landmarks(cid):
            truth = dataset.read_landmarks(cid)
        else:
            truth = LandmarkSet.empty(names, reason="case has no annotations")
            warnings.append(f"case {cid!r} has no annotations; its landmarks are not evaluable.")
        path = found.get(cid)
        if path is None:
            without.append(cid)
            pred = LandmarkSet.empty(names, reason="no prediction file")
        else:
            used[cid] = path
            raw = read_landmarks(path, coords=coords)
            unknown = [n for n in raw.names if n not in names]
            if unknown:
                warnings.append(
                    f"{path.name}: landmark(s) {', '.join(map(repr, unknown))} are not in the "
                    f"dataset; ignored." + "".join(did_you_mean(n, names) for n in unknown)
                )
            pred = raw.subset(names)
            for n in names:  # "not annotated" is subset()'s word for "absent from the file"
                if n not in raw.names:
                    pred.missing_reason[n] = "not in prediction file"
        rows += _case_rows(cid, names, pred, truth, dataset.fold_of(cid), path is None)

    table = _table(rows, case_ids, len(names))
    summary = summarize_table(table, names, thr)
    folds: dict[str, Summary] = {}
    for k in range(len(dataset.folds)):
        sel = [i for i, cid in enumerate(case_ids) if dataset.fold_of(cid) == k]
        if sel:
            sub = ErrorTable(
                table.errors[sel],
                table.missing_prediction[sel],
                table.missing_truth[sel],
                [case_ids[i] for i in sel],
            )
            folds[f"fold{k}"] = summarize_table(sub, names, thr)
    return EvaluationResult(
        summary=summary,
        folds=folds,
        rows=rows,
        landmark_names=names,
        case_ids=case_ids,
        prediction_files=used,
        cases_without_prediction=without,
        unmatched_predictions=unmatched,
        warnings=warnings,
        thresholds=summary.thresholds,
        pred_dir=pred_root,
    )


# ------------------------------------------------------------------------------ writing
def _csv_text(result: EvaluationResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def cell(v: float) -> str:
        return "" if not math.isfinite(v) else f"{v:.6f}"

    for r in result.rows:
        writer.writerow(
            [
                r.case,
                "" if r.fold is None else r.fold,
                r.landmark,
                r.status,
                cell(r.error_mm),
                *(cell(float(v)) for v in r.pred),
                *(cell(float(v)) for v in r.truth),
                r.note,
            ]
        )
    return buf.getvalue()


def write_evaluation(
    result: EvaluationResult, out_dir: str | Path, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.csv`` into ``out_dir`` (atomically).

    Both destinations are checked before either is written, so a refusal
    (:class:`~landmark3d.errors.OutputExistsError`) leaves no partial output.

    Returns:
        ``(metrics_json_path, metrics_csv_path)``.
    """
    out = Path(out_dir)
    json_path, csv_path = out / METRICS_JSON, out / METRICS_CSV
    check_writable(json_path, overwrite)
    check_writable(csv_path, overwrite)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    atomic_write_text(json_path, text, overwrite=overwrite)
    atomic_write_text(csv_path, _csv_text(result), overwrite=overwrite)
    return json_path, csv_path


def summary_lines(result: EvaluationResult) -> list[str]:
    """A short human-readable report (MRE (SD), median, SDR, missing counts)."""
    s = result.summary
    sdr = ", ".join(f"{threshold_key(t)} mm {v:.1f}%" for t, v in s.sdr.items() if math.isfinite(v))
    mre = "n/a" if not math.isfinite(s.mre) else f"{s.mre:.2f}"
    sd = "n/a" if not math.isfinite(s.sd) else f"{s.sd:.2f}"
    med = "n/a" if not math.isfinite(s.median) else f"{s.median:.2f}"
    lines = [
        f"{s.n_cases} cases, {s.n_evaluated} landmarks evaluated; MRE {mre} (SD {sd}) mm, "
        f"median {med} mm",
        f"SDR: {sdr or 'n/a'}",
    ]
    if s.n_missing_prediction or s.n_missing_truth:
        lines.append(
            f"missing: {s.n_missing_prediction} predictions (counted as SDR failures), "
            f"{s.n_missing_truth} annotations (not evaluable)"
        )
    if result.cases_without_prediction:
        lines.append("no prediction file for: " + ", ".join(result.cases_without_prediction))
    lines += [f"warning: {w}" for w in result.warnings]
    return lines
