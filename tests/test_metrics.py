"""AUC/logloss/calibration against hand-computed values."""
from __future__ import annotations

import math

from feature_schema import metrics


def test_auc_hand_computed_with_ties():
    # Positives score 0.9 and 0.5; negatives 0.5 and 0.1. Pairs: (0.9>0.5)=1, (0.9>0.1)=1,
    # (0.5 tie 0.5)=0.5, (0.5>0.1)=1 -> 3.5 / 4.
    assert metrics.auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == 0.875
    assert metrics.auc([1, 0], [0.2, 0.8]) == 0.0
    assert math.isnan(metrics.auc([1, 1], [0.2, 0.8]))


def test_weighted_auc_equals_repetition():
    # Weight 2 on the first negative is the same as listing it twice.
    a = metrics.auc([1, 0, 0], [0.6, 0.7, 0.1], weights=[1, 2, 1])
    b = metrics.auc([1, 0, 0, 0], [0.6, 0.7, 0.7, 0.1])
    assert a == b == 1 / 3


def test_logloss_and_calibration():
    ll = metrics.logloss([1, 0], [0.8, 0.4])
    assert abs(ll - (-(math.log(0.8) + math.log(0.6)) / 2)) < 1e-12
    # Mean prediction 0.3 over a positive rate of 0.25.
    assert abs(metrics.calibration([1, 0, 0, 0], [0.3, 0.3, 0.3, 0.3]) - 1.2) < 1e-12
