"""Uncertainty loss weighting (Kendall et al. 2018) against fixed weights: click and conversion AUC over seeds.

    python -m bench.quality_weighting [--seeds 1,2,3] [--models mtl,esmm] [--out runs/bench/weighting.json]

The log is the generator's ``esmm`` preset (``ESMM_GEN``: 300k train impressions, conversions
sharing the click model's structure, about 0.8% of impressions converting; built once into
``runs/bench/generated-esmm``), where the two task losses differ by almost an order of magnitude
(click log loss about 0.33, conversion over all impressions about 0.04), the case learned weights
are for. Each model trains in ``trainer.train``'s loop with the ``quality_<model>`` experiment
(``RUN``: early stopping on the summed eval log loss, best epoch restored), once with fixed weights
(1, 1) and once with ``model.loss_weighting=uncertainty``, per ``train.seed``. AUCs are over all eval
impressions (conversion: clicked and converted), next to the Bayes-optimal AUCs of the planted
probabilities (``truth.json``); the learned weights exp(-s_t) are those of the restored epoch.

``runs(...)`` is shared with ``bench.quality_fusion``, which exports the ESMM runs: a run directory
whose ``config.yaml`` and ``metrics.json`` match is reused, not retrained.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bench import generated_data
from generator.clicklog import GeneratorConfig

ESMM_GEN = GeneratorConfig.preset("esmm")
WORK = os.path.join("runs", "bench", "generated-esmm")
RUN = {"data": {"batch_size": 1024}, "train": {"epochs": 8, "early_stopping_patience": 1, "verbose": 2,
                                               "report": False}}
# The fusion output each model's export serves (bench.quality_fusion): pCTR^1 x pCVR^1 x bid.
FUSION = {"esmm": {"a": 1.0, "b": 1.0, "ctr_output": "ctr", "cvr_output": "cvr", "bid_feature": "bid"},
          "mtl": {"a": 1.0, "b": 1.0, "ctr_output": "click", "cvr_output": "conversion", "bid_feature": "bid"}}
WEIGHTINGS = ("fixed", "uncertainty")


def run_config(etl: str, work: str, model: str, weighting: str, seed: int):
    """The resolved config of one run (experiment ``quality_<model>``)."""
    from feature_schema import configs
    from trainer import config as config_lib

    overrides = configs.deep_merge(RUN, {
        "data": {"path": etl}, "run_dir": os.path.join(work, "runs", f"{model}-{weighting}-{seed}"),
        "model": {"loss_weighting": weighting}, "train": {"seed": seed}, "fusion": FUSION[model]})
    return config_lib.resolve(f"quality_{model}", overrides=overrides)


def train_or_reuse(cfg) -> dict:
    """Trains ``cfg`` unless its run dir already holds a finished run of the same config; returns metrics."""
    from feature_schema import configs
    from trainer import config as config_lib
    from trainer import train as trainer_lib

    metrics_path = os.path.join(cfg.run_dir, "metrics.json")
    config_path = os.path.join(cfg.run_dir, "config.yaml")
    if os.path.exists(metrics_path) and os.path.exists(config_path) and \
            configs.to_dict(config_lib.load(config_path)) == configs.to_dict(cfg):
        with open(metrics_path, encoding="utf-8") as f:
            print(f"quality: reusing {cfg.run_dir}", flush=True)
            return json.load(f)
    return trainer_lib.train(cfg)


def prepare(work: str = WORK) -> tuple[str, str, dict]:
    """(raw dir, ETL dir, Bayes-optimal eval metrics) of the ``esmm``-preset log."""
    raw, etl = generated_data.prepare(work, ESMM_GEN)
    with open(os.path.join(raw, "truth.json"), encoding="utf-8") as f:
        return raw, etl, json.load(f)["bayes"]["eval"]


def learned_weights(run_dir: str) -> dict:
    """{task: exp(-s_t)} of a finished run's final model ({} for fixed weights)."""
    from trainer import train as trainer_lib

    _, _, model = trainer_lib.load_trained(run_dir)
    return {t: float(w) for t, w in model.loss_weighting.task_weights().items()} if model.loss_weighting else {}


def _mean_sd(values) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--models", default="mtl,esmm")
    p.add_argument("--work", default=WORK)
    p.add_argument("--out", default="runs/bench/weighting.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    _, etl, bayes = prepare(args.work)
    rows = {}
    for model in args.models.split(","):
        for weighting in WEIGHTINGS:
            per_seed = {}
            for seed in seeds:
                cfg = run_config(etl, args.work, model, weighting, seed)
                t0 = time.time()
                m = train_or_reuse(cfg)
                per_seed[seed] = {"click_auc": m["click"]["auc"], "conversion_auc": m["conversion"]["auc"],
                                  "click_logloss": m["click"]["logloss"],
                                  "conversion_logloss": m["conversion"]["logloss"],
                                  "weights": learned_weights(cfg.run_dir), "seconds": time.time() - t0}
            row = {k: _mean_sd([r[k] for r in per_seed.values()])
                   for k in ("click_auc", "conversion_auc", "click_logloss", "conversion_logloss")}
            if weighting == "uncertainty":
                row["weights"] = {t: _mean_sd([r["weights"][t] for r in per_seed.values()])
                                  for t in per_seed[seeds[0]]["weights"]}
            rows[f"{model}-{weighting}"] = {**row, "per_seed": per_seed}
    print(f"\n{ESMM_GEN.n_eval} eval impressions of the esmm preset; Bayes-optimal AUC click "
          f"{bayes['click']['auc']:.4f}, conversion {bayes['conversion']['auc']:.4f}; mean +- sd over seeds {seeds}")
    print(f"  {'run':18s} {'click AUC':>17s} {'conversion AUC':>17s}  learned weights exp(-s_t)")
    for name, r in rows.items():
        w = ", ".join(f"{t} {v['mean']:.2f} +- {v['sd']:.2f}" for t, v in r.get("weights", {}).items())
        print(f"  {name:18s} {r['click_auc']['mean']:.4f} +- {r['click_auc']['sd']:.4f} "
              f"{r['conversion_auc']['mean']:.4f} +- {r['conversion_auc']['sd']:.4f}  {w}")
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"generator": ESMM_GEN.__dict__, "run": RUN, "seeds": seeds, "bayes": bayes, "rows": rows,
                   "wall_s": time.time() - start, "loadavg_end": load}, f, indent=2)
    print(f"quality_weighting: {time.time() - start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
