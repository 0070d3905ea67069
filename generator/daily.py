"""A two-day scenario for daily incremental training: day 2 drifts.

Day 1 shows only the "old" items. On day 2 a share of traffic goes to items never
seen before (new ids that join the item table), the overall click rate shifts
(the click intercept moves by ``ctr_shift`` in logit), and a subset of old items
changes appeal (their first-order weight is redrawn). Everything else, the
field-aware interactions, position bias and the conversion model, is the
planted model of ``generator.clicklog``.

Outputs ``<out>/day1`` and ``<out>/day2``, each a ``generator.clicklog`` data
set (train/eval libffm, items.tsv, field_map.tsv, truth.json), plus
``<out>/day2/eval_day1_items.libffm``: day-2 impressions of old items only,
the set on which a warm-started model must not forget what it learnt on day 1.

    python -m generator.daily --out data/days
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np

from generator.clicklog import GeneratorConfig, PlantedModel, _format_lines, bayes_metrics, write_dataset


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """How day 2 differs from day 1.

    Attributes:
      new_item_fraction: share of item ids that appear only from day 2 on.
      new_item_traffic: share of day-2 impressions that show a new item.
      ctr_shift: added to the click logit on day 2.
      changed_item_fraction: share of old items whose weight is redrawn on day 2.
    """

    new_item_fraction: float = 0.25
    new_item_traffic: float = 0.35
    ctr_shift: float = 0.3
    changed_item_fraction: float = 0.1


def _restrict(p: np.ndarray, mask: np.ndarray) -> np.ndarray:
    q = np.where(mask, p, 0.0)
    return q / q.sum()


def generate_days(out_dir: str, cfg: GeneratorConfig = GeneratorConfig(), drift: DriftConfig = DriftConfig(),
                  formats=("libffm",)) -> dict:
    """Writes day1/ and day2/ data sets; returns {"day1": truth, "day2": truth}."""
    model = PlantedModel(cfg)
    rng = np.random.default_rng(cfg.seed + 100)
    new_items = rng.random(cfg.n_items) < drift.new_item_fraction
    base_freq = model.freq["item"].copy()

    model.freq["item"] = _restrict(base_freq, ~new_items)
    day1 = {"train": model.sample(cfg.n_train, rng), "eval": model.sample(cfg.n_eval, rng)}
    truth1 = write_dataset(os.path.join(out_dir, "day1"), model, day1, formats,
                           {"new_items_day2": int(new_items.sum())})

    model.freq["item"] = (drift.new_item_traffic * _restrict(base_freq, new_items)
                          + (1 - drift.new_item_traffic) * _restrict(base_freq, ~new_items))
    model.b_click += drift.ctr_shift
    changed = (~new_items) & (rng.random(cfg.n_items) < drift.changed_item_fraction)
    model.w["item"] = np.where(changed, rng.normal(0, 0.3, cfg.n_items), model.w["item"])
    day2 = {"train": model.sample(cfg.n_train, rng), "eval": model.sample(cfg.n_eval, rng)}
    old_only = ~new_items[day2["eval"]["item"]]
    day2_old = {k: v[old_only] for k, v in day2["eval"].items()}
    day2_dir = os.path.join(out_dir, "day2")
    truth2 = write_dataset(day2_dir, model, day2, formats,
                           {"drift": dataclasses.asdict(drift), "changed_items": int(changed.sum()),
                            "bayes_eval_day1_items": bayes_metrics(day2_old)})
    with open(os.path.join(day2_dir, "eval_day1_items.libffm"), "w", encoding="utf-8") as f:
        f.write("\n".join(_format_lines(day2_old, with_fields=True)) + "\n")
    return {"day1": truth1, "day2": truth2}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=GeneratorConfig.n_train)
    p.add_argument("--n-eval", type=int, default=GeneratorConfig.n_eval)
    p.add_argument("--seed", type=int, default=GeneratorConfig.seed)
    args = p.parse_args(argv)
    cfg = dataclasses.replace(GeneratorConfig(), n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    truth = generate_days(args.out, cfg)
    for day in ("day1", "day2"):
        b = truth[day]["bayes"]["eval"]["click"]
        print(f"{day}: eval CTR {b['positive_rate']:.4f}, Bayes click AUC {b['auc']:.4f}")


if __name__ == "__main__":
    main()
