"""DIN against DeepFM with a mean-pooled history on the generator's ``behaviour`` preset. Slow (~4 min).

    .venv/bin/python -m pytest -m slow tests/test_behaviour_quality.py -s

Generates ``bench.quality_behaviour.GEN`` (the ``behaviour`` preset: 200k train, 50k eval impressions
with the users' last 20 clicks and a planted soft maximum of the candidate's similarity to them),
ETLs it with ``configs/etl_behaviour.yaml``, trains ``behaviour_din`` and ``behaviour_deepfm`` on one
seed and checks the bars of ``bench/quality_behaviour.py``, derived from ``truth.json``:

(a) DIN - DeepFM(mean-pooled) >= (Bayes AUC - best mean-pooled surrogate AUC) / 2;
(b) Bayes AUC - DIN <= 0.02.
"""
from __future__ import annotations

import json
import os

import pytest

from bench import generated_data
from bench import quality_behaviour as qb
from trainer import config as config_lib
from trainer import train as trainer_lib

pytestmark = pytest.mark.slow


def test_din_beats_mean_pooling_by_the_planted_margin_and_nears_bayes(tmp_path):
    raw, etl = generated_data.prepare(str(tmp_path), qb.GEN, qb.ETL_CONFIG)
    with open(os.path.join(raw, "truth.json"), encoding="utf-8") as f:
        truth = json.load(f)
    bayes = truth["bayes"]["eval"]["click"]["auc"]
    surrogate = truth["behaviour"]["bayes_mean_pooled_surrogate"]["eval"]["auc"]
    assert bayes - surrogate > 0.04  # the planted effect needs the history item by item
    rows = {}
    for name in ("din", "deepfm"):
        cfg = config_lib.resolve(f"behaviour_{name}", overrides={
            "data": {"path": etl}, "run_dir": str(tmp_path / name), "train": {"seed": 1, "report": False}})
        rows[name] = {"auc": {"mean": trainer_lib.train(cfg)["click"]["auc"]}}
    checks = qb.bars(rows, bayes, surrogate)
    print(json.dumps({"bayes": bayes, "surrogate": surrogate, "rows": rows, "bars": checks}, indent=2))
    a, b = checks["a_din_minus_deepfm"], checks["b_bayes_minus_din"]
    assert a["value"] >= (bayes - surrogate) / 2, a
    assert b["value"] <= 0.02, b
