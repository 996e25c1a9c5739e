"""Confidence scores, their calibration, flagging, the absence decision and cropped datasets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from landmark3d.data.crop import crop_dataset, crop_inferior, superior_axis
from landmark3d.data.dataset import load_dataset
from landmark3d.errors import CheckpointError
from landmark3d.geometry.space import Geometry
from landmark3d.inference.confidence import (
    Calibration,
    HeatmapCapture,
    absence_reason,
    annotate_prediction,
    beyond_image_mm,
    fit_absence_margin,
    flag_above,
    flat_heatmap_spread_mm,
    heatmap_spread_mm,
    load_calibration,
    not_found_reason,
    probability_key,
    rank_correlation,
    tta_offsets,
    tta_spread,
)
from landmark3d.io.landmark_set import LandmarkSet


def gaussian(size: int, center: tuple[float, float, float], sigma: float, peak: float = 1.0):
    idx = np.indices((size, size, size), dtype=np.float64)
    d2 = sum((idx[a] - center[a]) ** 2 for a in range(3))
    return peak * np.exp(-d2 / (2 * sigma**2))


# ------------------------------------------------------------------------------ raw scores
def test_sharper_heatmap_has_smaller_spread_in_mm() -> None:
    spacing = (1.5, 1.5, 1.5)
    spreads = [heatmap_spread_mm(gaussian(24, (12, 11, 12), s), spacing) for s in (1, 2, 4)]
    assert spreads[0] < spreads[1] < spreads[2]
    # in mm: twice the spacing, twice the spread
    doubled = heatmap_spread_mm(gaussian(24, (12, 11, 12), 2), (3.0, 3.0, 3.0))
    assert doubled == pytest.approx(2 * spreads[1], rel=1e-9)


def test_two_peaks_spread_more_than_one_and_empty_maps_are_nan() -> None:
    one = gaussian(24, (6, 12, 12), 1.5)
    two = one + gaussian(24, (18, 12, 12), 1.5, peak=0.9)
    assert heatmap_spread_mm(two, (1, 1, 1)) > 3 * heatmap_spread_mm(one, (1, 1, 1))
    assert math.isnan(heatmap_spread_mm(np.zeros((8, 8, 8)), (1, 1, 1)))
    assert math.isnan(heatmap_spread_mm(np.full((8, 8, 8), np.nan), (1, 1, 1)))
    # the low background under the 20 % floor does not count
    noisy = one + 0.1
    assert heatmap_spread_mm(noisy, (1, 1, 1)) < 1.5 * heatmap_spread_mm(one, (1, 1, 1))


class _Heat(nn.Module):
    """Returns fixed heatmaps (1, C, X, Y, Z), or a dict like the correlated model."""

    def __init__(self, heat: np.ndarray, as_dict: bool = False) -> None:
        super().__init__()
        self.heat = torch.as_tensor(heat, dtype=torch.float32)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        return {"heatmaps": self.heat[None]} if self.as_dict else self.heat[None]


def test_heatmap_capture_maps_calls_to_landmarks() -> None:
    sharp, wide = gaussian(16, (8, 8, 8), 1.0), gaussian(16, (8, 8, 8), 3.0)
    shared = _Heat(np.stack([sharp, wide]))
    routes = {"a": ("shared", 0), "b": ("shared", 1)}
    centers = np.zeros((2, 3))
    with HeatmapCapture({"shared": shared}) as cap:
        shared(torch.zeros(1))
        shared(torch.zeros(1))
    s = cap.fine_spreads(["a", "b"], routes, centers, (1, 1, 1))
    assert s[0] < s[1]
    # a landmark without a centre is skipped by fine_predict: the calls shift accordingly
    with HeatmapCapture({"shared": shared}) as cap:
        shared(torch.zeros(1))
    s = cap.fine_spreads(["a", "b"], routes, np.array([[np.nan] * 3, [0, 0, 0]]), (1, 1, 1))
    assert np.isnan(s[0]) and s[1] == pytest.approx(heatmap_spread_mm(wide, (1, 1, 1)))
    # calls that do not match the landmarks give NaN, never a wrong spread
    assert np.isnan(cap.fine_spreads(["a", "b"], routes, centers, (1, 1, 1))).all()
    group = _Heat(np.stack([sharp, wide]), as_dict=True)
    with HeatmapCapture({"g": group}) as cap:
        group(torch.zeros(1))
    g = cap.group_spreads("g", 2, (1, 1, 1))
    assert g[0] < g[1]
    group(torch.zeros(1))  # after the context: no longer recorded
    assert len(cap.outputs["g"]) == 1
    with HeatmapCapture({"g": group}, enabled=False) as off:
        group(torch.zeros(1))
    assert np.isnan(off.group_spreads("g", 2, (1, 1, 1))).all()


def test_tta_spread_is_the_rms_distance_from_the_reference() -> None:
    offsets = tta_offsets((32, 32, 16), (1.5, 1.5, 3.0))
    assert offsets.shape == (4, 3)
    np.testing.assert_allclose(np.linalg.norm(offsets, axis=1), 0.125 * 48.0)
    np.testing.assert_allclose(offsets.sum(axis=0), 0.0, atol=1e-12)
    centers = np.array([[0.0, 0, 0], [10, 0, 0]])

    calls = []

    def stable(sets: list[np.ndarray]) -> list[np.ndarray]:  # landmark 0 ignores the centre
        calls.append(len(sets))
        outs = [c.copy() for c in sets]
        for out in outs:
            out[0] = [1.0, 2.0, 3.0]
        return outs

    s = tta_spread(stable, centers, np.array([[1.0, 2, 3], [10, 0, 0]]), offsets)
    assert s[0] == pytest.approx(0.0) and s[1] == pytest.approx(6.0)
    assert calls == [4]  # every shift in one call: the networks batch them
    with pytest.raises(ValueError, match="4 shifted centre sets but 3 answers"):
        tta_spread(lambda sets: sets[:3], centers, centers, offsets)


# ------------------------------------------------------------------------------ calibration
def _synthetic(n: int, seed: int = 0) -> tuple[list[dict[str, float]], np.ndarray]:
    """Errors driven by the spread (and the shift); the peak falls as the error grows."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(2.0, 12.0, n)
    shift = rng.uniform(0.5, 10.0, n)
    err = 0.4 * spread * np.exp(rng.normal(0, 0.25, n)) + 0.1 * shift
    peak = 1.0 / (1.0 + 0.1 * err) * np.exp(rng.normal(0, 0.1, n))
    rows = [
        {"heatmap_spread_mm": float(a), "heatmap_peak": float(p), "coarse_fine_shift_mm": float(s)}
        for a, p, s in zip(spread, peak, shift, strict=True)
    ]
    return rows, err


