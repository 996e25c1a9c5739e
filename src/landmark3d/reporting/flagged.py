"""The report's first section: the predictions a reader should check, least confident first.

``landmark3d predict`` writes, per landmark, ``expected_error_mm``, ``confidence`` and
``p_error_gt_4mm`` for calibrated runs (and a missing reason when the landmark is judged
outside the image). This module reads them back from the final stage's prediction files — the
files beside each ``metrics.json`` — joins the true error from that ``metrics.json`` and ranks
them, so the report can open with what deserves a second look rather than with averages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from landmark3d.evaluation import find_predictions
from landmark3d.io.landmarks import read_landmarks
from landmark3d.reporting.collect import ReportData, StageData, read_json

DEFAULT_FLAG_MM = 4.0
"""Expected error (mm) above which a prediction is flagged (the SDR@4 mm threshold)."""


@dataclass(frozen=True)
class ScoredPrediction:
    """One predicted landmark with its confidence scores.

    Attributes:
        run: run label (``"run"``, ``"fold0"``, ...).
        case: case id.
        landmark: landmark name.
        expected_error_mm: calibrated expected error (mm); NaN for an absent landmark.
        confidence: 1 − P(error > 4 mm), in [0, 1]; NaN if absent.
        true_error_mm: radial error against the annotation (mm); NaN when either is missing.
        absent_reason: why the landmark was reported absent, or ``""``.
    """

    run: str
    case: str
    landmark: str
    expected_error_mm: float
    confidence: float
    true_error_mm: float
    absent_reason: str

    def flagged(self, above_mm: float) -> bool:
        """Absent, or expected error above ``above_mm``."""
        return bool(self.absent_reason) or self.expected_error_mm > above_mm


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _stage_predictions(stage: StageData) -> list[ScoredPrediction]:
    """Scored predictions of every prediction directory of ``stage`` (calibrated ones only)."""
    run_of = {str(r["case"]): str(r.get("run", "run")) for r in stage.rows}
    out: list[ScoredPrediction] = []
    for source in stage.sources:
        metrics = read_json(source)
        truth = {(r["case"], r["landmark"]): _num(r.get("error_mm")) for r in metrics["rows"]}
        files, _ = find_predictions(Path(source).parent)
        for case, path in files.items():
            pred = read_landmarks(path)
            for name in pred.names:
                extras = pred.extras.get(name, {})
                reason = pred.missing_reason.get(name, "")
                if "expected_error_mm" not in extras and not reason:
                    continue  # an uncalibrated run: nothing to rank by
                out.append(
                    ScoredPrediction(
                        run=run_of.get(case, "run"),
                        case=case,
                        landmark=name,
                        expected_error_mm=_num(extras.get("expected_error_mm")),
                        confidence=_num(extras.get("confidence")),
                        true_error_mm=truth.get((case, name), math.nan),
                        absent_reason=reason,
                    )
                )
    return out


def scored_predictions(data: ReportData) -> list[ScoredPrediction]:
    """The final stage's scored predictions, least confident first.

    Absent landmarks come first, then decreasing expected error. Empty when the run was not
    calibrated (no ``expected_error_mm`` in the prediction files).
    """
    if not data.stages:
        return []
    final = list(data.stages.values())[-1]
    preds = _stage_predictions(final)

    def key(p: ScoredPrediction) -> tuple[int, float]:
        exp = p.expected_error_mm if math.isfinite(p.expected_error_mm) else math.inf
        return (0 if p.absent_reason else 1, -exp)

    return sorted(preds, key=key)


def flag_summary(preds: list[ScoredPrediction], above_mm: float) -> dict[str, Any]:
    """How well the flags pick out large errors: counts, and recall of true errors > 4 mm.

    Returns:
        ``{"n", "flagged", "absent", "true_gt4", "true_gt4_flagged"}`` (counts over ``preds``
        with a known true error for the last two).
    """
    big = [p for p in preds if math.isfinite(p.true_error_mm) and p.true_error_mm > 4.0]
    return {
        "n": len(preds),
        "flagged": sum(p.flagged(above_mm) for p in preds),
        "absent": sum(bool(p.absent_reason) for p in preds),
        "true_gt4": len(big),
        "true_gt4_flagged": sum(p.flagged(above_mm) for p in big),
    }
