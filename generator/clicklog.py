"""Click logs with planted structure, deterministic by seed.

The planted click model is a field-aware factorization machine (Juan et al.,
"Field-aware Factorization Machines for CTR Prediction", RecSys 2016) plus a
position-bias term:

    logit P(click) = b + sum_f w_f[x_f] + pos[p] + sum_{(f,g) in PAIRS} <V_{f,g}[x_f], V_{g,f}[x_g]>

where ``V_{f,g}[x]`` is the latent vector of feature ``x`` of field ``f`` seen
by field ``g``. Conversions are drawn only after a click, from a second model
that ignores position:

    logit P(conversion | click) = c + u[user] + i[item] + br[brand] + price_w * z(log price) + <U[user], B[brand]>

User, item and query frequencies are Zipf-like, so many ids are rare and the
category/brand/price joined from the item table carry their signal. Scoring the
eval file with these planted probabilities gives the Bayes-optimal AUC and
logloss reported in ``truth.json``.

Outputs (in ``out_dir``):
  train.libffm, eval.libffm: ``click,conversion field:key:value ...`` lines with
    fields user, item, position, hour, device, query.
  train.libfm, eval.libfm (``formats`` includes libfm): the same lines without fields.
  field_map.tsv: feature key -> field (the dictionary for libfm input).
  items.tsv: item -> category, brand, price (the entity table the ETL joins).
  truth.json: the generator config, rates and Bayes-optimal metrics.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

from feature_schema import metrics

LOG_FIELDS = ("user", "item", "position", "hour", "device", "query")
ITEM_FIELDS = ("category", "brand", "price")
KEY_PREFIX = {"user": "u", "item": "i", "position": "p", "hour": "h", "device": "d", "query": "q",
              "category": "c", "brand": "b"}
# Field pairs with a planted field-aware interaction.
PAIRS = (("user", "item"), ("user", "category"), ("query", "category"), ("query", "brand"),
         ("hour", "device"), ("device", "category"), ("user", "brand"), ("hour", "category"))


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Sizes and rates of the generated log.

    Attributes:
      n_train, n_eval: impressions in the train and eval files.
      n_users, n_items, n_queries, n_categories, n_brands: cardinalities.
      n_positions: ad slots; position 1 is the top.
      k: latent dimension of the planted interactions.
      interaction_scale: standard deviation of each planted pairwise term.
      zipf_exponent: exponent of the Zipf-like id frequencies.
      ctr, cvr: target mean click rate and mean conversion rate after a click.
      conversion_click_share: correlation rho between the conversion model's user, item and brand
        effects (and its user x brand latent vectors) and the click model's: each is
        ``rho * (click effect, rescaled) + sqrt(1 - rho^2) * (independent effect)``. Users and items
        that attract clicks also tend to convert, the shared structure that lets a model trained on
        all impressions (ESMM) learn conversion from click data; position stays out of conversions.
      seed: random seed; equal seeds give byte-identical files.

    The defaults are what ``make etl`` generates and what the README figures and most tests use;
    ``PRESETS`` holds named overrides for the quality measurements (``GeneratorConfig.preset``).
    """

    n_train: int = 80_000
    n_eval: int = 20_000
    n_users: int = 3_000
    n_items: int = 2_000
    n_queries: int = 400
    n_categories: int = 25
    n_brands: int = 120
    n_positions: int = 5
    n_hours: int = 24
    n_devices: int = 4
    k: int = 4
    interaction_scale: float = 0.6
    zipf_exponent: float = 1.1
    conversion_click_share: float = 0.0
    ctr: float = 0.12
    cvr: float = 0.2
    seed: int = 7

    @classmethod
    def preset(cls, name: str, **overrides) -> "GeneratorConfig":
        """The named preset from ``PRESETS`` with ``overrides`` on top (unknown fields are errors)."""
        if name not in PRESETS:
            raise ValueError(f"unknown generator preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Named overrides of the defaults (``--preset NAME``; explicit field flags still win).
PRESETS: dict[str, dict] = {
    # Click quality against the planted model: the planted click model is an FFM over 8 of the 28
    # field pairs, and a learner that does not know which pairs are real needs about 1M impressions
    # to come within 0.01 AUC of the Bayes-optimal scores (80k over 3,000 users and 2,000 items left
    # FFM 0.08 short; 300k over 200 users 0.017; 1M 0.007). The cardinalities stay Zipf-tailed but
    # are learnable at that size.
    "quality": {"n_train": 1_000_000, "n_eval": 50_000, "n_users": 200, "n_items": 120,
                "n_queries": 60, "n_brands": 40},
    # ESMM against a CVR model trained on clicked impressions only. ESMM's pCVR shares embeddings
    # with a click task trained on every impression, and its advantage is where conversion shares
    # the click model's user/item/brand structure (conversion_click_share = 1) and conversions are
    # rare (300k impressions: 36k clicks, 2.5k conversions) while clicks are dense enough for a
    # good pCTR: ESMM's pCVR = pCTCVR / pCTR inherits pCTR's errors. See
    # tests/test_training_quality.py::test_esmm_beats_clicked_only_cvr_over_all_impressions.
    "esmm": {"n_train": 300_000, "n_eval": 50_000, "n_users": 200, "n_items": 120, "n_queries": 60,
             "n_brands": 40, "conversion_click_share": 1.0, "cvr": 0.05},
}


def _zipf_probs(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    p = p[rng.permutation(n)]  # ids are not sorted by popularity
    return p / p.sum()


def _fit_intercept(logits: np.ndarray, target: float) -> float:
    """Intercept b with mean(sigmoid(logits + b)) == target (bisection)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(_sigmoid(logits + mid)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class PlantedModel:
    """The planted parameters and the sampler of impressions."""

    def __init__(self, cfg: GeneratorConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.card = {"user": cfg.n_users, "item": cfg.n_items, "position": cfg.n_positions,
                     "hour": cfg.n_hours, "device": cfg.n_devices, "query": cfg.n_queries,
                     "category": cfg.n_categories, "brand": cfg.n_brands}
        # Entity table: every item has one category, one brand and a price.
        self.item_category = rng.integers(0, cfg.n_categories, cfg.n_items)
        self.item_brand = rng.integers(0, cfg.n_brands, cfg.n_items)
        self.item_price = np.round(np.exp(rng.normal(3.0, 1.0, cfg.n_items)), 2)
        # Frequencies.
        self.freq = {f: _zipf_probs(self.card[f], cfg.zipf_exponent, rng)
                     for f in ("user", "item", "query")}
        self.freq["hour"] = _sigmoid(np.sin(np.arange(cfg.n_hours) / 24 * 2 * np.pi) + 0.5)
        self.freq["hour"] /= self.freq["hour"].sum()
        self.freq["device"] = np.array([0.55, 0.3, 0.1, 0.05])[: cfg.n_devices]
        self.freq["device"] /= self.freq["device"].sum()
        # Click model.
        self.w = {f: rng.normal(0, 0.3, self.card[f]) for f in self.card if f != "position"}
        self.position_bias = -0.45 * np.arange(cfg.n_positions)  # top slot clicked most
        # <a, b> of two k-dim N(0, s^2) vectors has std sqrt(k) s^2 = interaction_scale.
        s = np.sqrt(cfg.interaction_scale / np.sqrt(cfg.k))
        self.v = {}
        for f, g in PAIRS:
            self.v[(f, g)] = rng.normal(0, s, (self.card[f], cfg.k))
            self.v[(g, f)] = rng.normal(0, s, (self.card[g], cfg.k))
        self.price_w = np.array([0.0, 0.25, 0.35, 0.1, -0.3])  # by price quintile: mid prices click best
        self.price_edges = np.quantile(self.item_price, [0.2, 0.4, 0.6, 0.8])
        # Conversion model (ignores position).
        self.cv_user = rng.normal(0, 0.4, cfg.n_users)
        self.cv_item = rng.normal(0, 0.4, cfg.n_items)
        self.cv_brand = rng.normal(0, 0.5, cfg.n_brands)
        self.cv_u = rng.normal(0, 0.5, (cfg.n_users, cfg.k))
        self.cv_b = rng.normal(0, 0.5, (cfg.n_brands, cfg.k))
        rho = cfg.conversion_click_share
        if not -1.0 <= rho <= 1.0:
            raise ValueError(f"conversion_click_share must be in [-1, 1], got {rho}")
        if rho:  # mix in the click model's effects, each rescaled to the conversion effect's scale
            mix = lambda click, own: rho * click * (own.std() / click.std()) + np.sqrt(1 - rho ** 2) * own  # noqa: E731
            self.cv_user = mix(self.w["user"], self.cv_user)
            self.cv_item = mix(self.w["item"], self.cv_item)
            self.cv_brand = mix(self.w["brand"], self.cv_brand)
            self.cv_u = mix(self.v[("user", "brand")], self.cv_u)
            self.cv_b = mix(self.v[("brand", "user")], self.cv_b)
        logp = np.log(self.item_price)
        self.z_price = (logp - logp.mean()) / logp.std()
        self.b_click = 0.0
        self.b_conv = 0.0
        calib = self.sample(200_000, rng=np.random.default_rng(cfg.seed + 1))
        self.b_click = _fit_intercept(calib["click_logit"], cfg.ctr)
        self.b_conv = _fit_intercept(calib["conv_logit"], cfg.cvr)
        self._rng = rng

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        cfg = self.cfg
        x = {f: rng.choice(self.card[f], size=n, p=self.freq[f]) for f in ("user", "item", "query", "hour", "device")}
        # Lower slots are shown less often.
        pos_p = 0.5 ** np.arange(cfg.n_positions)
        x["position"] = rng.choice(cfg.n_positions, size=n, p=pos_p / pos_p.sum())
        x["category"] = self.item_category[x["item"]]
        x["brand"] = self.item_brand[x["item"]]
        logit = np.full(n, self.b_click)
        for f, w in self.w.items():
            logit += w[x[f]]
        logit += self.position_bias[x["position"]]
        logit += self.price_w[np.searchsorted(self.price_edges, self.item_price[x["item"]], side="right")]
        for f, g in PAIRS:
            logit += np.sum(self.v[(f, g)][x[f]] * self.v[(g, f)][x[g]], axis=1)
        conv_logit = (self.b_conv + self.cv_user[x["user"]] + self.cv_item[x["item"]]
                      + self.cv_brand[x["brand"]] - 0.4 * self.z_price[x["item"]]
                      + np.sum(self.cv_u[x["user"]] * self.cv_b[x["brand"]], axis=1))
        x["click_logit"] = logit
        x["conv_logit"] = conv_logit
        x["p_click"] = _sigmoid(logit)
        x["p_cvr"] = _sigmoid(conv_logit)
        x["click"] = (rng.random(n) < x["p_click"]).astype(np.int64)
        # A conversion can only follow a click.
        x["conversion"] = x["click"] * (rng.random(n) < x["p_cvr"]).astype(np.int64)
        return x


    def item_click_logits(self, context: dict[str, np.ndarray], items=None, position: int = 0) -> np.ndarray:
        """Planted click logits of every (context row, item) pair, as ``sample`` computes them.

        Args:
          context: int arrays ``[n]`` of the fields that are not the item's: user, query, hour, device.
          items: item ids to score (default: every item).
          position: the slot (a constant shift of every logit: it changes no ranking).

        Returns:
          ``[n, len(items)]`` logits.
        """
        items = np.arange(self.cfg.n_items) if items is None else np.asarray(items)
        of_item = {"item": items, "category": self.item_category[items], "brand": self.item_brand[items]}
        n = len(next(iter(context.values())))
        row = np.full(n, self.b_click + self.position_bias[position])
        col = self.price_w[np.searchsorted(self.price_edges, self.item_price[items], side="right")]
        for f, w in self.w.items():
            if f in of_item:
                col = col + w[of_item[f]]
            else:
                row = row + w[context[f]]
        logits = row[:, None] + col[None, :]
        for f, g in PAIRS:
            a, b = self.v[(f, g)], self.v[(g, f)]
            if f in of_item and g in of_item:
                logits += np.sum(a[of_item[f]] * b[of_item[g]], axis=1)[None, :]
            elif f in of_item or g in of_item:
                (uf, u), (itf, it) = ((g, b), (f, a)) if f in of_item else ((f, a), (g, b))
                logits += u[context[uf]] @ it[of_item[itf]].T
            else:
                logits += np.sum(a[context[f]] * b[context[g]], axis=1)[:, None]
        return logits


def top_k_items(model: PlantedModel, context: dict[str, np.ndarray], k: int, items=None,
                item_weights=None) -> np.ndarray:
    """The planted model's ``k`` most clickable items for each context row (``[n, k]`` item ids, best first).

    Ranked by planted click probability, or by click probability x ``item_weights`` (e.g. each item's
    share of impressions: the items a user's next click most likely lands on).
    """
    items = np.arange(model.cfg.n_items) if items is None else np.asarray(items)
    logits = model.item_click_logits(context, items)
    score = logits if item_weights is None else _sigmoid(logits) * np.asarray(item_weights)[None, :]
    top = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return items[top]


def _format_lines(x: dict[str, np.ndarray], with_fields: bool) -> list[str]:
    n = len(x["click"])
    cols = []
    for f in LOG_FIELDS:
        prefix = KEY_PREFIX[f]
        keys = np.char.add(prefix, x[f].astype(str))
        cols.append(np.char.add(f + ":", keys) if with_fields else keys)
    labels = np.char.add(np.char.add(x["click"].astype(str), ","), x["conversion"].astype(str))
    out = []
    for i in range(n):
        out.append(labels[i] + " " + " ".join(c[i] + ":1" for c in cols))
    return out


def bayes_metrics(x: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Metrics of the planted probabilities: the best any model can do in expectation."""
    clicked = x["click"] == 1
    return {
        "click": metrics.binary_report(x["click"], x["p_click"]),
        # P(conversion) over all impressions = P(click) * P(conversion | click).
        "conversion": metrics.binary_report(x["conversion"], x["p_click"] * x["p_cvr"]),
        "cvr_given_click": metrics.binary_report(x["conversion"][clicked], x["p_cvr"][clicked]),
    }


def generate(out_dir: str, cfg: GeneratorConfig = GeneratorConfig(), formats=("libffm",)) -> dict:
    """Writes the log files, dictionaries and ``truth.json``; returns the truth dict."""
    model = PlantedModel(cfg)
    rng = model._rng
    splits = {"train": model.sample(cfg.n_train, rng), "eval": model.sample(cfg.n_eval, rng)}
    return write_dataset(out_dir, model, splits, formats)


def write_dataset(out_dir: str, model: PlantedModel, splits: dict, formats=("libffm",), extra_truth=None) -> dict:
    """Writes sampled splits as ``<split>.<format>``, the dictionaries and ``truth.json``."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.cfg
    for name, x in splits.items():
        for fmt in formats:
            if fmt not in ("libffm", "libfm"):
                raise ValueError(f"unknown format {fmt!r}")
            lines = _format_lines(x, with_fields=fmt == "libffm")
            with open(os.path.join(out_dir, f"{name}.{fmt}"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "field_map.tsv"), "w", encoding="utf-8") as f:
        f.write("feature\tfield\n")
        for field in LOG_FIELDS:
            for i in range(model.card[field]):
                f.write(f"{KEY_PREFIX[field]}{i}\t{field}\n")
    with open(os.path.join(out_dir, "items.tsv"), "w", encoding="utf-8") as f:
        f.write("item\tcategory\tbrand\tprice\n")
        for i in range(cfg.n_items):
            f.write(f"i{i}\tc{model.item_category[i]}\tb{model.item_brand[i]}\t{model.item_price[i]:.2f}\n")
    truth = {
        "config": dataclasses.asdict(cfg),
        "labels": ["click", "conversion"],
        "log_fields": list(LOG_FIELDS),
        "item_fields": list(ITEM_FIELDS),
        "linear_only_fields": ["position"],
        "intercepts": {"click": model.b_click, "conversion_given_click": model.b_conv},
        "position_bias": model.position_bias.tolist(),
        "bayes": {name: bayes_metrics(x) for name, x in splits.items()},
        **(extra_truth or {}),
    }
    with open(os.path.join(out_dir, "truth.json"), "w", encoding="utf-8") as f:
        json.dump(truth, f, indent=2)
    return truth


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--formats", default="libffm", help="comma list of libffm,libfm")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named overrides of the defaults (PRESETS)")
    for f in dataclasses.fields(GeneratorConfig):
        # default None: only the flags given override the preset (or the defaults).
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                       help=f"default {f.default}")
    args = p.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(GeneratorConfig)
             if getattr(args, f.name) is not None}
    cfg = GeneratorConfig.preset(args.preset, **given) if args.preset else GeneratorConfig(**given)
    truth = generate(args.out, cfg, formats=tuple(args.formats.split(",")))
    b = truth["bayes"]["eval"]
    print(f"generated {cfg.n_train} train + {cfg.n_eval} eval impressions in {args.out}; "
          f"eval CTR {b['click']['positive_rate']:.4f}, Bayes-optimal click AUC {b['click']['auc']:.4f} "
          f"logloss {b['click']['logloss']:.4f}")


if __name__ == "__main__":
    main()