def test_calibration_fit_is_monotone_and_informative() -> None:
    rows, err = _synthetic(60)
    cal = Calibration.fit(rows, err)
    assert set(cal.keys) == {"heatmap_spread_mm", "heatmap_peak", "coarse_fine_shift_mm"}
    assert all(w >= 0 for w in cal.weights) and max(cal.weights) > 0
    assert cal.stats["spearman_score_error"] > 0.6
    base = {"heatmap_spread_mm": 5.0, "heatmap_peak": 0.8, "coarse_fine_shift_mm": 3.0}
    out = []
    for spread in (2.0, 4.0, 8.0, 16.0):
        ex: dict[str, float | str] = {**base, "heatmap_spread_mm": spread}
        cal.annotate(ex)
        out.append(ex)
    e = [float(x["expected_error_mm"]) for x in out]
    p = [float(x[probability_key()]) for x in out]
    c = [float(x["confidence"]) for x in out]
    assert e == sorted(e) and e[0] < e[-1]
    assert p == sorted(p) and c == sorted(c, reverse=True)
    assert all(0.0 <= v <= 1.0 for v in p + c)
    assert c[0] == pytest.approx(1 - p[0], abs=1e-4)
    # sharper peak (higher) -> higher confidence
    lo, hi = dict(base, heatmap_peak=0.3), dict(base, heatmap_peak=1.2)
    cal.annotate(lo)  # type: ignore[arg-type]
    cal.annotate(hi)  # type: ignore[arg-type]
    assert hi["confidence"] >= lo["confidence"]
    assert hi["expected_error_mm"] < lo["expected_error_mm"]
    # expected errors are on the scale of the validation errors
    fitted = []
    for r in rows:
        ex = dict(r)
        cal.annotate(ex)  # type: ignore[arg-type]
        fitted.append(ex["expected_error_mm"])
    assert np.mean(fitted) == pytest.approx(np.mean(err), rel=0.15)


