"""Landmark localisation metrics: radial error, MRE/SD/median, SDR, per landmark and per fold.

Definitions (after Chen et al., SA-LSTM, TMI 2022, as used by Pang et al., MIDL 2023):

* **Radial error** of one landmark instance = Euclidean distance in world mm between the
  predicted and the annotated position.
* **MRE** = mean radial error over all evaluated landmark instances (every case x landmark with
  both a prediction and a truth). **SD** is the *sample* standard deviation (``ddof=1``) over the
  same instances; with a single instance it is undefined (NaN, ``null`` in JSON).
* **SDR@r** (successful detection rate) = percentage of landmark instances whose radial error is
  *within* r mm, counted inclusively (``error <= r``; a tolerance of :data:`SDR_TOLERANCE_MM`
  absorbs floating-point noise so that an error of exactly r computed from world coordinates is
  not lost to rounding).

Missing data are never dropped silently:

* a **missing prediction** (truth present, no prediction) cannot enter MRE/SD/median, but it
  counts in the SDR denominator as a *failure* at every threshold, and it is counted in
  ``n_missing_prediction``;
* a **missing truth** (no annotation; with or without a prediction) is not evaluable: it is in
  neither MRE nor SDR and is counted in ``n_missing_truth``.

Pooled cross-validation figures are computed over all landmark instances of all folds together
(not as a mean of per-fold means). This module is numpy only (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

DEFAULT_SDR_THRESHOLDS_MM: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0, 8.0)
SDR_TOLERANCE_MM = 1e-9
SD_DDOF = 1


# ------------------------------------------------------------------------------ errors
def radial_errors(pred: ArrayLike, truth: ArrayLike) -> FloatArray:
    """Euclidean distance in world mm between predictions and truths.

    Args:
        pred: predicted positions, shape (C, N, 3) (or any (..., 3)), LPS mm; NaN = missing.
        truth: annotated positions, same shape, LPS mm; NaN = missing.

    Returns:
        shape (C, N) (i.e. ``pred.shape[:-1]``) float64; NaN where either point is missing.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if p.shape != t.shape or p.shape[-1:] != (3,):
        raise ValueError(f"pred {p.shape} and truth {t.shape} must have the same shape (..., 3)")
    err = np.asarray(np.sqrt(np.sum((p - t) ** 2, axis=-1)), dtype=np.float64)
    missing = np.isnan(p).any(axis=-1) | np.isnan(t).any(axis=-1)
    err[missing] = np.nan
    return err


