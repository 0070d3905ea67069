"""Behaviour sequences: impressions in time order, each user's recent clicks, and a planted effect of them.

With ``GeneratorConfig.history_length`` N > 0, ``generator.clicklog.generate`` samples impressions in
time order and writes, with each impression, the user's last N clicked items before it (most
recent first) as the multi-valued field ``hist`` (``hist:i12:1 hist:i55:1 ...``). Every item has a
planted vector ``e_i`` (``behaviour_dim`` k dimensions, N(0, 1/sqrt(k)) entries, so that the inner
product of two items has standard deviation 1), and the click logit of ``generator.clicklog`` gains

    beta * softmax_tau(H, c) = beta * tau * log( (1/|H|) sum_{j in H} exp(<e_c, e_j> / tau) )

for candidate item ``c`` and history ``H`` (0 for an empty history): a soft maximum of the
candidate's similarity to the recent clicks. At ``tau -> inf`` it is the mean similarity
``<e_c, m_H>`` with ``m_H`` the mean of the history's vectors, which a model that mean-pools the
history represents exactly; at small ``tau`` it is the largest similarity, which no function of
``m_H`` and ``c`` linear in ``m_H`` is. ``truth.json`` reports the Bayes-optimal metrics and those
of the best *mean-pooled surrogate*: the planted probabilities with the behaviour term replaced by
``a + b * <e_c, m_H> + g * [H empty]``, its maximum-likelihood fit on the training split.

Time runs in steps of ``TICK`` impressions: an impression sees the clicks of every earlier step
(impressions of one step are simultaneous). A burn-in of ``burn_in`` impressions, not written,
fills the histories before the training split; the eval split follows the training split in time.

With ``vector_dim`` d > 0 the generator also writes ``item_vectors.tsv`` (``item<TAB>item_vec``, d
comma-separated floats): ``A e_i + noise`` with a fixed random ``A`` [d, k] and N(0,
``vector_noise``^2) noise, a stand-in for a pre-computed image or text embedding that carries the
planted vectors; ``item_quality`` q > 0 adds ``q * <w_q, e_c>`` (``w_q`` a fixed unit vector) to
every click logit, an appeal of the item that its vector shows.
"""
from __future__ import annotations

import numpy as np

from feature_schema import metrics

HIST_FIELD = "hist"
# The column of item_vectors.tsv (a vector field of the ETL).
VECTOR_FIELD = "item_vec"
# Impressions per time step.
TICK = 32


def soft_max_similarity(sims: np.ndarray, valid: np.ndarray, temperature: float) -> np.ndarray:
    """``tau * log(mean_j exp(s_j / tau))`` over the valid entries of each row (0 for a row with none).

    Args:
      sims: ``[n, N]`` similarities.
      valid: ``[n, N]`` bool, which entries are history items.
      temperature: tau > 0.
    """
    z = np.where(valid, sims / temperature, -np.inf)
    top = np.max(z, axis=1, initial=-np.inf)
    safe = np.where(np.isfinite(top), top, 0.0)
    total = np.sum(np.where(valid, np.exp(z - safe[:, None]), 0.0), axis=1)
    count = valid.sum(axis=1)
    out = temperature * (safe + np.log(np.maximum(total, 1e-300)) - np.log(np.maximum(count, 1)))
    return np.where(count > 0, out, 0.0)