def test_expected_error_extrapolates_at_most_e_times_past_validation() -> None:
    """A score far outside the validation range gives a large but bounded expected error,
    while the probability (and so the confidence ranking) keeps rising."""
    from landmark3d.inference.calibration import LOG_OFFSET_MM, Z_HEADROOM

    rows, err = _synthetic(60)
    cal = Calibration.fit(rows, err)
    assert cal.z_max is not None
    cap = cal.smearing * np.exp(cal.z_max + Z_HEADROOM) - LOG_OFFSET_MM
    base = {"heatmap_spread_mm": 5.0, "heatmap_peak": 0.8, "coarse_fine_shift_mm": 3.0}
    far, farther = dict(base, heatmap_spread_mm=500.0), dict(base, heatmap_spread_mm=5000.0)
    cal.annotate(far)  # type: ignore[arg-type]
    cal.annotate(farther)  # type: ignore[arg-type]
    assert float(far["expected_error_mm"]) == pytest.approx(cap, rel=1e-3)
    assert float(farther["expected_error_mm"]) == pytest.approx(cap, rel=1e-3)
    assert cap > max(err)  # the cap lies beyond every validation error
    assert cal.p_error_gt(cal.score(farther)) >= cal.p_error_gt(cal.score(far))
    assert cal.score(farther) > cal.score(far)
    # an older file without z_max still loads and extrapolates as before
    old = Calibration.from_dict({**cal.to_dict(), "z_max": None})
    assert old.z_max is None and old.expected_error_mm(cal.z_max + 5) > cap


def test_calibration_drops_sign_flipped_and_uninformative_scores() -> None:
    rows, err = _synthetic(40, seed=1)
    for r, e in zip(rows, err, strict=True):
        r["coarse_fine_shift_mm"] = float(30.0 / (1.0 + e))  # larger shift, smaller error
        r["tta_spread_mm"] = 1.0  # constant: no information
    cal = Calibration.fit(rows, err)
    assert "tta_spread_mm" not in cal.keys
    assert cal.weights[cal.keys.index("coarse_fine_shift_mm")] == 0.0
    # a missing score enters at its validation mean: same z as the mean value itself
    ex = {"heatmap_spread_mm": 5.0, "heatmap_peak": 0.8}
    assert cal.score(ex) == pytest.approx(
        cal.score({**ex, "coarse_fine_shift_mm": math.exp(cal.mean[2]) - 0.5})
    )


def test_tta_calibration_keeps_a_tta_free_refit_for_predictions_without_tta() -> None:
    rows, err = _synthetic(60, seed=2)
    rng = np.random.default_rng(3)
    for r, e in zip(rows, err, strict=True):  # the TTA spread tracks the error closely
        r["tta_spread_mm"] = float(e * np.exp(rng.normal(0, 0.1)))
    cal = Calibration.fit(rows, err)
    assert "tta_spread_mm" in cal.keys and cal.weights[cal.keys.index("tta_spread_mm")] > 0
    fallback = cal.without_tta
    assert fallback is not None and "tta_spread_mm" not in fallback.keys
    assert fallback.without_tta is None and fallback.stats["n_points"] == 60
    assert cal.for_prediction(True) is cal and cal.for_prediction(False) is fallback
    # the refit gives the other scores their own weights (the TTA fit leans on the spread)
    assert fallback.weights != cal.weights[: len(fallback.weights)]
    no_tta = {k: v for k, v in rows[0].items() if k != "tta_spread_mm"}
    assert fallback.score(no_tta) != cal.score(no_tta)
    # a calibration without TTA has no refit and scores everything itself
    plain = Calibration.fit(
        [{k: v for k, v in r.items() if k != "tta_spread_mm"} for r in rows], err
    )
    assert plain.without_tta is None and plain.for_prediction(False) is plain
    # JSON round trip, nested model included
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.without_tta is not None and back.without_tta.keys == fallback.keys
    assert back.without_tta.score(no_tta) == pytest.approx(fallback.score(no_tta))
    assert back.score(rows[0]) == pytest.approx(cal.score(rows[0]))
    broken = {**cal.to_dict(), "without_tta": {**fallback.to_dict(), "weights": [1.0]}}
    with pytest.raises(CheckpointError, match="malformed"):
        Calibration.from_dict(broken)
    with pytest.raises(CheckpointError, match="without_tta"):
        Calibration.from_dict({**cal.to_dict(), "without_tta": [1, 2]})


