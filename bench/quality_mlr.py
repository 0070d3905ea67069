"""MLR (LS-PLM) against LR and FM: eval click AUC and log loss on a generated log, mean and sd over seeds.

    python -m bench.quality_mlr [--seeds 1,2,3] [--models lr,fm,mlr] [--out runs/bench/mlr.json]

The log is ``bench.generated_data.MID`` (400k train impressions from the generator's planted
field-aware model; built once into ``runs/bench/generated-mid``), so the Bayes-optimal AUC of the
planted probabilities (``truth.json``) is the ceiling. Each model trains in ``trainer.train``'s
loop with the settings in ``MODELS`` (early stopping on the eval log loss, best epoch restored),
once per ``train.seed``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bench import generated_data

_COMMON = {"data": {"batch_size": 1024}, "train": {"epochs": 10, "early_stopping_patience": 1, "verbose": 2,
                                                   "report": False}}
MODELS = {
    "lr": {"model": {"name": "lr", "l2_linear": 1e-4}, "optimizer": {"name": "adam", "learning_rate": 0.005}},
    "fm": {"model": {"name": "fm", "embedding_dim": 16, "l2_embedding": 1e-3, "l2_linear": 1e-4},
           "optimizer": {"name": "adam", "learning_rate": 0.002}},
    "mlr": {"model": {"name": "mlr", "num_regions": 12, "l2_linear": 1e-4},
            "optimizer": {"name": "adam", "learning_rate": 0.005}},
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--work", default=generated_data.MID_DIR)
    p.add_argument("--out", default="runs/bench/mlr.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from feature_schema import configs
    from trainer import config as config_lib
    from trainer import train as trainer_lib

    start = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    raw, etl = generated_data.prepare(args.work, generated_data.MID)
    with open(os.path.join(raw, "truth.json"), encoding="utf-8") as f:
        bayes = json.load(f)["bayes"]["eval"]["click"]
    rows = {}
    for name in args.models.split(","):
        per_seed = {}
        for seed in seeds:
            run_dir = os.path.join(args.work, "runs", f"{name}-{seed}")
            overrides = configs.deep_merge(configs.deep_merge(_COMMON, MODELS[name]), {
                "data": {"path": etl}, "run_dir": run_dir, "train": {"seed": seed}})
            t0 = time.time()
            m = trainer_lib.train(config_lib.resolve("", overrides=overrides))["click"]
            per_seed[seed] = {"auc": m["auc"], "logloss": m["logloss"], "seconds": time.time() - t0}
        rows[name] = {k: {"mean": float(np.mean([r[k] for r in per_seed.values()])),
                          "sd": float(np.std([r[k] for r in per_seed.values()], ddof=1)) if len(seeds) > 1 else 0.0}
                      for k in ("auc", "logloss", "seconds")}
        rows[name]["per_seed"] = per_seed
    print(f"\nclick on {generated_data.MID.n_eval} eval impressions (Bayes-optimal AUC {bayes['auc']:.4f}, "
          f"logloss {bayes['logloss']:.4f}); mean +- sd over seeds {seeds}")
    print(f"  {'model':8s} {'AUC':>17s} {'logloss':>17s} {'train s':>8s}")
    for name, r in rows.items():
        print(f"  {name:8s} {r['auc']['mean']:.4f} +- {r['auc']['sd']:.4f} {r['logloss']['mean']:.4f} +- "
              f"{r['logloss']['sd']:.4f} {r['seconds']['mean']:8.0f}")
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"generator": generated_data.MID.__dict__, "models": MODELS, "common": _COMMON, "seeds": seeds,
                   "bayes": bayes, "rows": rows, "wall_s": time.time() - start, "loadavg_end": load}, f, indent=2)
    print(f"quality_mlr: {time.time() - start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