class Behaviour:
    """The planted item vectors, the users' click histories and the behaviour term.

    Args:
      cfg: the generator config (``history_length`` > 0).
      n_users, n_items: cardinalities.
    """

    def __init__(self, cfg, n_users: int, n_items: int):
        if cfg.history_length < 1 or cfg.behaviour_dim < 1 or cfg.behaviour_temperature <= 0:
            raise ValueError(f"behaviour needs history_length >= 1, behaviour_dim >= 1 and behaviour_temperature > 0 "
                             f"(got {cfg.history_length}, {cfg.behaviour_dim}, {cfg.behaviour_temperature})")
        self.cfg = cfg
        # A stream of its own: the click model's draws stay those of the same seed without behaviour.
        rng = np.random.default_rng(cfg.seed + 200)
        k = cfg.behaviour_dim
        self.e = rng.normal(0.0, k ** -0.25, (n_items, k))
        w_q = rng.normal(0.0, 1.0, k)
        self.quality = cfg.item_quality * (self.e @ (w_q / np.linalg.norm(w_q)))
        self.vectors = None
        if cfg.vector_dim:
            a = rng.normal(0.0, k ** -0.5, (cfg.vector_dim, k))
            self.vectors = self.e @ a.T + rng.normal(0.0, cfg.vector_noise, (n_items, cfg.vector_dim))
        self.history = np.full((n_users, cfg.history_length), -1, np.int64)  # most recent first, -1: none

    def term(self, items: np.ndarray, hist: np.ndarray) -> np.ndarray:
        """``beta * softmax_tau`` of each (candidate, history) row plus the item quality."""
        valid = hist >= 0
        sims = np.einsum("nk,nlk->nl", self.e[items], self.e[np.maximum(hist, 0)])
        soft = soft_max_similarity(sims, valid, self.cfg.behaviour_temperature)
        return self.cfg.behaviour_beta * soft + self.quality[items]

    def mean_vector(self, hist: np.ndarray) -> np.ndarray:
        """``m_H``: the mean planted vector of each history (0 for an empty one)."""
        valid = (hist >= 0)[:, :, None]
        total = np.sum(np.where(valid, self.e[np.maximum(hist, 0)], 0.0), axis=1)
        return total / np.maximum(valid.sum(axis=1), 1)

    def run(self, x: dict, base_logit: np.ndarray, u_click: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Plays the impressions of ``x`` in time order; returns (their histories [n, N], behaviour terms [n]).

        A click is ``u_click < sigmoid(base_logit + term)``; each click becomes the most recent item of its
        user's history for the next time step.
        """
        n = len(base_logit)
        hists = np.empty((n, self.cfg.history_length), np.int64)
        terms = np.empty(n)
        users, items = x["user"], x["item"]
        for start in range(0, n, TICK):
            s = slice(start, min(start + TICK, n))
            hists[s] = self.history[users[s]]
            terms[s] = self.term(items[s], hists[s])
            clicked = np.nonzero(u_click[s] < 1.0 / (1.0 + np.exp(-(base_logit[s] + terms[s]))))[0] + start
            for i in clicked:
                row = self.history[users[i]]
                row[1:] = row[:-1].copy()
                row[0] = items[i]
        return hists, terms


def fit_surrogate(offset: np.ndarray, features: np.ndarray, labels: np.ndarray, iters: int = 50) -> np.ndarray:
    """Maximum-likelihood weights ``w`` of ``P(y) = sigmoid(offset + features @ w)``.

    Newton's method with step halving (each step lowers the log loss), from ``w = 0``.
    """
    def loss(w):
        z = offset + features @ w
        return float(np.sum(np.logaddexp(0.0, z) - labels * z))

    w = np.zeros(features.shape[1])
    current = loss(w)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(offset + features @ w)))
        grad = features.T @ (labels - p)
        hess = (features * (p * (1 - p))[:, None]).T @ features + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6 and loss(w + t * step) > current:
            t /= 2
        w = w + t * step
        new = loss(w)
        if current - new < 1e-9 * max(abs(current), 1.0):
            break
        current = new
    return w


def surrogate_features(behaviour: Behaviour, x: dict) -> np.ndarray:
    """``[1, <e_c, m_H>, [H empty]]`` per impression: what a mean-pooled history can give a linear term."""
    m = behaviour.mean_vector(x[HIST_FIELD])
    empty = (x[HIST_FIELD] < 0).all(axis=1)
    sim = np.sum(behaviour.e[x["item"]] * m, axis=1)
    return np.stack([np.ones_like(sim), sim, empty.astype(float)], axis=1)


def surrogate_metrics(behaviour: Behaviour, splits: dict) -> dict:
    """The click metrics of the best mean-pooled surrogate (module docstring), fitted on ``train``.

    Returns:
      {"weights": [a, b, g], "<split>": click report} for every split.
    """
    def parts(x):
        beh = behaviour.term(x["item"], x[HIST_FIELD]) - behaviour.quality[x["item"]]
        return x["click_logit"] - beh, surrogate_features(behaviour, x)

    offset, feats = parts(splits["train"])
    w = fit_surrogate(offset, feats, splits["train"]["click"].astype(float))
    out = {"weights": w.tolist()}
    for name, x in splits.items():
        offset, feats = parts(x)
        out[name] = metrics.binary_report(x["click"], 1.0 / (1.0 + np.exp(-(offset + feats @ w))))
    return out


def sample_in_time_order(model, behaviour: Behaviour, sizes: dict, rng: np.random.Generator) -> dict:
    """Splits of impressions in time order (after the burn-in), each with its ``hist`` and behaviour term.

    Args:
      model: the ``generator.clicklog.PlantedModel``.
      behaviour: the ``Behaviour`` (its histories advance).
      sizes: split name -> impressions, in time order (train, then eval).
      rng: the generator's stream.
    """
    def play(n):
        x = model.draw(n, rng)
        base = model.click_logit(x)
        u = rng.random(n)
        hists, terms = behaviour.run(x, base, u)
        x = model.label(x, base + terms, u, rng)
        x[HIST_FIELD] = hists
        x["behaviour_logit"] = terms
        return x

    if behaviour.cfg.burn_in:
        play(behaviour.cfg.burn_in)
    return {name: play(n) for name, n in sizes.items()}


def calibrate(model, behaviour: Behaviour, target_ctr: float, rng: np.random.Generator) -> None:
    """Shifts the click intercept so that the click rate after the burn-in is near ``target_ctr``.

    Plays a burn-in from empty histories with the intercept fitted without behaviour, refits the intercept
    on the last half of it, and starts the histories over.
    """
    from generator.clicklog import _fit_intercept

    n = max(behaviour.cfg.burn_in, 20 * TICK)
    x = model.draw(n, rng)
    base = model.click_logit(x)
    _, terms = behaviour.run(x, base, rng.random(n))
    tail = slice(n // 2, n)
    model.b_click += _fit_intercept(base[tail] + terms[tail], target_ctr)
    behaviour.history[:] = -1


def hist_tokens(hist: np.ndarray, prefix: str) -> list[str]:
    """`` hist:<prefix><item>:1 ...`` per row of histories (empty string for an empty history)."""
    out = []
    for row in hist:
        items = row[row >= 0]
        out.append("".join(f" {HIST_FIELD}:{prefix}{i}:1" for i in items))
    return out