def test_calibration_without_large_errors_or_data_stays_finite() -> None:
    rows, err = _synthetic(12)
    cal = Calibration.fit(rows, np.minimum(err, 3.0))  # no error above 4 mm
    ex: dict[str, float | str] = dict(rows[0])
    cal.annotate(ex)
    assert 0.0 < float(ex[probability_key()]) < 0.5
    empty = Calibration.fit([], [])
    assert empty.keys == [] and empty.stats["n_points"] == 0
    ex = {}
    empty.annotate(ex)
    assert math.isfinite(float(ex["expected_error_mm"]))


def test_calibration_round_trips_through_json(tmp_path: Path) -> None:
    rows, err = _synthetic(30)
    cal = Calibration.fit(rows, err)
    cal.absence_margin_mm, cal.absence_enabled, cal.stage = 3.0, True, "correlated"
    path = cal.save(tmp_path / "calibration.json")
    text = path.read_text()
    assert json.loads(text)["version"] == 1
    back = load_calibration(tmp_path)
    assert back is not None and back.to_dict() == cal.to_dict()
    for r in rows[:5]:
        assert back.score(r) == cal.score(r)
    assert load_calibration(tmp_path / "nothing") is None


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("weights"),
        lambda d: d.update(version=99),
        lambda d: d.update(keys=["heatmap_peak", "bogus"]),
        lambda d: d.update(scale=[0.0] * len(d["scale"])),
        lambda d: d.update(weights=[1.0]),
    ],
)
def test_malformed_calibration_is_refused_with_a_fix(tmp_path: Path, edit) -> None:
    rows, err = _synthetic(30)
    d = Calibration.fit(rows, err).to_dict()
    edit(d)
    (tmp_path / "calibration.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as info:
        load_calibration(tmp_path)
    assert "calibrate" in str(info.value.fix)
    (tmp_path / "calibration.json").write_text("[1, 2")
    with pytest.raises(CheckpointError):
        load_calibration(tmp_path)


def test_rank_correlation() -> None:
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.894427, abs=1e-6)
    assert math.isnan(rank_correlation([1, 2], [1, 2]))
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


def test_flag_above_marks_and_lists() -> None:
    ls = LandmarkSet(
        ["a", "b", "c"],
        np.zeros((3, 3)),
        extras={"a": {"expected_error_mm": 2.0}, "b": {"expected_error_mm": 6.5}, "c": {}},
    )
    assert flag_above(ls, 4.0) == [("b", 6.5)]
    assert ls.extras["a"]["flagged"] == 0 and ls.extras["b"]["flagged"] == 1
    assert "flagged" not in ls.extras["c"]


# ------------------------------------------------------------------------------ absence
def _oblique_geometry() -> Geometry:
    c, s = math.cos(0.4), math.sin(0.4)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    return Geometry((20, 30, 10), np.array([1.0, 0.5, 2.0]), np.array([5.0, -3.0, 7.0]), direction)


def test_beyond_image_mm_measures_physical_distance_outside() -> None:
    g = _oblique_geometry()
    idx = np.array(
        [[10, 15, 5], [-0.5, 0, 0], [-10.5, 15, 5], [10, 15, 14.5], [-3.5, -4.5, 5], [np.nan] * 3]
    )
    d = beyond_image_mm(g, g.index_to_world(idx))
    assert d[0] == 0 and d[1] == pytest.approx(0.0, abs=1e-9)  # inside; on the voxel edge
    assert d[2] == pytest.approx(10.0)  # 10 voxels of 1 mm along i
    assert d[3] == pytest.approx(10.0)  # 5 slices of 2 mm along k
    assert d[4] == pytest.approx(math.hypot(3.0, 4.0 * 0.5))
    assert np.isnan(d[5])


