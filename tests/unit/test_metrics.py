"""Tests of landmark3d.metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from landmark3d.metrics import (
    DEFAULT_SDR_THRESHOLDS_MM,
    ErrorAccumulator,
    ErrorTable,
    format_mre,
    format_sdr,
    radial_errors,
    summarize,
    summarize_folds,
)

NAMES = ["a", "b"]


def test_radial_errors_euclidean_and_nan_where_missing():
    pred = np.array([[[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]], [[np.nan] * 3, [5.0, 5.0, 5.0]]])
    truth = np.array([[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [np.nan] * 3]])
    err = radial_errors(pred, truth)
    assert err.shape == (2, 2)
    assert err[0, 0] == pytest.approx(5.0)
    assert err[0, 1] == pytest.approx(3.0)
    assert np.isnan(err[1]).all()


def test_radial_errors_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        radial_errors(np.zeros((2, 3, 3)), np.zeros((2, 2, 3)))


def test_truth_shifted_by_3mm_in_oblique_direction():
    rng = np.random.default_rng(1)
    truth = rng.uniform(-200, 200, size=(4, 2, 3))
    direction = np.array([1.0, 2.0, 2.0]) / 3.0  # unit vector
    pred = truth + 3.0 * direction
    s = summarize(radial_errors(pred, truth), NAMES)
    assert s.mre == pytest.approx(3.0, abs=1e-9)
    assert s.sd == pytest.approx(0.0, abs=1e-9)
    assert s.median == pytest.approx(3.0)
    # SDR is inclusive: an error of exactly 3 mm is "within 3 mm".
    assert s.sdr == {2.0: 0.0, 2.5: 0.0, 3.0: 100.0, 4.0: 100.0, 8.0: 100.0}
    assert s.n_evaluated == 8 and s.n_cases == 4 and s.n_landmarks == 2
    assert format_mre(s) == "3.00 (0.00)"


def test_hand_example_errors_1_2_3_4():
    errors = np.array([[1.0, 2.0], [3.0, 4.0]])
    s = summarize(errors, NAMES)
    assert s.mre == pytest.approx(2.5)
    assert s.sd == pytest.approx(math.sqrt(5.0 / 3.0))  # sample SD, ddof=1
    assert s.median == pytest.approx(2.5)
    assert s.max == 4.0
    assert s.sdr == {2.0: 50.0, 2.5: 50.0, 3.0: 75.0, 4.0: 100.0, 8.0: 100.0}
    a, b = s.per_landmark["a"], s.per_landmark["b"]
    assert (a.mre, a.n, b.mre, b.n) == (2.0, 2, 3.0, 2)
    assert a.sd == pytest.approx(math.sqrt(2.0))
    assert a.sdr[2.0] == 50.0 and a.sdr[3.0] == 100.0  # landmark a: errors 1, 3
    assert b.sdr[2.0] == 50.0 and b.sdr[3.0] == 50.0  # landmark b: errors 2, 4
    assert format_sdr(s) == "50.0 / 50.0 / 75.0 / 100.0 / 100.0"


def test_missing_predictions_are_sdr_failures_and_not_in_mre():
    errors = np.array([[1.0, np.nan], [3.0, 1.0]])
    missing_pred = np.array([[False, True], [False, False]])
    s = summarize(errors, NAMES, missing_pred_mask=missing_pred)
    assert s.n_evaluated == 3 and s.n_missing_prediction == 1 and s.n_missing_truth == 0
    assert s.mre == pytest.approx(5.0 / 3.0)
    assert s.sdr[2.0] == pytest.approx(50.0)  # 2 of 4 (the missing one fails)
    assert s.sdr[8.0] == pytest.approx(75.0)  # never 100 % with a missing prediction
    b = s.per_landmark["b"]
    assert (b.n, b.n_missing_prediction, b.sdr[2.0]) == (1, 1, 50.0)


def test_unexplained_nan_error_counts_as_missing_prediction():
    s = summarize(np.array([[1.0, np.nan]]), NAMES)
    assert s.n_missing_prediction == 1
    assert s.sdr[2.0] == 50.0


def test_missing_truth_not_evaluated_but_reported():
    errors = np.array([[1.0, np.nan], [3.0, 1.0]])
    missing_truth = np.array([[False, True], [False, False]])
    # Even with a prediction mask set on the same entry, missing truth wins.
    s = summarize(errors, NAMES, missing_pred_mask=missing_truth, missing_truth_mask=missing_truth)
    assert s.n_missing_truth == 1 and s.n_missing_prediction == 0 and s.n_evaluated == 3
    assert s.mre == pytest.approx(5.0 / 3.0)
    assert s.sdr[2.0] == pytest.approx(200.0 / 3.0)
    assert s.per_landmark["b"].n_missing_truth == 1


def test_error_table_from_points_classifies_missing():
    pred = np.zeros((1, 3, 3))
    truth = np.zeros((1, 3, 3))
    pred[0, 0] = np.nan  # missing prediction
    truth[0, 1] = np.nan  # missing truth
    pred[0, 2] = truth[0, 2] = np.nan  # both missing -> not evaluable
    t = ErrorTable.from_points(pred, truth)
    assert t.missing_prediction.tolist() == [[True, False, False]]
    assert t.missing_truth.tolist() == [[False, True, True]]
    assert t.case_ids == ["case0"]


def test_sd_undefined_with_one_instance_and_nothing_evaluated():
    one = summarize(np.array([[2.0]]), ["a"])
    assert one.mre == 2.0 and math.isnan(one.sd)
    none = summarize(np.array([[np.nan]]), ["a"], missing_truth_mask=np.array([[True]]))
    assert math.isnan(none.mre) and math.isnan(none.sdr[2.0])
    d = none.to_dict()
    assert d["mre"] is None and d["sdr"]["2"] is None
    assert format_mre(none) == "n/a (n/a)"
    json.dumps(d, allow_nan=False)


def test_custom_thresholds_sorted_and_validated():
    s = summarize(np.array([[1.0, 5.0]]), NAMES, thresholds=(5, 1))
    assert s.thresholds == (1.0, 5.0)
    assert s.sdr == {1.0: 50.0, 5.0: 100.0}
    with pytest.raises(ValueError, match="positive"):
        summarize(np.array([[1.0]]), ["a"], thresholds=(0.0,))
    with pytest.raises(ValueError, match="names"):
        summarize(np.array([[1.0]]), NAMES)


def test_to_dict_is_json_and_keys_thresholds():
    s = summarize(np.array([[1.0, 2.0], [3.0, 4.0]]), NAMES)
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert d["mre"] == 2.5 and d["sd_ddof"] == 1
    assert list(d["sdr"]) == ["2", "2.5", "3", "4", "8"]
    assert d["thresholds_mm"] == list(DEFAULT_SDR_THRESHOLDS_MM)
    assert d["per_landmark"]["b"]["mre"] == 3.0


def test_summarize_folds_pools_instances_not_fold_means():
    fold_a = np.array([[1.0, 1.0]])  # mean 1
    fold_b = np.array([[4.0, 4.0], [4.0, 4.0], [4.0, np.nan]])  # mean 4, one missing pred
    out = summarize_folds({"fold0": fold_a, "fold1": (fold_b,)}, NAMES)
    assert out["folds"]["fold0"].mre == 1.0
    assert out["folds"]["fold1"].mre == 4.0
    assert out["folds"]["fold1"].n_missing_prediction == 1
    pooled = out["pooled"]
    assert pooled.mre == pytest.approx((2 * 1.0 + 5 * 4.0) / 7)  # not (1 + 4) / 2
    assert pooled.n_cases == 4 and pooled.n_missing_prediction == 1
    assert pooled.sdr[2.0] == pytest.approx(200.0 / 8.0)


def test_accumulator_matches_batch_summary():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(5, 2, 3)) * 50
    pred = truth + rng.normal(size=(5, 2, 3)) * 2
    pred[2, 1] = np.nan
    acc = ErrorAccumulator(NAMES)
    for c in range(5):
        e = acc.add(f"c{c}", pred[c], truth[c])
        assert e.shape == (2,)
    assert len(acc) == 5
    table = ErrorTable.from_points(pred, truth)
    expected = summarize(table.errors, NAMES, missing_pred_mask=table.missing_prediction)
    got = acc.summary()
    assert got.mre == pytest.approx(expected.mre)
    assert got.sdr == expected.sdr
    assert acc.table().case_ids == [f"c{c}" for c in range(5)]
    acc.reset()
    assert len(acc) == 0 and acc.summary().n_cases == 0
