"""Evaluation report of a run: JSON metrics, ROC and reliability (calibration) plots per task.

    python -m trainer.report --run_dir runs/frappe-ffm [--split eval] [--bins 20]

``write_report(run_dir, preds, labels, weights)`` is the hook the training loop
calls with the eval predictions of ``trainer.evaluation.predict_split``; the command
above rebuilds a finished run's model and does the same. Both write into
``<run_dir>/report/``:

  report.json               per task: AUC, logloss, calibration (mean prediction ÷
                            positive rate), Brier score, expected calibration error,
                            the ROC curve (thinned) and the reliability bins;
  roc_<task>.png            ROC curve with its AUC;
  calibration_<task>.png    reliability diagram (mean prediction vs observed positive
                            rate per bin) over a histogram of the predictions.

Reliability bins hold equal weight by default (``quantile``): CTR predictions
crowd near the base rate, so equal-width bins on [0, 1] would leave most bins
empty and one bin with almost everything.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

from feature_schema import metrics
from trainer.run_files import REPORT_DIR

ROC_POINTS = 200


def _arrays(labels, scores, weights):
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not (y.shape == s.shape == w.shape):
        raise ValueError(f"labels {y.shape}, scores {s.shape} and weights {w.shape} differ in length")
    return y, s, w


def roc_curve(labels, scores, weights=None):
    """Weighted ROC curve, one point per distinct score (ties move the curve diagonally).

    Args:
      labels: 0/1 array.
      scores: higher means more likely positive.
      weights: optional non-negative sample weights.

    Returns:
      ``(fpr, tpr, thresholds)``: arrays starting at (0, 0) with threshold +inf; point
      ``i`` is the rate of examples scoring ``>= thresholds[i]``. The trapezoid area
      under it equals ``metrics.auc`` (ties counted half).
    """
    y, s, w = _arrays(labels, scores, weights)
    order = np.argsort(-s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    pos, neg = w * (y > 0.5), w * (y <= 0.5)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos == 0 or total_neg == 0:
        raise ValueError("ROC needs both positive and negative examples")
    # Group equal scores (descending order): one curve point per group.
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    tp = np.cumsum(np.add.reduceat(pos, starts))
    fp = np.cumsum(np.add.reduceat(neg, starts))
    fpr = np.r_[0.0, fp / total_neg]
    tpr = np.r_[0.0, tp / total_pos]
    return fpr, tpr, np.r_[np.inf, s[starts]]


def trapezoid_auc(fpr, tpr) -> float:
    """Area under a piecewise-linear curve given by its points."""
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def thin_curve(fpr, tpr, max_points: int = ROC_POINTS) -> np.ndarray:
    """Indices of at most ~``max_points`` curve points, evenly spaced along fpr + tpr.

    Keeps the first and last point; used to keep report.json small.
    """
    n = len(fpr)
    if n <= max_points:
        return np.arange(n)
    along = np.asarray(fpr) + np.asarray(tpr)  # non-decreasing from 0 to 2
    idx = np.searchsorted(along, np.linspace(0.0, 2.0, max_points), side="left")
    return np.unique(np.r_[0, np.clip(idx, 0, n - 1), n - 1])


def reliability_bins(labels, probs, weights=None, num_bins: int = 20, strategy: str = "quantile") -> dict:
    """Reliability-diagram bins: mean prediction and observed positive rate per bin.

    Args:
      labels: 0/1 array.
      probs: predicted probabilities.
      weights: optional sample weights.
      num_bins: number of bins (empty bins are dropped).
      strategy: ``quantile`` (bins of equal weight in prediction order; equal
        predictions always share a bin) or ``uniform`` (equal width on [0, 1]).

    Returns:
      Lists per non-empty bin: ``lower``/``upper`` (smallest/largest prediction in it),
      ``mean_prediction``, ``positive_rate`` (weighted), ``weight``, ``count``.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    y, p, w = _arrays(labels, probs, weights)
    if strategy == "uniform":
        bins = np.minimum(np.floor(np.clip(p, 0.0, 1.0) * num_bins).astype(np.int64), num_bins - 1)
    elif strategy == "quantile":
        order = np.argsort(p, kind="mergesort")
        ps, ws = p[order], w[order]
        before = np.cumsum(ws) - ws  # weight ranked strictly before each example
        raw = np.minimum(np.floor(before / ws.sum() * num_bins).astype(np.int64), num_bins - 1)
        # A run of equal predictions takes the bin of its first member.
        starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
        group = np.cumsum(np.r_[True, ps[1:] != ps[:-1]]) - 1
        bins = np.empty_like(raw)
        bins[order] = raw[starts][group]
    else:
        raise ValueError(f"strategy {strategy!r} not in quantile/uniform")
    out = {k: [] for k in ("lower", "upper", "mean_prediction", "positive_rate", "weight", "count")}
    for b in range(num_bins):
        m = bins == b
        wb = w[m].sum()
        if not m.any() or wb <= 0:
            continue
        out["lower"].append(float(p[m].min()))
        out["upper"].append(float(p[m].max()))
        out["mean_prediction"].append(float(np.sum(w[m] * p[m]) / wb))
        out["positive_rate"].append(float(np.sum(w[m] * y[m]) / wb))
        out["weight"].append(float(wb))
        out["count"].append(int(m.sum()))
    return out


