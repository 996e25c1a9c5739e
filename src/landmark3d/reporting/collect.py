"""Gather what a report shows from a run directory: metrics per stage, runs, config, plans.

Two kinds of directory are understood:

* a **single run** (``landmark3d demo`` / ``train`` + ``predict`` + ``evaluate``): prediction
  directories with a ``metrics.json`` — ``predictions_coarse`` (coarse only), ``predictions``
  (the default stage of ``landmark3d predict``: correlated when the run has a correlated model,
  else coarse + fine), ``predictions_<stage>``, or the cross-validation fold names
  ``pred_<stage>`` (an explicitly named directory wins over ``predictions``);
* a **cross-validation** directory with ``cv.json`` (:mod:`landmark3d.engine.cv`): the pooled
  summaries come from ``cv.json``, the per-instance errors from each fold's ``metrics.json``.

A single run's evaluated predictions may also lie outside it (``landmark3d predict --out pred/``
then ``evaluate --pred pred/``): pass those directories as ``pred_dirs``
(``landmark3d report RUN --pred pred/``); see :func:`stage_of_prediction_dir` for their stage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from landmark3d.errors import Landmark3dError
from landmark3d.evaluation import METRICS_JSON
from landmark3d.metrics import ErrorTable
from landmark3d.reporting.figures import StageErrors

STAGE_ORDER = ("coarse", "fine", "correlated")


@dataclass
class StageData:
    """One evaluated stage.

    Attributes:
        name: stage name (``coarse``, ``fine``, ``correlated``, ...).
        summary: summary dict shown in the tables (``metrics.json`` ``summary``, or the pooled
            summary of ``cv.json``).
        errors: per-instance errors (all cases of all runs, stacked).
        rows: the ``metrics.json`` rows, each with an added ``"run"`` key (run label).
        sources: the ``metrics.json`` files read.
    """

    name: str
    summary: dict[str, Any]
    errors: StageErrors
    rows: list[dict[str, Any]]
    sources: list[Path]


@dataclass
class ReportData:
    """Everything :func:`landmark3d.reporting.html.build_report` needs.

    Attributes:
        kind: ``"run"`` or ``"cv"``.
        root: the directory reported on.
        stages: stage name -> :class:`StageData`, pipeline order.
        landmark_names: table order.
        thresholds: SDR thresholds, mm.
        runs: run label (``"run"``, ``"fold0"``, ...) -> training run directory.
        per_fold: fold label -> stage -> summary dict (cross-validation only).
        failed: fold label (``"fold1"``, or ``"fold1 correlated"`` for one stage) -> error
            message (cross-validation only).
        config: the experiment config dict (or None).
        source_json: the file whose numbers the tables show (``metrics.json`` files or
            ``cv.json``).
    """

    kind: str
    root: Path
    stages: dict[str, StageData]
    landmark_names: list[str]
    thresholds: list[float]
    runs: dict[str, Path]
    per_fold: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    source_json: list[Path] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (Landmark3dError naming the file if unreadable)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Landmark3dError(
            f"cannot read JSON: {exc}.", path=path, fix="re-run the step that writes it."
        ) from exc
    if not isinstance(d, dict):
        raise Landmark3dError("expected a JSON object.", path=path, fix="re-run the step.")
    return d


def _stage_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def default_prediction_stage(run: Path) -> str:
    """The stage ``landmark3d predict`` uses by default (``--stage auto``) for ``run``.

    As :class:`landmark3d.inference.predictor.Predictor`: ``correlated`` when the run has a
    correlated model (``RUN/correlated/checkpoints/best``) and its plan has groups, else
    ``fine``.
    """
    if not (run / "correlated" / "checkpoints" / "best").is_dir():
        return "fine"
    try:
        plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "fine"
    return "correlated" if plan.get("correlated_groups") else "fine"


def prediction_dirs(run: Path) -> dict[str, Path]:
    """Stage -> prediction directory holding a ``metrics.json`` in a single run directory."""
    found: dict[str, Path] = {}
    if not run.is_dir():
        return found
    # "predictions" last: an explicitly named directory of the same stage wins
    for d in sorted(
        (p for p in run.iterdir() if p.is_dir()), key=lambda p: (p.name == "predictions", p.name)
    ):
        if not (d / METRICS_JSON).is_file():
            continue
        if d.name == "predictions":
            stage = default_prediction_stage(run)
        elif d.name.startswith("predictions_"):
            stage = d.name[len("predictions_") :]
        elif d.name.startswith("pred_"):
            stage = d.name[len("pred_") :]
        else:
            continue
        found.setdefault(stage, d)
    return dict(sorted(found.items(), key=lambda kv: _stage_key(kv[0])))


def stage_of_prediction_dir(run: Path, pred_dir: Path) -> str:
    """The stage of an evaluated prediction directory given explicitly (``report --pred``).

    ``predictions_<stage>`` and ``pred_<stage>`` name their stage; any other name holds what
    ``landmark3d predict`` writes by default for ``run`` (:func:`default_prediction_stage`).
    """
    name = Path(pred_dir).resolve().name
    for prefix in ("predictions_", "pred_"):
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix) :]
    return default_prediction_stage(run)


def _explicit_prediction_dirs(run: Path, pred_dirs: Sequence[Path]) -> dict[str, Path]:
    """Stage -> directory of the ``--pred`` directories (each must hold a ``metrics.json``)."""
    found: dict[str, Path] = {}
    for d in map(Path, pred_dirs):
        if not (d / METRICS_JSON).is_file():
            raise Landmark3dError(
                f"no {METRICS_JSON} in this prediction directory (not evaluated yet).",
                path=d,
                fix=f"run `landmark3d evaluate --pred {d} --truth <dataset>` first.",
            )
        stage = stage_of_prediction_dir(run, d)
        if stage in found:
            raise Landmark3dError(
                f"two --pred directories hold the {stage!r} stage: {found[stage]} and {d}.",
                path=d,
                fix="name each directory after its stage (predictions_coarse, "
                "predictions_fine, predictions_correlated) or pass only one per stage.",
            )
        found[stage] = d
    return found


def table_from_metrics(metrics: dict[str, Any]) -> ErrorTable:
    """The (cases x landmarks) :class:`ErrorTable` of a ``metrics.json`` dict (its rows)."""
    cases, names = list(metrics["cases"]), list(metrics["landmarks"])
    index = {(r["case"], r["landmark"]): r for r in metrics["rows"]}
    errors = np.full((len(cases), len(names)), math.nan)
    missing_pred = np.zeros(errors.shape, dtype=bool)
    missing_truth = np.zeros(errors.shape, dtype=bool)
    for i, c in enumerate(cases):
        for j, n in enumerate(names):
            row = index.get((c, n))
            if row is None or row["status"] == "missing_prediction":
                missing_pred[i, j] = True
            elif row["status"] == "missing_truth":
                missing_truth[i, j] = True
            else:
                errors[i, j] = float(row["error_mm"])
    return ErrorTable(errors, missing_pred, missing_truth, cases)


def _stage(name: str, summary: dict[str, Any], parts: list[tuple[str, Path]]) -> StageData:
    tables, rows, names = [], [], []
    for label, path in parts:
        m = read_json(path)
        names = list(m["landmarks"])
        tables.append(table_from_metrics(m))
        rows += [{**r, "run": label} for r in m["rows"]]
    table = ErrorTable.concat(tables)
    errors = StageErrors(table.errors, np.asarray(table.missing_prediction), names)
    return StageData(name, summary, errors, rows, [p for _, p in parts])


def load_report_data(root: str | Path, pred_dirs: Sequence[str | Path] = ()) -> ReportData:
    """Read a single-run or cross-validation directory (see the module docstring).

    Args:
        root: the run or cross-validation directory.
        pred_dirs: evaluated prediction directories of the run kept elsewhere (a single run
            only); each replaces the run's own directory of the same stage.

    Raises:
        Landmark3dError: no evaluated predictions found, a ``pred_dirs`` entry is not
            evaluated or repeats a stage, ``pred_dirs`` with a cross-validation, or a JSON
            file is unreadable.
    """
    root = Path(root)
    cv_path = root / "cv.json"
    if cv_path.is_file():
        if pred_dirs:
            raise Landmark3dError(
                "--pred adds predictions to a single run, not to a cross-validation.",
                path=root,
                fix="report the cross-validation without --pred, or pass a run directory.",
            )
        return _load_cv(root, read_json(cv_path))
    dirs = {
        **prediction_dirs(root),
        **_explicit_prediction_dirs(root, [Path(p) for p in pred_dirs]),
    }
    dirs = dict(sorted(dirs.items(), key=lambda kv: _stage_key(kv[0])))
    if not dirs:
        raise Landmark3dError(
            "no evaluated predictions here (no predictions*/metrics.json, pred_*/metrics.json "
            "or cv.json).",
            path=root,
            fix="run `landmark3d predict` and `landmark3d evaluate --pred <pred dir>`, then "
            "`landmark3d report RUN --pred <pred dir>` if the predictions are outside the run "
            "(or use `landmark3d demo` / `landmark3d cv`).",
        )
    stages = {}
    for s, d in dirs.items():
        m = read_json(d / METRICS_JSON)
        stages[s] = _stage(s, m["summary"], [("run", d / METRICS_JSON)])
    first = read_json(next(iter(dirs.values())) / METRICS_JSON)
    config = read_json(root / "config.json") if (root / "config.json").is_file() else None
    return ReportData(
        kind="run",
        root=root,
        stages=stages,
        landmark_names=list(first["landmarks"]),
        thresholds=[float(t) for t in first["thresholds_mm"]],
        runs={"run": root},
        config=config,
        source_json=[d / METRICS_JSON for d in dirs.values()],
    )


def _load_cv(root: Path, cv: dict[str, Any]) -> ReportData:
    stages: dict[str, StageData] = {}
    runs: dict[str, Path] = {}
    per_fold: dict[str, dict[str, dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    for label, f in cv["folds"].items():
        runs[label] = root / f["run_dir"]
        for stage, err in (f.get("stage_errors") or {}).items():
            failed[f"{label} {stage}"] = str(err)
        if f["status"] == "failed" or not f["summaries"]:
            failed[label] = str(f.get("error"))
            continue
        per_fold[label] = f["summaries"]
    for s in cv["stages"]:
        if s not in cv["pooled"]:
            continue
        parts = [
            (label, root / cv["folds"][label]["metrics_files"][s])
            for label in per_fold
            if s in cv["folds"][label]["metrics_files"]
        ]
        stages[s] = _stage(s, cv["pooled"][s], parts)
    if not stages:
        raise Landmark3dError(
            "the cross-validation has no complete fold to report on.",
            path=root / "cv.json",
            fix="fix the failed folds (see cv.json) and run `landmark3d cv --resume`.",
        )
    first: dict[str, Any] = next(iter(cv["pooled"].values()), {})
    thresholds = [float(t) for t in first.get("thresholds_mm", [])]
    return ReportData(
        kind="cv",
        root=root,
        stages=stages,
        landmark_names=list(cv["landmarks"]),
        thresholds=thresholds,
        runs=runs,
        per_fold=per_fold,
        failed=failed,
        config=cv.get("config"),
        source_json=[root / "cv.json"],
    )


def worst_cases(data: ReportData, n: int = 3) -> list[tuple[str, str, float]]:
    """The ``n`` cases with the largest mean radial error in the last stage.

    Returns:
        ``[(run label, case id, mean error mm)]``, worst first (cases without any evaluated
        landmark are left out).
    """
    if not data.stages or n <= 0:
        return []
    last = list(data.stages.values())[-1]
    per_case: dict[tuple[str, str], list[float]] = {}
    for r in last.rows:
        if r["status"] == "evaluated" and r["error_mm"] is not None:
            per_case.setdefault((r["run"], r["case"]), []).append(float(r["error_mm"]))
    ranked = sorted(
        ((run, case, float(np.mean(e))) for (run, case), e in per_case.items()),
        key=lambda t: -t[2],
    )
    return ranked[:n]