def test_forced_coarse_outside_the_image_is_reported_absent() -> None:
    g = _oblique_geometry()
    inside = g.index_to_world(np.array([10.0, 15.0, 5.0]))
    far = g.index_to_world(np.array([10.0, 15.0, -20.0]))  # 39 mm below the first slice
    border = g.index_to_world(np.array([10.0, 15.0, 0.0]))  # where a fine stage might land
    coords = np.stack([inside, border, inside])
    coarse = np.stack([inside, far, g.index_to_world(np.array([10.0, 15.0, -1.0]))])
    ls = LandmarkSet(["a", "b", "c"], coords, extras={n: {"heatmap_peak": 1.0} for n in "abc"})
    cal = Calibration.fit(*_synthetic(20))
    out = annotate_prediction(ls, coarse, g, cal, absence=True, margin_mm=2.0)
    assert out.is_missing("b") and not out.is_missing("a") and not out.is_missing("c")
    assert out.missing_reason["b"] == absence_reason(39.0)
    assert out.missing_reason["b"] == "outside field of view (predicted 39.0 mm beyond the image)"
    assert out.extras["b"]["absent"] == 1 and "confidence" not in out.extras["b"]
    assert out.extras["c"]["beyond_image_mm"] == pytest.approx(1.0)  # within the margin: kept
    assert "confidence" in out.extras["a"] and "expected_error_mm" in out.extras["c"]
    kept = annotate_prediction(ls, coarse, g, None, absence=False, margin_mm=2.0)
    assert not kept.is_missing("b") and kept.extras["b"]["beyond_image_mm"] == pytest.approx(39.0)
    assert "confidence" not in kept.extras["a"]  # no calibration: no invented numbers
    assert ls.present.all()  # the input is not modified


def test_flat_heatmap_rule_reports_a_landmark_without_a_peak_as_not_found() -> None:
    spacing = (1.5, 1.5, 1.5)
    flat = flat_heatmap_spread_mm((32, 32, 32), spacing)
    assert flat == pytest.approx(0.8 * 48.0 / 2.0)  # 80 % of sqrt(3 * 48² / 12) = 24 mm
    assert flat_heatmap_spread_mm((32, 32, 16), (1.5, 1.5, 3.0)) == pytest.approx(flat)
    # the rule's premise: a trained-looking peak is far below it, a flat or noisy map above it
    grid = np.stack(np.meshgrid(*[np.arange(32.0)] * 3, indexing="ij"), axis=-1)
    peak = np.exp(-((grid - [12.0, 20.0, 16.0]) ** 2).sum(-1) * 1.5**2 / (2 * 3.0**2))
    noise = np.random.default_rng(0).uniform(0.9, 1.0, (32, 32, 32))
    assert heatmap_spread_mm(peak, spacing) < 5.0 < flat < heatmap_spread_mm(noise, spacing)

    g = _oblique_geometry()
    inside = g.index_to_world(np.array([[10.0, 15.0, 5.0]] * 3))
    extras = {"a": {"heatmap_spread_mm": 4.0}, "b": {"heatmap_spread_mm": 25.0}, "c": {}}
    ls = LandmarkSet(["a", "b", "c"], inside, extras=extras)  # type: ignore[arg-type]
    out = annotate_prediction(ls, inside, g, None, absence=True, margin_mm=2.0, flat_spread_mm=19.2)
    assert out.is_missing("b") and not out.is_missing("a") and not out.is_missing("c")
    assert out.missing_reason["b"] == not_found_reason(25.0, 19.2)
    assert (
        "not found in the image (flat heatmap: spread 25.0 mm > 19.2 mm)" in out.missing_reason["b"]
    )
    assert out.extras["b"]["absent"] == 1 and out.extras["b"]["beyond_image_mm"] == 0.0
    # off without the absence decision, or without a threshold (coarse-only predictions)
    for kwargs in ({"absence": False, "flat_spread_mm": 19.2}, {"absence": True}):
        assert annotate_prediction(ls, inside, g, None, **kwargs).present.all()  # type: ignore[arg-type]


