"""The mean-pooling ceiling of the ``behaviour`` preset: the best click model that sees the history only as a mean.

    python -m bench.behaviour_ceiling [--dims 8,16] [--seeds 1,2] [--n-fit 1000000] [--attention]
                                      [--out runs/bench/behaviour_ceiling.json]

The planted click logit is ``offset + beta * tau * log(mean_{j in H} exp(<e_c, e_j> / tau))``
(``generator.behaviour``; ``offset`` every other planted term). A model that mean-pools the history
(DeepFM with ``embedding_combiner: mean``) sees it only as ``m = mean_{j in H} phi(j)``, with ``phi`` its
learned ``embedding_dim``-float item embedding (Deep Sets, Zaheer et al. 2017): whatever it does
with ``m``, the candidate and the user, it cannot beat the best such function fitted on the planted
model itself. The *oracle* here is that function: it is given

* the planted vectors ``e_i`` (so it need not learn them) and every other planted term as an exact
  offset (so it learns the behaviour term only),
* the history through ``m = mean_j phi(e_j)``, ``phi: R^k -> R^d`` an MLP (``d`` = ``embedding_dim``),
* a head ``g(e_c, m, u)``: an MLP over ``[e_c, m, psi(e_c) * m, log softplus(<psi_r(e_c), m>), [H empty], u]``
  (``psi`` MLPs of the candidate, ``u`` a learned user embedding, as DeepFM has one). The log-kernel
  inputs make the planted form reachable: ``<psi(e_c), phi(e_j)> = exp(<e_c, e_j> / tau)`` is a
  rank-``d`` factorisation of the items' kernel, exact (up to the MLPs' approximation) once ``d``
  reaches the number of items.

and fitted by maximum likelihood (Adam, early stopping on a held-out tenth) on ``n_fit`` impressions
drawn from the planted model after the eval split (more than the 200k train split: the planted model
is known, so data is free). Its AUC on the preset's eval split (the one ``truth.json`` and the trained
models are scored on) is the *mean-pooling ceiling* at ``d``. ``pooling="attention"`` is the same
oracle with the history weighted item by item, ``m = mean_j a(e_c, e_j) phi(e_j)``, ``a = exp(MLP)``,
which can represent the planted term exactly: it checks that the fit reaches Bayes when the function
class allows it.

Margin of bar (a) (``bench/quality_behaviour.py``), fixed before the measurement: DIN and DeepFM see
the same user, candidate and history; what separates them is item-by-item against mean pooling. At
``embedding_dim`` d the best mean-pooled model reaches ``ceiling_mean(d)`` and the best attention model
Bayes, so ``margin = Bayes - ceiling_mean(d)`` (the oracle with the user embedding, at the seed with the
higher ceiling: the margin is not to be inflated by a poor fit).

Measured (docs/TRAINER.md#behaviour-sequences): ``ceiling_mean(8)`` 0.9297 (seeds 1 and 2: 0.9291,
0.9297; ``d`` 16: 0.9305, 0.9312; attention at ``d`` 8: 0.9361; Bayes 0.9373), so the margin is 0.0076;
about 2 min a seed on 2 loaded cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from feature_schema import metrics
from generator import behaviour
from generator.clicklog import GeneratorConfig, PlantedModel

# Log-kernel inputs of the head (each one a rank-d kernel <psi_r(e_c), m>).
N_KERNELS = 4
HIDDEN = 64
# Impressions the oracle is fitted on (a tenth held out): 1M fits in about 2 min a seed on 2 loaded cores.
N_FIT = 1_000_000


def planted_splits(cfg: GeneratorConfig, n_fit: int) -> tuple[behaviour.Behaviour, dict]:
    """The planted behaviour and the splits ``train``, ``eval`` (those ``generator.clicklog.generate``
    writes for ``cfg``) and ``fit`` (``n_fit`` impressions after eval, in time order)."""
    model = PlantedModel(cfg)
    beh = behaviour.Behaviour(cfg, cfg.n_users, cfg.n_items)
    behaviour.calibrate(model, beh, cfg.ctr, np.random.default_rng(cfg.seed + 201))
    sizes = {"train": cfg.n_train, "eval": cfg.n_eval, "fit": n_fit}
    return beh, behaviour.sample_in_time_order(model, beh, sizes, model._rng)


def oracle_inputs(beh: behaviour.Behaviour, x: dict) -> dict:
    """The oracle's inputs: candidate, history, user and the planted logit less its soft-maximum term."""
    soft = beh.term(x["item"], x[behaviour.HIST_FIELD]) - beh.quality[x["item"]]
    return {"item": x["item"].astype(np.int32), "hist": x[behaviour.HIST_FIELD].astype(np.int32),
            "user": x["user"].astype(np.int32), "offset": (x["click_logit"] - soft).astype(np.float32)}


