"""The fusion output against ranking by pCTR alone: the planted expected value the top of each ranking recovers.

    python -m bench.quality_fusion [--seeds 1,2,3] [--contexts 1000] [--candidates 20] [--out runs/bench/fusion.json]

1. The generator's ``esmm`` preset (``bench.quality_weighting.prepare``: 300k train impressions,
   120 items; conversion shares the click model's structure) and a synthetic bid per item,
   ``bid_i = exp(N(0, BID_SIGMA^2))`` drawn once with ``BID_SEED`` (the log has no bids).
2. Per seed, ESMM trained with fixed weights (``bench.quality_weighting.run_config``, reused when
   that script already trained it) and exported with ``fusion = ctr^1 * cvr^1 * bid``.
3. ``--contexts`` requests, each a context (user, query, hour, device drawn with the log's
   frequencies) and ``--candidates`` distinct items drawn uniformly, all at the top slot, sent to
   the export's ``rank`` signature (TF1 loader, tensor names) with each candidate's bid.
4. The planted expected value of showing item i in context c is ``EV = P(click) * P(conversion |
   click) * bid_i`` from the generator's planted model. For each ranking and K, a request's score is
   ``sum EV(top K of the ranking) / sum EV(best K by EV)`` (1 = the planted optimum); the table shows
   its mean over requests, then mean and sd over seeds.

Rankings: ``fusion`` (the served output), ``pCTR`` (the served ``ctr`` alone), ``pCTR x bid``
(a = 1, b = 0, from the served ``ctr``), the planted click probability alone (the best any ranking
by pCTR can do), and random order (its expectation).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bench import quality_weighting
from generator.clicklog import KEY_PREFIX, PlantedModel

BID_SEED = 20240501
BID_SIGMA = 0.5
REQUEST_SEED = 11
KS = (1, 3)


def item_bids(n_items: int) -> np.ndarray:
    """The synthetic per-item bid: log-normal, median 1, deterministic."""
    return np.round(np.exp(np.random.default_rng(BID_SEED).normal(0.0, BID_SIGMA, n_items)), 4)


def conversion_logits(planted: PlantedModel, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Planted logit of P(conversion | click) for every (user, item) pair, ``[n, len(items)]`` (as
    ``PlantedModel.sample`` computes it per impression; ``check_conversion_logits`` compares)."""
    brand = planted.item_brand[items]
    return (planted.b_conv + planted.cv_user[users][:, None]
            + (planted.cv_item[items] + planted.cv_brand[brand] - 0.4 * planted.z_price[items])[None, :]
            + planted.cv_u[users] @ planted.cv_b[brand].T)


def check_conversion_logits(planted: PlantedModel) -> None:
    x = planted.sample(2000, rng=np.random.default_rng(0))
    got = conversion_logits(planted, x["user"], np.arange(planted.cfg.n_items))[np.arange(2000), x["item"]]
    if not np.allclose(got, x["conv_logit"], atol=1e-9):
        raise RuntimeError("conversion_logits drifted from generator.clicklog.PlantedModel.sample")


def requests(planted: PlantedModel, n: int, c: int):
    """(context ids {field: [n]}, candidate items [n, c], planted EV [n, c], planted P(click) [n, c])."""
    rng = np.random.default_rng(REQUEST_SEED)
    x = planted.sample(n, rng=rng)
    ctx = {f: x[f] for f in ("user", "query", "hour", "device")}
    items = np.stack([rng.choice(planted.cfg.n_items, size=c, replace=False) for _ in range(n)])
    p_click = 1 / (1 + np.exp(-planted.item_click_logits(ctx, None, position=0)))
    p_cvr = 1 / (1 + np.exp(-conversion_logits(planted, ctx["user"], np.arange(planted.cfg.n_items))))
    ev = p_click * p_cvr * item_bids(planted.cfg.n_items)[None, :]
    rows = np.arange(n)[:, None]
    return ctx, items, ev[rows, items], p_click[rows, items]