def expected_calibration_error(bins: dict) -> float:
    """Weight-averaged |mean prediction - positive rate| over reliability bins."""
    w = np.asarray(bins["weight"])
    gap = np.abs(np.asarray(bins["mean_prediction"]) - np.asarray(bins["positive_rate"]))
    return float(np.sum(w * gap) / np.sum(w))


def brier(labels, probs, weights=None) -> float:
    """Weighted mean squared error of the probabilities."""
    y, p, w = _arrays(labels, probs, weights)
    return float(np.sum(w * (p - y) ** 2) / np.sum(w))


def task_report(labels, probs, weights=None, num_bins: int = 20, strategy: str = "quantile") -> dict:
    """Metrics, thinned ROC curve and reliability bins of one task."""
    report = metrics.binary_report(labels, probs, weights)
    fpr, tpr, thr = roc_curve(labels, probs, weights)
    keep = thin_curve(fpr, tpr)
    bins = reliability_bins(labels, probs, weights, num_bins, strategy)
    report.update({
        "brier": brier(labels, probs, weights),
        "ece": expected_calibration_error(bins),
        "roc": {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(),
                # +inf is not JSON: the first point's threshold is written as null.
                "threshold": [None if np.isinf(t) else float(t) for t in thr[keep]]},
        "reliability": {"strategy": strategy, **bins},
    })
    return report


def _file_stem(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task)


def plot_roc(path: str, task: str, fpr, tpr, auc: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot(fpr, tpr, color="tab:blue", lw=2, label=f"model (AUC {auc:.4f})")
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="random (AUC 0.5)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC: {task}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_calibration(path: str, task: str, probs, weights, bins: dict, calibration: float, ece: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6.5), dpi=100, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    mean_p, rate = np.asarray(bins["mean_prediction"]), np.asarray(bins["positive_rate"])
    hi = float(min(1.0, 1.05 * max(mean_p.max(), rate.max(), 1e-3)))
    ax.plot([0, hi], [0, hi], color="gray", ls="--", lw=1, label="perfectly calibrated")
    ax.plot(mean_p, rate, "o-", color="tab:orange", lw=1.5, ms=4,
            label=f"{len(mean_p)} {bins.get('strategy', '')} bins (mean prediction, rate)")
    ax.set(xlim=(0, hi), ylim=(0, hi), ylabel="observed positive rate",
           title=f"Reliability: {task}\nmean pred / positive rate {calibration:.3f}, ECE {ece:.4f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    p = np.asarray(probs, dtype=np.float64).ravel()
    hist.hist(p[p <= hi], bins=50, range=(0, hi), weights=None if weights is None else np.asarray(weights)[p <= hi],
              color="tab:blue", alpha=0.7)
    hist.set(xlabel="predicted probability", ylabel="examples")
    hist.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run_dir: str, preds: dict, labels: dict, weights=None, num_bins: int = 20,
                 strategy: str = "quantile", plots: bool = True) -> dict:
    """Writes ``<run_dir>/report/report.json`` and the per-task PNGs; returns the report.

    Args:
      run_dir: the run directory.
      preds: {task: predicted probabilities [n]} (``predict_split``'s first output).
      labels: {label name: 0/1 [n]}; must hold every task of ``preds``.
      weights: sample weights [n] or None.
      num_bins, strategy: reliability binning (see ``reliability_bins``).
      plots: also write the PNGs.
    """
    missing = [t for t in preds if t not in labels]
    if missing:
        raise ValueError(f"tasks {missing} have no labels (labels: {sorted(labels)})")
    out_dir = os.path.join(run_dir, REPORT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    report = {"tasks": {}, "plots": {}}
    for task, p in preds.items():
        r = task_report(labels[task], p, weights, num_bins, strategy)
        report["tasks"][task] = r
        if plots:
            stem = _file_stem(task)
            files = {"roc": f"roc_{stem}.png", "calibration": f"calibration_{stem}.png"}
            plot_roc(os.path.join(out_dir, files["roc"]), task, r["roc"]["fpr"], r["roc"]["tpr"], r["auc"])
            plot_calibration(os.path.join(out_dir, files["calibration"]), task, p, weights,
                             r["reliability"], r["calibration"], r["ece"])
            report["plots"][task] = files
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the evaluation report (JSON + PNGs) of a finished run.")
    p.add_argument("--run_dir", required=True, help="run directory of a finished training run")
    p.add_argument("--split", default="eval", help="split to predict (eval or train)")
    p.add_argument("--bins", type=int, default=20, help="reliability bins")
    p.add_argument("--strategy", default="quantile", choices=("quantile", "uniform"))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from trainer import evaluation  # TensorFlow only when run as a command

    cfg, schema, model = evaluation.load_trained(args.run_dir)
    preds, labels, weights = evaluation.predict_split(model, schema, args.split, cfg.data.eval_batch_size)
    report = write_report(args.run_dir, preds, labels, weights, args.bins, args.strategy)
    for task, r in report["tasks"].items():
        print(f"report: {task}: AUC {r['auc']:.4f} logloss {r['logloss']:.4f} calibration {r['calibration']:.3f} "
              f"ECE {r['ece']:.4f} -> {os.path.join(args.run_dir, REPORT_DIR)}")


if __name__ == "__main__":
    from trainer import quiet

    quiet.filter_stderr()  # before TensorFlow's first import: its noise is filtered
    main()
