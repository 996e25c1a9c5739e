"""Confidence for every predicted landmark, its calibration, and the absence decision.

Raw scores (per landmark, all from the model, written as extras by the predictor):

* ``heatmap_peak`` — the raw maximum of the fine (or correlated) heatmap; a trained U-Net
  answers ~1 where it recognises the landmark and less where it is unsure.
* ``heatmap_spread_mm`` — the second-moment width of the heatmap around its maximum, in mm:
  ``sqrt(sum w·|x − x_max|² / sum w)`` with ``w = max(h − 0.2·peak, 0)``. The floor at 20 % of
  the peak removes the network's low background (which would otherwise dominate a 32³ sum);
  a sharp single peak gives ~1·sigma, a wide or two-peaked map gives many mm.
* ``coarse_fine_shift_mm`` — how far the fine stage moved the coarse estimate; a large move
  means the two stages disagree.
* ``tta_spread_mm`` (only with ``tta=True``) — test-time augmentation: the fine stage is run
  again from patch centres shifted by a few mm (4 tetrahedral offsets of 1/8 of the patch
  edge), and the RMS distance of those answers from the main prediction is the score. We shift
  rather than flip: a flipped head swaps the left/right landmarks, which the model is meant
  to tell apart.

Calibration (:class:`Calibration`, fitted on a run's validation cases by
:mod:`landmark3d.engine.calibrate`): the scores are transformed to log scale
(``log(spread + 0.5)``, ``−log(peak)``, ``log(shift + 0.5)``, ``log(tta + 0.5)``),
standardised, and a ridge regression of ``log(error + 0.5 mm)`` on them gives one score ``z``
(weights constrained ≥ 0, so that every raw score can only raise the expected error — with
the handful of validation cases a run has, a sign-flipped weight is noise). Then:

* ``expected_error_mm = smearing · exp(z) − 0.5`` (Duan's smearing factor: the mean of
  ``exp(residual)``, so the back-transformed value is a mean, not a median);
* ``p_error_gt_4mm = sigmoid(a + b·z)``, a 1-D logistic fit (``b ≥ 0``, with a pseudo-case of
  each outcome at the mean score so that it stays finite when validation has no large error);
* ``confidence = 1 − p_error_gt_4mm``: the calibrated probability that the error is at most
  4 mm. All three are strictly monotone in ``z``, so they rank predictions identically.

The fitted model and its JSON form live in :mod:`landmark3d.inference.calibration` (re-exported
here). A score not computed at prediction time (e.g. ``tta_spread_mm`` without TTA) enters with its
validation mean, i.e. it does not move ``z``.

Absence: the coarse regressor is not bounded to the grid (normalised ``|t| > 1`` is allowed), so
a landmark outside a cropped scan is predicted beyond the image. ``beyond_image_mm`` is the
distance (mm) of the coarse or final estimate outside the image's voxel extent, whichever is
larger; above the calibrated margin the landmark is reported absent (NaN row, ``missing_reason``
"outside field of view (predicted X mm beyond the image)"). The margin is the middle of the
validation's best-F1 plateau (a landmark predicted just past the border of a tight scan is not
thrown away). A second rule catches the landmarks the coarse stage places inside the image
although they are not there: the fine heatmap then has no peak, and its spread approaches
that of a flat map over the patch. Above :func:`flat_heatmap_spread_mm` (80 % of a uniform
map's spread around the patch centre, e.g. 19.2 mm for a 32³ patch of 1.5 mm; a geometric
bound, because validation rarely holds such cases) the landmark is reported "not found". On
the benchmark's cropped held-out scans no landmark inside the image had a spread above
17 mm, and most of those outside it had 18-34 mm. The decision is enabled when the
run's training/validation annotations contain landmarks outside their images (the model has
learnt to extrapolate there); otherwise a prediction beyond the image is kept and flagged
(``outside_image = 1``), unless the caller enables the decision explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn

from landmark3d.geometry.space import Geometry
from landmark3d.inference.calibration import (
    CALIBRATION_FILE,
    DEFAULT_ABSENCE_MARGIN_MM,
    SCORE_KEYS,
    THRESHOLD_MM,
    Calibration,
    load_calibration,
    probability_key,
    rank_correlation,
)
from landmark3d.io.landmark_set import LandmarkSet

FloatArray = NDArray[np.float64]
__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_ABSENCE_MARGIN_MM",
    "SCORE_KEYS",
    "THRESHOLD_MM",
    "Calibration",
    "HeatmapCapture",
    "absence_reason",
    "annotate_prediction",
    "beyond_image_mm",
    "fit_absence_margin",
    "flag_above",
    "flat_heatmap_spread_mm",
    "heatmap_spread_mm",
    "load_calibration",
    "not_found_reason",
    "probability_key",
    "rank_correlation",
    "tta_offsets",
    "tta_spread",
]
SPREAD_FLOOR = 0.2
FLAT_FRACTION = 0.8
MARGIN_CANDIDATES_MM = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0)
TTA_FRACTION = 0.125


# ------------------------------------------------------------------------------ raw scores
def heatmap_spread_mm(heat: ArrayLike, spacing_mm: ArrayLike, floor: float = SPREAD_FLOOR) -> float:
    """Second-moment width (mm) of a 3D heatmap (X, Y, Z) around its maximum.

    Weights are ``max(h − floor·peak, 0)``; distances use the voxel ``spacing_mm`` (3,) (the
    patch grid is orthonormal, so index offsets times spacing are mm). NaN for a map without
    a positive finite maximum.
    """
    h = np.asarray(heat, dtype=np.float64)
    if h.ndim != 3 or not np.isfinite(h).all():
        return math.nan
    peak = float(h.max())
    if peak <= 0.0:
        return math.nan
    w = np.clip(h - floor * peak, 0.0, None)
    m = np.unravel_index(int(np.argmax(h)), h.shape)
    sp = np.asarray(spacing_mm, dtype=np.float64).reshape(3)
    d2 = np.zeros(h.shape)
    for axis in range(3):
        off = (np.arange(h.shape[axis]) - m[axis]) * sp[axis]
        shape = [1, 1, 1]
        shape[axis] = -1
        d2 = d2 + (off**2).reshape(shape)
    return float(math.sqrt(float((w * d2).sum()) / float(w.sum())))


class HeatmapCapture:
    """Records the heatmaps that ``modules`` produce while the context is open.

    The forward steps (:mod:`landmark3d.inference.steps`) return positions and peaks only; a
    forward hook keeps each call's output (a tensor, or the ``"heatmaps"`` entry of a dict)
    so the spread can be computed without running the networks twice. With ``enabled=False``
    nothing is hooked.
    """

    def __init__(self, modules: Mapping[str, nn.Module], enabled: bool = True) -> None:
        self.modules = dict(modules) if enabled else {}
        self.outputs: dict[str, list[FloatArray]] = {k: [] for k in self.modules}
        self._handles: list[Any] = []

    def _hook(self, key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            heat = output["heatmaps"] if isinstance(output, Mapping) else output
            if isinstance(heat, torch.Tensor):
                self.outputs[key].append(heat.detach().float().cpu().numpy())

        return hook

    def __enter__(self) -> HeatmapCapture:
        for key, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(key)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def fine_spreads(
        self,
        names: Sequence[str],
        routes: Mapping[str, tuple[str, int]],
        centers: ArrayLike,
        spacing_mm: ArrayLike,
    ) -> FloatArray:
        """Spreads (L,) mm of the landmarks ``names`` after one :func:`fine_predict` call.

        ``fine_predict`` runs one patch per landmark with a finite centre, in ``names`` order;
        if the recorded calls do not match that, every spread is NaN (never a wrong one).
        """
        out = np.full(len(names), np.nan)
        queues = {k: list(v) for k, v in self.outputs.items()}
        c = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
        pairs = []
        for row, name in enumerate(names):
            if not np.isfinite(c[row]).all():
                continue
            key, channel = routes[name]
            if not queues.get(key):
                return out
            pairs.append((row, queues[key].pop(0), channel))
        if any(queues.values()):
            return out
        for row, heat, channel in pairs:
            out[row] = heatmap_spread_mm(heat[0, channel], spacing_mm)
        return out

    def group_spreads(self, key: str, n: int, spacing_mm: ArrayLike) -> FloatArray:
        """Spreads (n,) mm of a correlated group's members after one group forward pass."""
        calls = self.outputs.get(key, [])
        if len(calls) != 1 or calls[0].shape[1] != n:
            return np.full(n, np.nan)
        return np.array([heatmap_spread_mm(calls[0][0, r], spacing_mm) for r in range(n)])


