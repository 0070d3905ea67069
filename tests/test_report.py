"""Evaluation report: ROC points, reliability bins and ECE on hand-made data; files written per task."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from feature_schema import metrics
from trainer import report


def test_roc_points_by_hand():
    fpr, tpr, thr = report.roc_curve([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.1])
    assert report.trapezoid_auc(fpr, tpr) == pytest.approx(0.75)


def test_roc_ties_move_diagonally_and_weights_count():
    # Scores 0.5 tie a positive with a negative: one diagonal step from (0, .5) to (.5, 1).
    fpr, tpr, _ = report.roc_curve([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    # Mann-Whitney by hand: (1 + 1 + 0.5 + 1) / 4.
    assert report.trapezoid_auc(fpr, tpr) == pytest.approx(0.875)
    # Weight 3 on the top positive: tpr jumps to 3/4 first.
    fpr, tpr, _ = report.roc_curve([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1], weights=[1, 1, 3, 1])
    np.testing.assert_allclose(tpr, [0, 0.75, 1, 1])


def test_roc_area_equals_metrics_auc_on_random_weighted_data():
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.3).astype(float)
    s = np.round(rng.random(3000) * 0.5 + 0.4 * y, 2)  # rounding makes many ties
    w = rng.random(3000) + 0.5
    fpr, tpr, _ = report.roc_curve(y, s, w)
    assert report.trapezoid_auc(fpr, tpr) == pytest.approx(metrics.auc(y, s, w), abs=1e-12)
    with pytest.raises(ValueError, match="both positive and negative"):
        report.roc_curve([1, 1], [0.2, 0.3])


def test_thin_curve_keeps_ends_and_bounds_size():
    fpr = np.linspace(0, 1, 5000)
    tpr = np.sqrt(fpr)
    keep = report.thin_curve(fpr, tpr, max_points=100)
    assert keep[0] == 0 and keep[-1] == 4999 and len(keep) <= 102
    assert np.all(np.diff(keep) > 0)
    np.testing.assert_array_equal(report.thin_curve(fpr[:50], tpr[:50], 100), np.arange(50))


def test_reliability_quantile_bins_by_hand():
    bins = report.reliability_bins([0, 0, 1, 0, 1, 1], [0.1, 0.1, 0.2, 0.4, 0.5, 0.9], num_bins=3)
    np.testing.assert_allclose(bins["mean_prediction"], [0.1, 0.3, 0.7])
    np.testing.assert_allclose(bins["positive_rate"], [0.0, 0.5, 1.0])
    assert bins["count"] == [2, 2, 2]
    np.testing.assert_allclose(bins["lower"], [0.1, 0.2, 0.5])
    np.testing.assert_allclose(bins["upper"], [0.1, 0.4, 0.9])
    # Gaps .1, .2, .3 at equal weight.
    assert report.expected_calibration_error(bins) == pytest.approx(0.2)


def test_reliability_ties_share_a_bin_and_empty_bins_drop():
    # The 0.2 run starts in bin 0, so all three 0.2s go there and bin 1 is empty.
    bins = report.reliability_bins([0, 1, 0, 0, 1, 1], [0.1, 0.2, 0.2, 0.2, 0.5, 0.9], num_bins=3)
    assert bins["count"] == [4, 2]
    np.testing.assert_allclose(bins["mean_prediction"], [0.175, 0.7])
    np.testing.assert_allclose(bins["positive_rate"], [0.25, 1.0])


def test_reliability_uniform_and_weighted():
    bins = report.reliability_bins([0, 1, 1, 0], [0.05, 0.15, 0.95, 1.0], weights=[1, 1, 3, 1],
                                   num_bins=10, strategy="uniform")
    assert bins["count"] == [1, 1, 2]
    np.testing.assert_allclose(bins["weight"], [1, 1, 4])
    np.testing.assert_allclose(bins["mean_prediction"], [0.05, 0.15, (3 * 0.95 + 1.0) / 4])
    np.testing.assert_allclose(bins["positive_rate"], [0, 1, 0.75])
    with pytest.raises(ValueError, match="strategy"):
        report.reliability_bins([0, 1], [0.1, 0.2], strategy="width")


def test_write_report_files_and_numbers(tmp_path):
    rng = np.random.default_rng(3)
    n = 2000
    p_click = rng.uniform(0.05, 0.6, n)
    click = (rng.random(n) < p_click).astype(np.float32)
    conv = click * (rng.random(n) < 0.3)
    preds = {"click": p_click, "conversion": np.clip(p_click * 0.3, 0, 1)}
    labels = {"click": click, "conversion": conv}
    weights = np.ones(n, np.float32)
    out = report.write_report(str(tmp_path), preds, labels, weights, num_bins=10)

    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    for task in ("click", "conversion"):
        r = on_disk["tasks"][task]
        expect = metrics.binary_report(labels[task], preds[task], weights)
        for key in ("auc", "logloss", "calibration"):
            assert r[key] == pytest.approx(expect[key])
        assert r["brier"] == pytest.approx(np.mean((preds[task] - labels[task]) ** 2))
        assert sum(r["reliability"]["count"]) == n and len(r["reliability"]["count"]) == 10
        assert r["roc"]["threshold"][0] is None and r["roc"]["fpr"][-1] == 1.0
        for kind in ("roc", "calibration"):
            png = tmp_path / "report" / on_disk["plots"][task][kind]
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert os.path.getsize(png) > 10_000  # a drawn figure, not an empty canvas
    # The labels are drawn from p_click, so its reliability bins sit near the diagonal.
    assert out["tasks"]["click"]["ece"] < 0.05
    with pytest.raises(ValueError, match="no labels"):
        report.write_report(str(tmp_path), {"ctcvr": p_click}, labels)
