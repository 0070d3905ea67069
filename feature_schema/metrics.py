"""Binary-classification metrics in NumPy: AUC, logloss, calibration.

At the bottom of the import graph (NumPy only), so that the trainer's reports and the
generator's Bayes-optimal reference use one definition without the generator importing
the trainer.
"""
from __future__ import annotations

import numpy as np

_EPS = 1e-7


def auc(labels, scores, weights=None) -> float:
    """Area under the ROC curve, ties counted half (Mann-Whitney U).

    Args:
      labels: 0/1 array.
      scores: real-valued scores, higher means more likely positive.
      weights: optional non-negative sample weights.

    Returns:
      The AUC, or NaN when only one class is present.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    pos_w = w * (y > 0.5)
    neg_w = w * (y <= 0.5)
    total_pos, total_neg = pos_w.sum(), neg_w.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    # Group equal scores: a positive beats every negative below its group and
    # half of the negatives tied with it.
    _, starts = np.unique(s, return_index=True)
    pos_g = np.add.reduceat(pos_w, starts)
    neg_g = np.add.reduceat(neg_w, starts)
    neg_below = np.cumsum(neg_g) - neg_g
    u = np.sum(pos_g * (neg_below + 0.5 * neg_g))
    return float(u / (total_pos * total_neg))


def logloss(labels, probs, weights=None) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-7, 1-1e-7]."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), _EPS, 1 - _EPS)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.sum(w * ll) / np.sum(w))


def calibration(labels, probs, weights=None) -> float:
    """Mean prediction divided by the positive rate (1.0 is calibrated)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    rate = np.sum(w * y) / np.sum(w)
    if rate == 0:
        return float("nan")
    return float((np.sum(w * p) / np.sum(w)) / rate)


def binary_report(labels, probs, weights=None) -> dict[str, float]:
    """AUC, logloss, calibration and counts of one task."""
    y = np.asarray(labels).ravel()
    return {
        "auc": auc(labels, probs, weights),
        "logloss": logloss(labels, probs, weights),
        "calibration": calibration(labels, probs, weights),
        "examples": int(y.size),
        "positive_rate": float(np.mean(y)) if y.size else float("nan"),
    }