def tta_offsets(
    patch_size: Sequence[int], spacing_mm: ArrayLike, fraction: float = TTA_FRACTION
) -> FloatArray:
    """Four patch-centre offsets (4, 3) in mm: tetrahedron vertices at ``fraction`` of the
    smallest patch edge (mm) from the centre."""
    edge = float(np.min(np.asarray(patch_size, dtype=np.float64) * np.asarray(spacing_mm)))
    tetra = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
    return tetra / math.sqrt(3.0) * fraction * edge


def tta_spread(
    predict: Callable[[list[FloatArray]], list[FloatArray]],
    centers: ArrayLike,
    reference: ArrayLike,
    offsets: ArrayLike,
) -> FloatArray:
    """RMS distance (N,) mm of the predictions from shifted centres to ``reference``.

    ``predict`` maps a list of K centre sets (each (N, 3) LPS mm: ``centers + offset`` for
    every offset) to K position arrays (N, 3) (NaN where it has no answer) — all shifts in one
    call, so the networks can run them as one batch; a landmark NaN under any offset gets NaN.
    """
    c = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1, 3)
    offs = np.asarray(offsets, dtype=np.float64).reshape(-1, 3)
    answers = predict([c + off for off in offs])
    if len(answers) != len(offs):
        raise ValueError(f"{len(offs)} shifted centre sets but {len(answers)} answers")
    d2 = np.zeros(len(c))
    for positions in answers:
        d2 += ((np.asarray(positions, dtype=np.float64) - ref) ** 2).sum(axis=1)
    return np.asarray(np.sqrt(d2 / max(len(offs), 1)), dtype=np.float64)