def _check_thresholds(thresholds: Iterable[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if not values or any(not math.isfinite(t) or t <= 0 for t in values):
        raise ValueError(f"SDR thresholds must be positive finite mm values, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"SDR thresholds listed twice: {values}")
    return tuple(sorted(values))


def threshold_key(threshold: float) -> str:
    """The JSON/CSV key of an SDR threshold: ``2.0 -> "2"``, ``2.5 -> "2.5"``."""
    return f"{float(threshold):g}"


# ------------------------------------------------------------------------------ tables
@dataclass
class ErrorTable:
    """Radial errors of C cases x N landmarks with the reason for every missing entry.

    Attributes:
        errors: shape (C, N) radial errors in mm; NaN where not evaluated.
        missing_prediction: shape (C, N) bool; truth present, prediction missing.
        missing_truth: shape (C, N) bool; no truth (not evaluable, whatever the prediction).
        case_ids: C case identifiers (optional labels; ``case0``, ... when not given).
    """

    errors: FloatArray
    missing_prediction: BoolArray
    missing_truth: BoolArray
    case_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.errors = np.asarray(self.errors, dtype=np.float64)
        if self.errors.ndim != 2:
            raise ValueError(f"errors must have shape (cases, landmarks), got {self.errors.shape}")
        shape = self.errors.shape
        self.missing_truth = _mask(self.missing_truth, shape, "missing_truth")
        self.missing_prediction = _mask(self.missing_prediction, shape, "missing_prediction")
        # Not evaluable beats missing prediction; an unexplained NaN error is a missing
        # prediction (the conservative choice: it is an SDR failure, never silently dropped).
        unexplained = np.isnan(self.errors) & ~self.missing_truth
        self.missing_prediction = (self.missing_prediction | unexplained) & ~self.missing_truth
        if not self.case_ids:
            self.case_ids = [f"case{i}" for i in range(shape[0])]
        self.case_ids = [str(c) for c in self.case_ids]
        if len(self.case_ids) != shape[0]:
            raise ValueError(f"{len(self.case_ids)} case ids for {shape[0]} rows of errors")

    @property
    def evaluated(self) -> BoolArray:
        """Shape (C, N) mask of entries with both prediction and truth."""
        return np.asarray(~self.missing_truth & ~self.missing_prediction, dtype=bool)

    @classmethod
    def from_points(
        cls, pred: ArrayLike, truth: ArrayLike, case_ids: Sequence[str] | None = None
    ) -> ErrorTable:
        """Errors and missing masks from positions (C, N, 3) in LPS mm (NaN rows = missing)."""
        p = np.asarray(pred, dtype=np.float64)
        t = np.asarray(truth, dtype=np.float64)
        errors = radial_errors(p, t)
        missing_truth = np.asarray(np.isnan(t).any(axis=-1), dtype=bool)
        missing_pred = np.asarray(np.isnan(p).any(axis=-1) & ~missing_truth, dtype=bool)
        return cls(errors, missing_pred, missing_truth, list(case_ids or []))

    @classmethod
    def concat(cls, tables: Sequence[ErrorTable]) -> ErrorTable:
        """Stack tables of the same landmarks along the case axis."""
        if not tables:
            raise ValueError("no error tables to concatenate")
        return cls(
            np.concatenate([t.errors for t in tables], axis=0),
            np.concatenate([t.missing_prediction for t in tables], axis=0),
            np.concatenate([t.missing_truth for t in tables], axis=0),
            [c for t in tables for c in t.case_ids],
        )


def _mask(mask: ArrayLike | None, shape: tuple[int, ...], what: str) -> BoolArray:
    if mask is None:
        return np.zeros(shape, dtype=bool)
    m = np.asarray(mask, dtype=bool)
    if m.shape != shape:
        raise ValueError(f"{what} has shape {m.shape}, errors have {shape}")
    return m.copy()


class ErrorAccumulator:
    """Collects per-case errors one case at a time (MONAI-style metric accumulator).

    >>> acc = ErrorAccumulator(["a", "b"])
    >>> _ = acc.add("c1", pred=[[0, 0, 0], [1, 1, 1]], truth=[[3, 0, 0], [1, 1, 1]])
    >>> acc.summary().mre
    1.5
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = [str(n) for n in names]
        self._tables: list[ErrorTable] = []

    def __len__(self) -> int:
        return sum(t.errors.shape[0] for t in self._tables)

    def add(self, case_id: str, pred: ArrayLike, truth: ArrayLike) -> FloatArray:
        """Add one case: ``pred`` and ``truth`` shape (N, 3) LPS mm in ``names`` order.

        Returns:
            the case's radial errors, shape (N,) mm (NaN where not evaluated).
        """
        p = np.asarray(pred, dtype=np.float64).reshape(1, -1, 3)
        t = np.asarray(truth, dtype=np.float64).reshape(1, -1, 3)
        if p.shape[1] != len(self.names) or t.shape[1] != len(self.names):
            raise ValueError(
                f"expected {len(self.names)} landmarks, got pred {p.shape[1]}, truth {t.shape[1]}"
            )
        table = ErrorTable.from_points(p, t, [case_id])
        self._tables.append(table)
        return table.errors[0].copy()

    def table(self) -> ErrorTable:
        """All cases added so far."""
        if not self._tables:
            n = len(self.names)
            return ErrorTable(np.zeros((0, n)), np.zeros((0, n), bool), np.zeros((0, n), bool))
        return ErrorTable.concat(self._tables)

    def summary(self, thresholds: Iterable[float] = DEFAULT_SDR_THRESHOLDS_MM) -> Summary:
        """:func:`summarize` of all cases added so far."""
        return summarize_table(self.table(), self.names, thresholds)

    def reset(self) -> None:
        self._tables.clear()


# ------------------------------------------------------------------------------ summaries
@dataclass
class LandmarkSummary:
    """Statistics of one landmark (or of any group of instances), errors in mm.

    Attributes:
        n: evaluated instances (prediction and truth present).
        n_missing_prediction: truth present, prediction missing (SDR failures).
        n_missing_truth: not evaluable.
        mre, sd, median, max: mean, sample SD (ddof=1), median and maximum radial error (mm);
            NaN when undefined (no instance; SD also with one instance).
        sdr: threshold mm -> percentage of ``n + n_missing_prediction`` instances with
            error <= threshold.
    """

    n: int
    n_missing_prediction: int
    n_missing_truth: int
    mre: float
    sd: float
    median: float
    max: float
    sdr: dict[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "n_missing_prediction": self.n_missing_prediction,
            "n_missing_truth": self.n_missing_truth,
            "mre": _json_float(self.mre),
            "sd": _json_float(self.sd),
            "median": _json_float(self.median),
            "max": _json_float(self.max),
            "sdr": {threshold_key(t): _json_float(v) for t, v in self.sdr.items()},
        }


@dataclass
class Summary:
    """Metrics over C cases x N landmarks (see the module docstring for definitions).

    Attributes:
        n_cases, n_landmarks: size of the evaluated table.
        n_evaluated: instances with prediction and truth.
        n_missing_prediction: instances with truth but no prediction (SDR failures).
        n_missing_truth: instances without truth (not evaluable).
        mre, sd, median, max: over all evaluated instances, mm (SD: sample, ddof=1).
        sdr: threshold mm -> percent.
        per_landmark: landmark name -> :class:`LandmarkSummary`.
        thresholds: the SDR thresholds, mm, ascending.
    """

    n_cases: int
    n_landmarks: int
    n_evaluated: int
    n_missing_prediction: int
    n_missing_truth: int
    mre: float
    sd: float
    median: float
    max: float
    sdr: dict[float, float]
    per_landmark: dict[str, LandmarkSummary]
    thresholds: tuple[float, ...] = DEFAULT_SDR_THRESHOLDS_MM

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (NaN -> None, threshold keys as ``"2"``, ``"2.5"``, ...)."""
        return {
            "n_cases": self.n_cases,
            "n_landmarks": self.n_landmarks,
            "n_evaluated": self.n_evaluated,
            "n_missing_prediction": self.n_missing_prediction,
            "n_missing_truth": self.n_missing_truth,
            "mre": _json_float(self.mre),
            "sd": _json_float(self.sd),
            "median": _json_float(self.median),
            "max": _json_float(self.max),
            "sdr": {threshold_key(t): _json_float(v) for t, v in self.sdr.items()},
            "thresholds_mm": list(self.thresholds),
            "sd_ddof": SD_DDOF,
            "sdr_rule": "error_mm <= threshold_mm; missing predictions count as failures",
            "per_landmark": {name: s.to_dict() for name, s in self.per_landmark.items()},
        }


def _json_float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _stats(
    errors: FloatArray,
    missing_prediction: BoolArray,
    missing_truth: BoolArray,
    thr: tuple[float, ...],
) -> LandmarkSummary:
    evaluated = ~missing_prediction & ~missing_truth
    values = errors[evaluated]
    n = int(values.size)
    n_pred_missing = int(missing_prediction.sum())
    denominator = n + n_pred_missing
    sdr = {
        t: (100.0 * float(np.sum(values <= t + SDR_TOLERANCE_MM)) / denominator)
        if denominator
        else math.nan
        for t in thr
    }
    return LandmarkSummary(
        n=n,
        n_missing_prediction=n_pred_missing,
        n_missing_truth=int(missing_truth.sum()),
        mre=float(values.mean()) if n else math.nan,
        sd=float(values.std(ddof=SD_DDOF)) if n > SD_DDOF else math.nan,
        median=float(np.median(values)) if n else math.nan,
        max=float(values.max()) if n else math.nan,
        sdr=sdr,
    )


def summarize_table(
    table: ErrorTable,
    names: Sequence[str],
    thresholds: Iterable[float] = DEFAULT_SDR_THRESHOLDS_MM,
) -> Summary:
    """:func:`summarize` of an :class:`ErrorTable`."""
    thr = _check_thresholds(thresholds)
    names = [str(n) for n in names]
    c, n = table.errors.shape
    if len(names) != n:
        raise ValueError(f"{len(names)} landmark names for {n} columns of errors")
    overall = _stats(table.errors, table.missing_prediction, table.missing_truth, thr)
    per_landmark = {
        name: _stats(
            table.errors[:, j], table.missing_prediction[:, j], table.missing_truth[:, j], thr
        )
        for j, name in enumerate(names)
    }
    return Summary(
        n_cases=c,
        n_landmarks=n,
        n_evaluated=overall.n,
        n_missing_prediction=overall.n_missing_prediction,
        n_missing_truth=overall.n_missing_truth,
        mre=overall.mre,
        sd=overall.sd,
        median=overall.median,
        max=overall.max,
        sdr=overall.sdr,
        per_landmark=per_landmark,
        thresholds=thr,
    )


def summarize(
    errors: ArrayLike,
    names: Sequence[str],
    thresholds: Iterable[float] = DEFAULT_SDR_THRESHOLDS_MM,
    missing_pred_mask: ArrayLike | None = None,
    missing_truth_mask: ArrayLike | None = None,
) -> Summary:
    """Summarise radial errors of C cases x N landmarks.

    Args:
        errors: shape (C, N) radial errors in mm (NaN where not evaluated).
        names: the N landmark names.
        thresholds: SDR radii in mm.
        missing_pred_mask: shape (C, N), True where the truth exists but the prediction is
            missing. NaN errors not marked in either mask are taken as missing predictions.
        missing_truth_mask: shape (C, N), True where there is no truth (not evaluable); this
            wins over ``missing_pred_mask``.

    Returns:
        :class:`Summary` (overall and per landmark).
    """
    table = ErrorTable(
        np.asarray(errors, dtype=np.float64),
        missing_pred_mask,  # type: ignore[arg-type]
        missing_truth_mask,  # type: ignore[arg-type]
    )
    return summarize_table(table, names, thresholds)


FoldErrors = ErrorTable | tuple[Any, ...] | NDArray[np.float64]


def _as_table(value: FoldErrors) -> ErrorTable:
    if isinstance(value, ErrorTable):
        return value
    if isinstance(value, tuple):
        if not 1 <= len(value) <= 3:
            raise ValueError("a fold is (errors[, missing_pred_mask[, missing_truth_mask]])")
        padded = (*value, None, None)[:3]
        return ErrorTable(np.asarray(padded[0], dtype=np.float64), padded[1], padded[2])
    return ErrorTable(np.asarray(value, dtype=np.float64), None, None)  # type: ignore[arg-type]


def summarize_folds(
    per_fold: Mapping[str, FoldErrors],
    names: Sequence[str],
    thresholds: Iterable[float] = DEFAULT_SDR_THRESHOLDS_MM,
) -> dict[str, Any]:
    """Per-fold and pooled summaries of a cross-validation.

    Args:
        per_fold: fold name -> :class:`ErrorTable`, or ``(errors, missing_pred_mask,
            missing_truth_mask)`` (masks optional), or just an errors array (C_k, N).
        names: the N landmark names.
        thresholds: SDR radii in mm.

    Returns:
        ``{"pooled": Summary over all instances of all folds, "folds": {name: Summary}}``.
    """
    if not per_fold:
        raise ValueError("no folds to summarise")
    tables = {k: _as_table(v) for k, v in per_fold.items()}
    folds = {k: summarize_table(t, names, thresholds) for k, t in tables.items()}
    pooled = summarize_table(ErrorTable.concat(list(tables.values())), names, thresholds)
    return {"pooled": pooled, "folds": folds}


# ------------------------------------------------------------------------------ formatting
def format_mre(summary: Summary | LandmarkSummary, digits: int = 2) -> str:
    """``"2.13 (1.18)"``: MRE with SD in brackets, as the literature's tables print it."""

    def fmt(v: float) -> str:
        return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"

    return f"{fmt(summary.mre)} ({fmt(summary.sd)})"


def format_sdr(summary: Summary | LandmarkSummary, digits: int = 1) -> str:
    """``"56.4 / 71.6 / 80.0 / 90.0 / 95.9"``: SDR percentages in threshold order."""
    return " / ".join(
        "n/a" if not math.isfinite(v) else f"{v:.{digits}f}" for v in summary.sdr.values()
    )