class Oracle(keras.Model):
    """The oracle (module docstring): inputs of ``oracle_inputs`` -> click logit.

    Args:
      vectors: the planted item vectors ``e`` [n_items, k].
      n_users: users (rows of the user embedding).
      dim: ``d``, the outputs of ``phi``.
      pooling: "mean" (``m = mean_j phi(e_j)``) or "attention" (``m = mean_j a(e_c, e_j) phi(e_j)``).
      use_user: whether the head reads a learned user embedding.
    """

    def __init__(self, vectors: np.ndarray, n_users: int, dim: int, pooling: str = "mean", use_user: bool = True):
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {pooling!r}")
        self.e = tf.constant(vectors, tf.float32)
        self.dim, self.pooling, self.use_user = dim, pooling, use_user
        self.phi = _mlp([HIDDEN, HIDDEN], dim, "phi")
        self.psi = _mlp([HIDDEN], dim * (1 + N_KERNELS), "psi")
        self.head = _mlp([128, 64], 1, "head")
        self.att = _mlp([HIDDEN, HIDDEN], 1, "attention") if pooling == "attention" else None
        self.user = keras.layers.Embedding(n_users, dim, name="user") if use_user else None

    def call(self, inputs):
        # Every function of one item or of a (candidate, item) pair is computed on the catalogue once
        # per batch and gathered: 120 items, not batch x history rows.
        item, hist = inputs["item"], inputs["hist"]
        valid = tf.cast(hist >= 0, tf.float32)[:, :, None]             # [b, N, 1]
        safe = tf.maximum(hist, 0)
        weight = valid
        if self.att is not None:
            n = tf.shape(self.e)[0]
            c = tf.repeat(self.e, n, axis=0)
            j = tf.tile(self.e, [n, 1])
            table = tf.reshape(self.att(tf.concat([c, j, c * j], -1)), [n, n])   # [candidate, item]
            pairs = tf.stack([tf.broadcast_to(item[:, None], tf.shape(hist)), safe], -1)
            weight = valid * tf.exp(tf.minimum(tf.gather_nd(table, pairs), 30.0))[:, :, None]
        count = tf.maximum(tf.reduce_sum(valid, 1), 1.0)               # [b, 1]
        m = tf.reduce_sum(weight * tf.gather(self.phi(self.e), safe), 1) / count   # [b, d]
        e_c = tf.gather(self.e, item)                                   # [b, k]
        p = tf.reshape(tf.gather(self.psi(self.e), item), [-1, 1 + N_KERNELS, self.dim])
        kernels = tf.math.log(tf.nn.softplus(tf.reduce_sum(p[:, 1:] * m[:, None, :], -1)) + 1e-3)
        empty = 1.0 - tf.reduce_max(valid[:, :, 0], 1, keepdims=True)
        parts = [e_c, m, p[:, 0] * m, kernels, empty] + ([self.user(inputs["user"])] if self.use_user else [])
        return inputs["offset"] + self.head(tf.concat(parts, -1))[:, 0]


def _mlp(units, out: int, name: str):
    return keras.Sequential([keras.layers.Dense(u, "gelu") for u in units] + [keras.layers.Dense(out)], name=name)