def recovered(scores: np.ndarray, ev: np.ndarray, k: int) -> float:
    """Mean over requests of sum EV(top k by ``scores``) / sum EV(top k by EV)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = -np.sort(-ev, axis=1)[:, :k]
    return float(np.mean(np.take_along_axis(ev, top, axis=1).sum(1) / best.sum(1)))


def serve(export_dir: str, ctx: dict, items: np.ndarray, bids: np.ndarray) -> dict:
    """{output: [n, c]} of the export's ``rank`` signature, one request per context."""
    from export.verify import SessionModel
    from serving import protocol

    sm = SessionModel(export_dir)
    out: dict = {}
    try:
        for i in range(len(items)):
            context = protocol.raw_example([(f, f"{KEY_PREFIX[f]}{ctx[f][i]}", 1.0) for f in ctx])
            cands = [protocol.raw_example([("item", f"i{j}", 1.0), ("position", "p0", 1.0), ("bid", "bid", bids[j])],
                                          {"bid"}) for j in items[i]]
            for k, v in sm.rank(context, cands).items():
                out.setdefault(k, []).append(v)
    finally:
        sm.close()
    return {k: np.stack(v) for k, v in out.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--contexts", type=int, default=1000)
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--weighting", default="fixed", choices=quality_weighting.WEIGHTINGS)
    p.add_argument("--work", default=quality_weighting.WORK)
    p.add_argument("--out", default="runs/bench/fusion.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from export import exporter

    start = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    _, etl, _ = quality_weighting.prepare(args.work)
    planted = PlantedModel(quality_weighting.ESMM_GEN)
    check_conversion_logits(planted)
    bids = item_bids(planted.cfg.n_items)
    ctx, items, ev, p_click = requests(planted, args.contexts, args.candidates)
    fixed = {"planted pCTR": {k: recovered(p_click, ev, k) for k in KS},
             "random": {k: float(np.mean(np.mean(ev, 1) * k / -np.sort(-ev, 1)[:, :k].sum(1))) for k in KS}}
    per_seed = {}
    for seed in seeds:
        cfg = quality_weighting.run_config(etl, args.work, "esmm", args.weighting, seed)
        quality_weighting.train_or_reuse(cfg)
        path, check = exporter.export(cfg.run_dir, os.path.join(args.work, "export"), f"esmm-{args.weighting}-{seed}")
        out = serve(path, ctx, items, bids)
        want = out["ctr"].astype(np.float64) * out["cvr"] * bids[items]
        fusion_err = float(np.max(np.abs(out["fusion"] - want) / np.maximum(1.0, want)))
        if fusion_err > 1e-5:
            raise RuntimeError(f"served fusion differs from ctr * cvr * bid by {fusion_err:.2e}")
        per_seed[seed] = {"fusion": {k: recovered(out["fusion"], ev, k) for k in KS},
                          "pCTR": {k: recovered(out["ctr"], ev, k) for k in KS},
                          "pCTR x bid": {k: recovered(out["ctr"] * bids[items], ev, k) for k in KS},
                          "export": path, "fusion_check": check["per_signature"], "fusion_vs_numpy": fusion_err}
    rows = {}
    for name in ("fusion", "pCTR", "pCTR x bid"):
        vals = {k: [per_seed[s][name][k] for s in seeds] for k in KS}
        rows[name] = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                      for k, v in vals.items()}
    for name, v in fixed.items():
        rows[name] = {k: {"mean": v[k], "sd": 0.0} for k in KS}
    print(f"\nshare of the planted expected value (pCTR x pCVR x bid) in the top K of {args.contexts} requests of "
          f"{args.candidates} candidates; esmm ({args.weighting} weights), mean +- sd over seeds {seeds}")
    print(f"  {'ranking':14s} " + " ".join(f"{'top ' + str(k):>17s}" for k in KS))
    for name, r in rows.items():
        print(f"  {name:14s} " + " ".join(f"{r[k]['mean']:.4f} +- {r[k]['sd']:.4f}" for k in KS))
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"generator": quality_weighting.ESMM_GEN.__dict__, "bid_sigma": BID_SIGMA, "bid_seed": BID_SEED,
                   "contexts": args.contexts, "candidates": args.candidates, "seeds": seeds, "rows": rows,
                   "per_seed": per_seed, "wall_s": time.time() - start, "loadavg_end": load}, f, indent=2,
                  default=str)
    print(f"quality_fusion: {time.time() - start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
