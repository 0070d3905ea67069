"""Two-tower recall@K against the planted model's top-K, next to popularity and the best fixed list.

    python -m bench.quality_retrieval [--seeds 1,2,3] [--k 10,50] [--rows 2000] [--out runs/bench/retrieval.json]

1. Builds ``bench.generated_data.MID`` once (400k train impressions from the generator's planted
   field-aware click model, 300 users, 500 items; ``runs/bench/generated-mid``).
2. Per seed and variant (``VARIANTS``: with and without the logQ correction), trains ``two_tower``
   (``TRAIN``) in ``trainer.train``'s loop and exports it with ``export.retrieval`` (user-tower
   SavedModel + item-embedding file).
3. Takes the first ``--rows`` eval impressions as (user, context) rows: their user-side features
   go through the exported user tower, loaded with the TF1 loader and run by tensor names; their
   ids go to ``generator.clicklog.top_k_items``, the planted model's top-K over the items of the
   item-embedding file.
4. recall@K = |retrieved top-K n planted top-K| / K, averaged over rows; mean and sd over seeds.

Targets: ``click``, the K items with the highest planted click probability for the row (what a
ranking stage wants retrieved), and ``click x exposure``, the same weighted by each item's planted
share of impressions (where the user's next click most likely lands: what a softmax over clicked
items estimates). Rankings: the towers' ``<u, v>`` and ``<u, v> - log q`` (the client's
``--exclude_exposure``); the training split's most clicked items (popularity); and the best fixed
list, the K items found most often in the rows' planted top-K, which bounds every ranking that
ignores the user (popularity included).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bench import generated_data
from generator.clicklog import KEY_PREFIX, PlantedModel, top_k_items

GEN = generated_data.MID
USER_FIELDS = ("user", "query", "hour", "device")
# Linear towers (no hidden layer): the planted click logit is a sum of bilinear field terms, which a
# linear map of the field embeddings represents; one seed with hidden_units [64] recalled less
# (recall@10 0.25 against 0.32 for the click target, ranking <u, v> - log q).
TRAIN = {"model": {"name": "two_tower", "embedding_dim": 16, "hidden_units": [], "tower_dim": 32},
         "optimizer": {"name": "adam", "learning_rate": 0.005},
         "data": {"batch_size": 1024}, "train": {"epochs": 10, "verbose": 2, "report": False}}
VARIANTS = {"logq": {}, "no_logq": {"model": {"logq_correction": False}}}


def _ids(rows, field):
    return np.array([int(r[field][len(KEY_PREFIX[field]):]) for r in rows])


def recall(retrieved: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |retrieved row n truth row| / K (both ``[n, K]``)."""
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(retrieved, truth)]))


def best_fixed_list(truth: np.ndarray) -> np.ndarray:
    """The one list of K items with the highest recall on every row: the items most often in the rows' truth."""
    ids, counts = np.unique(truth, return_counts=True)
    return ids[np.argsort(-counts, kind="stable")[:truth.shape[1]]]


def user_examples(lines, schema) -> list[bytes]:
    """Raw tf.Examples of the user-side features of libffm lines (what a retrieval client sends)."""
    from serving.examples import ExampleBuilder

    builder = ExampleBuilder(schema)
    return [builder.line_example(" ".join(t for t in line.split()[1:] if t.split(":")[0] in USER_FIELDS))[1]
            for line in lines]


def train_and_export(etl: str, run_dir: str, export_base: str, seed: int, variant: dict) -> str:
    from export import retrieval as export_retrieval
    from feature_schema import configs
    from trainer import config as config_lib
    from trainer import train as trainer_lib

    overrides = configs.deep_merge(configs.deep_merge(TRAIN, variant), {
        "data": {"path": etl}, "run_dir": run_dir, "train": {"seed": seed}})
    trainer_lib.train(config_lib.resolve("", overrides=overrides))
    path, check = export_retrieval.export(run_dir, export_base, verify_examples=2000)
    print(f"quality_retrieval: exported {path} (TF1-loader parity {check['max_abs_diff']:.1e}, "
          f"{check['items']} items)", flush=True)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--k", default="10,50")
    p.add_argument("--rows", type=int, default=2000, help="eval (user, context) rows")
    p.add_argument("--work", default=generated_data.MID_DIR)
    p.add_argument("--out", default="runs/bench/retrieval.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from export import exporter
    from feature_schema import load_schema
    from serving import retrieval as serving_retrieval

    start = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    raw, etl = generated_data.prepare(args.work, GEN)
    schema = load_schema(etl)
    planted = PlantedModel(GEN)
    lines, rows = generated_data.read_libffm(os.path.join(raw, "eval.libffm"), args.rows)
    context = {f: _ids(rows, f) for f in USER_FIELDS}
    train_lines, train_rows = generated_data.read_libffm(os.path.join(raw, "train.libffm"))
    clicks = np.zeros(GEN.n_items)
    for line, r in zip(train_lines, train_rows):
        clicks[int(r["item"][1:])] += line[0] == "1"
    examples = user_examples(lines, schema)

    results: dict[str, dict] = {}
    for name, variant in VARIANTS.items():
        for seed in seeds:
            run_dir = os.path.join(args.work, "runs", f"{name}-{seed}")
            export_dir = train_and_export(etl, run_dir, os.path.join(args.work, "export", f"{name}-{seed}"), seed,
                                          variant)
            index = serving_retrieval.read_item_embeddings(
                os.path.join(export_dir, "assets.extra", serving_retrieval.ITEMS_FILE))
            items = np.array([int(k[1:]) for k in index.keys])
            sm = exporter.SessionModel(export_dir)
            users = sm.run_examples("serving_default", examples)[serving_retrieval.USER_VECTOR]
            sm.close()
            kmax = max(ks)
            truth = {"click": top_k_items(planted, context, kmax, items),
                     "click x exposure": top_k_items(planted, context, kmax, items, planted.freq["item"][items])}
            ranked = {f"{name}: <u,v>": items[index.top_k(users, kmax)[0]],
                      f"{name}: <u,v> - log q": items[index.top_k(users, kmax, exclude_exposure=True)[0]],
                      "popularity (train clicks)": np.tile(items[np.argsort(-clicks[items], kind="stable")][:kmax],
                                                           (len(users), 1))}
            for target, t in truth.items():
                for k in ks:
                    best = np.tile(best_fixed_list(t[:, :k]), (len(users), 1))
                    for rank_name, top in {**ranked, "best fixed list (bound without the user)": best}.items():
                        key = f"{rank_name} | {target} | recall@{k}"
                        results.setdefault(key, {})[seed] = recall(top[:, :k], t[:, :k])
    table = {key: {"mean": float(np.mean(list(v.values()))), "sd": float(np.std(list(v.values()), ddof=1))
                   if len(v) > 1 else 0.0, "per_seed": v} for key, v in results.items()}
    print(f"\nrecall@K against the planted top-K ({args.rows} eval rows, {len(items)} items, seeds {seeds}; "
          f"random: {', '.join(f'@{k} {k / len(items):.3f}' for k in ks)})")
    for key, r in table.items():
        print(f"  {key:70s} {r['mean']:.4f} +- {r['sd']:.4f}")
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"generator": GEN.__dict__, "train": TRAIN, "variants": VARIANTS, "rows": args.rows,
                   "items": int(len(items)), "seeds": seeds, "recall": table, "wall_s": time.time() - start,
                   "loadavg_end": load}, f, indent=2)
    print(f"quality_retrieval: {time.time() - start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