def fit_oracle(beh: behaviour.Behaviour, splits: dict, dim: int, seed: int, pooling: str = "mean",
               use_user: bool = True, epochs: int = 30, batch_size: int = 4096) -> dict:
    """Fits the oracle on ``splits["fit"]`` (early stopping on its last tenth); returns its metrics.

    Returns:
      {"eval": click report on ``splits["eval"]``, "heldout_logloss", "heldout_planted_logloss" (the planted
      probabilities' on the held-out tenth: the oracle's excess over it is how far it is from the best
      model of any kind), "epochs", "seconds"}.
    """
    start = time.time()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    fit = oracle_inputs(beh, splits["fit"])
    y = splits["fit"]["click"].astype(np.float32)
    cut = len(y) - len(y) // 10
    head, tail = ({k: v[:cut] for k, v in fit.items()}, y[:cut]), ({k: v[cut:] for k, v in fit.items()}, y[cut:])
    model = Oracle(beh.e, beh.history.shape[0], dim, pooling, use_user)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.BinaryCrossentropy(from_logits=True))
    history = model.fit(*head, validation_data=tail, epochs=epochs, batch_size=batch_size, verbose=0,
                        callbacks=[keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.3, patience=1),
                                   keras.callbacks.EarlyStopping("val_loss", patience=3, restore_best_weights=True)])
    ev = oracle_inputs(beh, splits["eval"])
    p = 1.0 / (1.0 + np.exp(-model.predict(ev, batch_size=8192, verbose=0).astype(np.float64)))
    planted = splits["fit"]["p_click"][cut:]
    return {"eval": metrics.binary_report(splits["eval"]["click"], p),
            "heldout_logloss": float(min(history.history["val_loss"])),
            "heldout_planted_logloss": float(np.mean(-tail[1] * np.log(planted) - (1 - tail[1]) * np.log1p(-planted))),
            "epochs": len(history.history["val_loss"]), "seconds": time.time() - start}


def mean_pooling_ceiling(cfg: GeneratorConfig, dim: int, seeds=(1, 2), n_fit: int = N_FIT) -> dict:
    """``ceiling_mean(dim)``: the mean oracle's eval click AUC, the highest over ``seeds``.

    Returns:
      {"auc": the highest, "dim", "n_fit", "per_seed": {seed: ``fit_oracle``'s result}}.
    """
    beh, splits = planted_splits(cfg, n_fit)
    per_seed = {s: fit_oracle(beh, splits, dim, s) for s in seeds}
    return {"auc": max(r["eval"]["auc"] for r in per_seed.values()), "dim": dim, "n_fit": n_fit, "per_seed": per_seed}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", default="8,16", help="phi's outputs d (the first is the margin's)")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--n-fit", type=int, default=N_FIT)
    p.add_argument("--attention", action="store_true", help="also fit the attention oracle (d = the first dim)")
    p.add_argument("--out", default="runs/bench/behaviour_ceiling.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from bench.quality_behaviour import GEN

    start = time.time()
    beh, splits = planted_splits(GEN, args.n_fit)
    bayes = metrics.binary_report(splits["eval"]["click"], splits["eval"]["p_click"])
    dims, seeds = [int(d) for d in args.dims.split(",")], [int(s) for s in args.seeds.split(",")]
    runs = [("mean", d, s) for d in dims for s in seeds]
    runs += [("attention", dims[0], seeds[0])] if args.attention else []
    rows = []
    for pooling, d, s in runs:
        r = fit_oracle(beh, splits, d, s, pooling)
        rows.append({"pooling": pooling, "dim": d, "seed": s, **r})
        print(f"  {pooling:9s} d={d:<3d} seed {s}: eval AUC {r['eval']['auc']:.4f} "
              f"logloss {r['eval']['logloss']:.4f}; held-out logloss {r['heldout_logloss']:.4f} "
              f"(planted {r['heldout_planted_logloss']:.4f}), "
              f"{r['epochs']} epochs, {r['seconds']:.0f}s", flush=True)
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    print(f"  Bayes (planted) eval AUC {bayes['auc']:.4f}; load average {' '.join(load)}; {time.time() - start:.0f}s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"n_fit": args.n_fit, "bayes": bayes, "rows": rows, "loadavg_end": load}, f, indent=2)


if __name__ == "__main__":
    main()