def beyond_image_mm(geometry: Geometry, points: ArrayLike) -> FloatArray:
    """Distance (N,) mm of world points (N, 3) outside the image's voxel extent (0 inside).

    The extent is the box of voxel edges (continuous index −0.5 … size − 0.5); the excess per
    image axis is scaled by that axis' spacing. NaN points give NaN.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    idx = geometry.world_to_index(pts)
    upper = np.asarray(geometry.size, dtype=np.float64) - 0.5
    excess = np.maximum(np.maximum(-0.5 - idx, idx - upper), 0.0) * geometry.spacing
    return np.asarray(np.sqrt((excess**2).sum(axis=1)), dtype=np.float64)


def flat_heatmap_spread_mm(
    patch_size: Sequence[int], spacing_mm: ArrayLike, fraction: float = FLAT_FRACTION
) -> float:
    """Spread (mm) above which a patch heatmap counts as flat (the landmark is not in it).

    ``fraction`` of the RMS distance of a uniform map over the patch from its centre,
    ``sqrt(sum_i edge_i² / 12)`` with ``edge_i = size_i · spacing_i`` mm: a map that spreads
    its weight nearly as widely as a uniform one has no peak to decode.
    """
    edges = np.asarray(patch_size, dtype=np.float64) * np.asarray(spacing_mm, dtype=np.float64)
    return float(fraction * math.sqrt(float((edges**2).sum()) / 12.0))


def not_found_reason(spread_mm: float, flat_mm: float) -> str:
    """The ``missing_reason`` of a landmark whose heatmap has no peak."""
    return (
        f"not found in the image (flat heatmap: spread {spread_mm:.1f} mm > {flat_mm:.1f} mm); "
        "likely outside the field of view"
    )


def absence_reason(beyond_mm: float) -> str:
    """The ``missing_reason`` of a landmark declared outside the field of view."""
    return f"outside field of view (predicted {beyond_mm:.1f} mm beyond the image)"


def fit_absence_margin(
    beyond_mm: ArrayLike, truly_outside: ArrayLike, default: float = DEFAULT_ABSENCE_MARGIN_MM
) -> float:
    """The margin (mm) of the absence decision ``beyond > margin`` from validation points.

    With landmarks truly outside that some candidate detects: the candidate with the best F1;
    of tied candidates the middle one (upper median), i.e. the centre of the plateau between
    the two classes. Otherwise (none truly outside, or every one of them predicted inside the
    image, so that no margin can detect it — the flat-heatmap rule's case): the smallest
    candidate >= ``default`` that declares no validation landmark absent (the largest
    candidate if none does).
    """
    b = np.asarray(beyond_mm, dtype=np.float64).ravel()
    t = np.asarray(truly_outside, dtype=bool).ravel()
    ok = np.isfinite(b)
    b, t = b[ok], t[ok]
    scores = []
    for m in MARGIN_CANDIDATES_MM:
        pred = b > m
        tp = float((pred & t).sum())
        scores.append(2 * tp / max(float(pred.sum() + t.sum()), 1.0))
    best = max(scores)
    if not t.any() or best <= 0.0:
        for m in MARGIN_CANDIDATES_MM:
            if m >= default and not (b > m).any():
                return float(m)
        return float(max(MARGIN_CANDIDATES_MM[-1], default))
    tied = [m for m, f1 in zip(MARGIN_CANDIDATES_MM, scores, strict=True) if f1 >= best - 1e-12]
    return float(tied[len(tied) // 2])


# ------------------------------------------------------------------------------ applying
def annotate_prediction(
    landmarks: LandmarkSet,
    coarse: ArrayLike,
    geometry: Geometry,
    calibration: Calibration | None,
    absence: bool,
    margin_mm: float = DEFAULT_ABSENCE_MARGIN_MM,
    flat_spread_mm: float | None = None,
) -> LandmarkSet:
    """Add ``beyond_image_mm`` (and, calibrated, the confidence fields) to every landmark;
    with ``absence``, landmarks beyond ``margin_mm``, or (with ``flat_spread_mm``) whose
    ``heatmap_spread_mm`` exceeds it, become missing (``absent = 1``).

    Args:
        landmarks: the prediction (LPS mm) with the raw-score extras.
        coarse: (N, 3) coarse estimates, LPS mm, in ``landmarks.names`` order.
        geometry: the image's (canonical) geometry.
        calibration: maps the scores to confidence and expected error; None: raw scores only.
        absence: whether to apply the absence rules at all.
        margin_mm: a landmark more than this beyond the image's edge is absent.
        flat_spread_mm: a landmark whose fine heatmap spread (mm) exceeds this is absent ("not
            found"; see :func:`flat_heatmap_spread_mm`); None: rule off.
    """
    coords = landmarks.coords.copy()
    extras = {n: dict(landmarks.extras.get(n, {})) for n in landmarks.names}
    reasons = dict(landmarks.missing_reason)
    beyond = np.fmax(beyond_image_mm(geometry, coarse), beyond_image_mm(geometry, coords))
    for row, name in enumerate(landmarks.names):
        b = float(beyond[row])
        if not math.isfinite(b):
            continue
        extras[name]["beyond_image_mm"] = round(b, 2)
        if absence and b > margin_mm:
            coords[row] = np.nan
            reasons[name] = absence_reason(b)
            extras[name]["absent"] = 1
            continue
        value = extras[name].get("heatmap_spread_mm")
        spread = float(value) if isinstance(value, int | float) else math.nan  # NaN: never flat
        if absence and flat_spread_mm is not None and spread > flat_spread_mm:
            coords[row] = np.nan
            reasons[name] = not_found_reason(spread, flat_spread_mm)
            extras[name]["absent"] = 1
            continue
        if calibration is not None:
            calibration.annotate(extras[name])
    return LandmarkSet(list(landmarks.names), coords, reasons, extras)


def flag_above(landmarks: LandmarkSet, threshold_mm: float) -> list[tuple[str, float]]:
    """Set ``flagged`` (1/0) where ``expected_error_mm`` is known; returns the flagged
    ``(name, expected error mm)`` pairs (in place on ``landmarks.extras``)."""
    flagged = []
    for name in landmarks.names:
        ex = landmarks.extras.get(name)
        if not ex or not isinstance(ex.get("expected_error_mm"), int | float):
            continue
        e = float(ex["expected_error_mm"])
        ex["flagged"] = 1 if e > threshold_mm else 0
        if e > threshold_mm:
            flagged.append((name, e))
    return flagged
