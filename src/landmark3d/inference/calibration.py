"""Calibration of the confidence scores: score -> expected error, P(error > 4 mm), confidence.

The design (features, ridge regression on log error, logistic probability) is described in
:mod:`landmark3d.inference.confidence`; this module holds the fitted model, its fit and its
JSON form (``RUN/calibration.json``, never pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from landmark3d.errors import CheckpointError
from landmark3d.io.atomic import atomic_write_text

FloatArray = NDArray[np.float64]
CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 1
THRESHOLD_MM = 4.0
TTA_KEY = "tta_spread_mm"
SCORE_KEYS = ("heatmap_spread_mm", "heatmap_peak", "coarse_fine_shift_mm", TTA_KEY)
LOG_OFFSET_MM = 0.5
Z_HEADROOM = 1.0
"""How far (in z, i.e. log mm) the expected error may extrapolate past the validation points."""
DEFAULT_ABSENCE_MARGIN_MM = 5.0


def probability_key(threshold_mm: float = THRESHOLD_MM) -> str:
    """Extras key of P(error > threshold), e.g. ``p_error_gt_4mm``."""
    return f"p_error_gt_{threshold_mm:g}mm".replace(".", "_")


def _transform(key: str, value: float) -> float:
    if not math.isfinite(value):
        return math.nan
    if key == "heatmap_peak":
        return -math.log(max(value, 0.01))
    return math.log(max(value, 0.0) + LOG_OFFSET_MM)


def _score_row(extras: Mapping[str, Any], keys: Sequence[str]) -> FloatArray:
    row = []
    for k in keys:
        v = extras.get(k)
        row.append(_transform(k, float(v)) if isinstance(v, int | float) else math.nan)
    return np.array(row, dtype=np.float64)


def _sigmoid(x: FloatArray) -> FloatArray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(x, -50.0, 50.0))), dtype=np.float64)


def rank_correlation(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with < 3 finite pairs."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan

    def ranks(v: FloatArray) -> FloatArray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # average the ranks of ties
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x[ok]), ranks(y[ok])
    sx, sy = rx.std(), ry.std()
    if sx == 0 or sy == 0:
        return math.nan
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy))


@dataclass
class Calibration:
    """Score -> expected error / P(error > threshold) / confidence (see the module docstring).

    Attributes:
        keys: raw score names (extras keys) used, in weight order.
        mean, scale: standardisation of the transformed scores.
        weights, intercept: ``z = intercept + weights · standardised`` predicts log(error + 0.5).
        smearing: mean of exp(residual) on the validation points.
        logistic: ``(a, b)`` of ``P(error > threshold_mm) = sigmoid(a + b·z)``.
        threshold_mm: the error threshold of the probability (4 mm).
        absence_margin_mm: margin of the absence decision.
        absence_enabled: whether predictions use the absence decision by default.
        stage: the predictor stage the calibration was fitted for.
        tta: whether ``tta_spread_mm`` was computed when fitting.
        stats: fit statistics (n points/cases, in-sample Spearman, ...).
        z_max: the largest ``z`` of the validation points (None in older files). The expected
            error extrapolates at most :data:`Z_HEADROOM` beyond it (a factor e): the fit is
            log-linear, and a score far outside the validation range (an image unlike any
            seen) would otherwise read as metres. Confidence and probability are not capped,
            so the ranking of predictions is unchanged.
        without_tta: for a calibration fitted with ``tta_spread_mm``: the same fit on the same
            points without it, used by predictions made without TTA (``--no-tta``, faster).
            Scoring them with the TTA model would enter the missing spread at its mean, with
            the other weights shrunk by its presence; the refit gives them their own weights.
    """

    keys: list[str]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    intercept: float
    smearing: float
    logistic: tuple[float, float]
    threshold_mm: float = THRESHOLD_MM
    absence_margin_mm: float = DEFAULT_ABSENCE_MARGIN_MM
    absence_enabled: bool = False
    stage: str = "fine"
    tta: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    version: int = CALIBRATION_VERSION
    z_max: float | None = None
    without_tta: Calibration | None = None

    def for_prediction(self, tta: bool) -> Calibration:
        """The model that scores predictions made with (``tta``) or without TTA."""
        if not tta and self.without_tta is not None:
            return self.without_tta
        return self

    # .................................................................... apply
    def score(self, extras: Mapping[str, Any]) -> float:
        """``z`` (predicted log(error + 0.5 mm)) of one landmark's raw-score extras."""
        x = _score_row(extras, self.keys)
        m, s = np.asarray(self.mean), np.asarray(self.scale)
        std = np.where(np.isfinite(x), (x - m) / s, 0.0)  # missing score: its validation mean
        return float(self.intercept + np.dot(np.asarray(self.weights), std))

    def expected_error_mm(self, z: float) -> float:
        """Expected error (mm) at score ``z``, extrapolating at most e× past the validation."""
        cap = 50.0 if self.z_max is None else self.z_max + Z_HEADROOM
        return max(self.smearing * math.exp(min(z, cap)) - LOG_OFFSET_MM, 0.0)

    def p_error_gt(self, z: float) -> float:
        a, b = self.logistic
        return float(_sigmoid(np.array([a + b * z]))[0])

    def annotate(self, extras: dict[str, float | str]) -> None:
        """Add ``expected_error_mm``, ``p_error_gt_4mm`` and ``confidence`` to ``extras``."""
        z = self.score(extras)
        p = self.p_error_gt(z)
        extras["expected_error_mm"] = round(self.expected_error_mm(z), 3)
        extras[probability_key(self.threshold_mm)] = round(p, 4)
        extras["confidence"] = round(1.0 - p, 4)

    # .................................................................... fit
    @classmethod
    def fit(
        cls,
        extras: Sequence[Mapping[str, Any]],
        errors_mm: ArrayLike,
        threshold_mm: float = THRESHOLD_MM,
        ridge: float = 1.0,
        keys: Sequence[str] = SCORE_KEYS,
    ) -> Calibration:
        """Fit on validation predictions: one extras dict and one true error (mm) per point.

        Scores finite for fewer than 80 % of the points, or constant, are left out.
        """
        err = np.asarray(errors_mm, dtype=np.float64).ravel()
        if len(extras) != len(err):
            raise ValueError(f"{len(extras)} score rows but {len(err)} errors")
        ok = np.isfinite(err)
        rows = [e for e, k in zip(extras, ok.tolist(), strict=True) if k]
        err = err[ok]
        x_all = np.array([_score_row(e, keys) for e in rows]).reshape(len(rows), len(keys))
        y = np.log(err + LOG_OFFSET_MM)
        use, mean, scale = [], [], []
        for j, key in enumerate(keys):
            col = x_all[:, j]
            fin = np.isfinite(col)
            if len(col) and fin.mean() >= 0.8 and np.std(col[fin]) > 1e-9:
                use.append(key)
                mean.append(float(col[fin].mean()))
                scale.append(float(col[fin].std()))
        cols = [list(keys).index(k) for k in use]
        x = (x_all[:, cols] - np.array(mean)) / np.array(scale) if use else np.zeros((len(y), 0))
        x = np.where(np.isfinite(x), x, 0.0)
        w, intercept = _nonnegative_ridge(x, y, ridge)
        z = intercept + x @ w
        resid = y - z
        smearing = float(np.mean(np.exp(resid))) if len(y) else 1.0
        logistic = _fit_logistic(z, err > threshold_mm)
        cal = cls(
            keys=use, mean=mean, scale=scale, weights=[float(v) for v in w],
            intercept=float(intercept), smearing=smearing, logistic=logistic,
            threshold_mm=float(threshold_mm), z_max=float(z.max()) if len(z) else None,
        )  # fmt: skip
        cal.stats = {
            "n_points": len(y),
            "n_above_threshold": int((err > threshold_mm).sum()),
            "mre_mm": float(err.mean()) if len(err) else None,
            "spearman_score_error": _json_float(rank_correlation(z, err)),
        }
        if TTA_KEY in use:
            rest = [k for k in keys if k != TTA_KEY]
            cal.without_tta = cls.fit(extras, errors_mm, threshold_mm, ridge, rest)
        return cal

    # .................................................................... JSON
    def to_dict(self) -> dict[str, Any]:
        fallback = self.without_tta
        self.without_tta = None  # asdict would recurse without the list fix-up below
        try:
            d = asdict(self)
        finally:
            self.without_tta = fallback
        d["logistic"] = list(self.logistic)
        d["without_tta"] = fallback.to_dict() if fallback is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: Path | None = None) -> Calibration:
        try:
            if int(d["version"]) != CALIBRATION_VERSION:
                raise ValueError(
                    f"version {d['version']} (this landmark3d reads {CALIBRATION_VERSION})"
                )
            cal = cls(
                keys=[str(k) for k in d["keys"]], mean=[float(v) for v in d["mean"]],
                scale=[float(v) for v in d["scale"]], weights=[float(v) for v in d["weights"]],
                intercept=float(d["intercept"]), smearing=float(d["smearing"]),
                logistic=(float(d["logistic"][0]), float(d["logistic"][1])),
                threshold_mm=float(d["threshold_mm"]),
                absence_margin_mm=float(d["absence_margin_mm"]),
                absence_enabled=bool(d["absence_enabled"]), stage=str(d["stage"]),
                tta=bool(d["tta"]), stats=dict(d.get("stats", {})),
                z_max=None if d.get("z_max") is None else float(d["z_max"]),
            )  # fmt: skip
            if d.get("without_tta") is not None:
                if not isinstance(d["without_tta"], Mapping):
                    raise ValueError("without_tta is not an object")
                cal.without_tta = cls.from_dict(d["without_tta"], path)
            n = len(cal.keys)
            if not (len(cal.mean) == len(cal.scale) == len(cal.weights) == n):
                raise ValueError("keys, mean, scale and weights differ in length")
            if any(k not in SCORE_KEYS for k in cal.keys) or min(cal.scale, default=1.0) <= 0:
                raise ValueError("unknown score name or non-positive scale")
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(
                f"the calibration file is malformed: {exc}.",
                path=path,
                fix="delete it and run `landmark3d calibrate --model RUN` again.",
            ) from None
        return cal

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        atomic_write_text(p, json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read the calibration file: {exc}.",
                path=p,
                fix="delete it and run `landmark3d calibrate --model RUN` again.",
            ) from None
        if not isinstance(data, dict):
            raise CheckpointError(
                "the calibration file is not a JSON object.",
                path=p,
                fix="delete it and recalibrate.",
            )
        return cls.from_dict(data, p)