def test_absence_margin_fit() -> None:
    beyond = np.array([0.0, 0.0, 0.5, 1.5, 4.0, 15.0, 20.0, np.nan])
    truth = np.array([False, False, False, False, True, True, True, False])
    assert fit_absence_margin(beyond, truth) == 3.0  # best F1 for 2 and 3: the upper middle
    wide = np.array([0.0, 0.0, 25.0, 30.0])  # every margin from 0 to 20 separates them
    assert fit_absence_margin(wide, np.array([False, False, True, True])) == 5.0  # plateau centre
    assert fit_absence_margin(beyond[:4], truth[:4], default=1.0) == 2.0  # no false positives
    assert fit_absence_margin(np.zeros(3), np.zeros(3, bool)) == 5.0
    assert fit_absence_margin(np.array([50.0]), np.array([False])) == 20.0  # the largest


# ------------------------------------------------------------------------------ cropping
@pytest.mark.parametrize(
    ("direction", "axis", "up"),
    [
        (np.eye(3), 2, True),
        (np.diag([-1.0, -1.0, 1.0]), 2, True),  # RAS
        (np.diag([1.0, 1.0, -1.0]), 2, False),  # LPI
        (np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]), 1, False),  # S-I along j, reversed
    ],
)
def test_crop_inferior_removes_the_inferior_slices(direction, axis: int, up: bool) -> None:
    g = Geometry((6, 8, 10), np.array([1.0, 1.0, 2.0]), np.array([3.0, 4.0, 5.0]), direction)
    assert superior_axis(g) == (axis, up)
    arr = np.arange(6 * 8 * 10, dtype=np.float32).reshape(10, 8, 6)  # sitk order z, y, x
    image = g.apply_to(sitk.GetImageFromArray(arr))
    cropped = crop_inferior(image, 0.25)
    cg = Geometry.from_sitk(cropped)
    n = g.size[axis]
    assert cg.size[axis] == n - round(0.25 * n)
    world_z = [
        g.index_to_world(np.array([0, 0, 0.0]))[2],
        g.index_to_world(np.array(g.size) - 1.0)[2],
    ]
    c_world_z = [
        cg.index_to_world(np.array([0, 0, 0.0]))[2],
        cg.index_to_world(np.array(cg.size) - 1.0)[2],
    ]
    assert min(c_world_z) > min(world_z) and max(c_world_z) == pytest.approx(max(world_z))
    # voxels keep their world positions: the value at a kept world point is unchanged
    point = cg.index_to_world(np.array([1.0, 2.0, 3.0]))
    i_src = np.rint(g.world_to_index(point)).astype(int)
    i_dst = np.rint(cg.world_to_index(point)).astype(int)
    assert image.GetPixel(*map(int, i_src)) == cropped.GetPixel(*map(int, i_dst))


def test_crop_dataset_moves_low_landmarks_outside(phantom_dir: Path, tmp_path: Path) -> None:
    spec = crop_dataset(phantom_dir, tmp_path / "cropped", fraction=0.5, seed=3)
    ds, src = load_dataset(spec), load_dataset(phantom_dir)
    cropped = [c for c in ds.cases if "crop" in c.extra]
    assert len(cropped) == 3 and ds.folds == src.folds
    for case in ds.cases:
        truth = ds.read_landmarks(case.id)
        np.testing.assert_allclose(truth.coords, src.read_landmarks(case.id).coords)
        geometry = Geometry.from_sitk(ds.read_image(case.id))
        outside = [
            n
            for n, i in zip(truth.names, geometry.contains_world(truth.coords), strict=True)
            if not i
        ]
        if case in cropped:
            info = case.extra["crop"]
            assert 0.25 <= info["removed_fraction"] <= 0.40 and info["outside"] == outside
            assert "chin" in outside and "nasion" not in outside
        else:
            assert outside == []
    with pytest.raises(Exception, match="exists"):
        crop_dataset(phantom_dir, tmp_path / "cropped", fraction=0.5)