def load_calibration(run: str | Path) -> Calibration | None:
    """``RUN/calibration.json`` if the run has one, else None."""
    path = Path(run) / CALIBRATION_FILE
    return Calibration.load(path) if path.is_file() else None


def _json_float(v: float) -> float | None:
    return None if not math.isfinite(v) else float(v)


def _nonnegative_ridge(x: FloatArray, y: FloatArray, ridge: float) -> tuple[FloatArray, float]:
    """Ridge regression of y on standardised x with weights >= 0 (negative ones dropped)."""
    n, f = x.shape
    w = np.zeros(f)
    if n == 0:
        return w, 0.0
    y0 = float(y.mean())
    active = list(range(f))
    while active:
        xa = x[:, active] - x[:, active].mean(axis=0)
        sol = np.linalg.solve(xa.T @ xa + ridge * np.eye(len(active)), xa.T @ (y - y0))
        if (sol >= 0).all():
            w[active] = sol
            break
        active = [a for a, s in zip(active, sol, strict=True) if s > 0]
    return w, float(y0 - (x.mean(axis=0) @ w if f else 0.0))


def _fit_logistic(
    z: FloatArray, positive: NDArray[np.bool_], iters: int = 50
) -> tuple[float, float]:
    """``(a, b)`` with ``b >= 0`` maximising the likelihood of ``positive`` given ``z``.

    One pseudo-case of each outcome (weight 0.5) at the mean score keeps the fit finite when
    the classes are separable or one is empty; a small L2 penalty on ``b`` does the same.
    """
    if len(z) == 0:
        return (0.0, 0.0)
    zc = float(z.mean())
    zz = np.concatenate([z, [zc, zc]])
    t = np.concatenate([positive.astype(np.float64), [1.0, 0.0]])
    wt = np.concatenate([np.ones(len(z)), [0.5, 0.5]])
    x = np.stack([np.ones(len(zz)), zz - zc], axis=1)
    beta = np.zeros(2)
    penalty = np.diag([0.0, 0.01 * len(z)])
    for _ in range(iters):
        p = _sigmoid(x @ beta)
        grad = x.T @ (wt * (t - p)) - penalty @ beta
        hess = (x * (wt * p * (1 - p))[:, None]).T @ x + penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        beta[1] = max(beta[1], 0.0)
        if np.abs(step).max() < 1e-8:
            break
    a, b = float(beta[0] - beta[1] * zc), float(beta[1])
    return (a, b)
