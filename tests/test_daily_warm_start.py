"""Daily incremental training on a generated two-day scenario (day 2: new items, shifted CTRs).

The day-2 ETL extends day 1's vocabulary; the warm-started day-2 model must beat
a cold-started one trained for the same number of steps, and must not forget
day-1 items: on day-2 impressions of items already known on day 1 its AUC stays
within 0.01 of (or above) what yesterday's served model achieves there.
"""
from __future__ import annotations

import dataclasses
import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf

from etl import pipeline
from export import exporter
from feature_schema import feature_hash, load_schema, metrics
from generator.clicklog import GeneratorConfig
from generator.daily import generate_days
from tests.conftest import generated_etl_config
from trainer import config as config_lib
from trainer import train as trainer_lib

DAYS = GeneratorConfig(n_train=30_000, n_eval=8_000, n_users=400, n_items=300, n_queries=80, n_categories=12,
                       n_brands=40, seed=21)


def _etl(raw, out, **overrides):
    cfg = generated_etl_config(raw, out, **overrides)
    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, cfg)
    return pipeline.write_schema(cfg)


def _train(data, run_dir, warm=""):
    return trainer_lib.train(config_lib.resolve("generated_fm", overrides={
        "data": {"path": data, "batch_size": 256}, "run_dir": run_dir,
        "train": {"epochs": 1, "verbose": 0, "warm_start": warm, "report": False}}))


@pytest.mark.slow
def test_warm_start_beats_cold_start_and_remembers_day1_items(tmp_path):
    truth = generate_days(str(tmp_path / "raw"), DAYS)
    day1 = _etl(str(tmp_path / "raw" / "day1"), str(tmp_path / "etl1"))
    day2 = _etl(str(tmp_path / "raw" / "day2"), str(tmp_path / "etl2"), vocabulary=str(tmp_path / "etl1"),
                vocabulary_mode="extend")
    # Extend mode: every feature with a day-1 row still has one on day 2.
    assert day2.num_features > day1.num_features

    run1 = str(tmp_path / "run1")
    trainer_lib.train(config_lib.resolve("generated_fm", overrides={
        "data": {"path": day1.base_dir, "batch_size": 256}, "run_dir": run1,
        "train": {"epochs": 3, "verbose": 0, "report": False}}))
    yesterday, _ = exporter.export(run1, str(tmp_path / "export"), "ctr", verify_examples=1000)

    cold = _train(day2.base_dir, str(tmp_path / "cold"))["click"]["auc"]
    warm = _train(day2.base_dir, str(tmp_path / "warm"), warm=run1)["click"]["auc"]
    assert warm > cold, (warm, cold)

    # Day-2 eval impressions of items known on day 1.
    day1_items = {line.split()[2].split(":")[1]
                  for line in open(tmp_path / "raw" / "day1" / "train.libffm", encoding="utf-8")}
    old_hashes = {feature_hash("item", key) for key in day1_items}
    schema2 = load_schema(day2.base_dir)
    examples = exporter.eval_examples(schema2, 100_000)
    parsed = [tf.train.Example.FromString(e).features.feature for e in examples]
    old = np.array([any(h in old_hashes for h in f["feat_hashes"].int64_list.value) for f in parsed])
    labels = np.array([f["click"].float_list.value[0] for f in parsed])
    assert 0.3 < old.mean() < 0.95

    _, _, warm_model = trainer_lib.load_trained(str(tmp_path / "warm"))
    warm_p = exporter.in_process_predict(warm_model, schema2, examples, 2048)["click"]
    served_p = exporter.session_predict(yesterday, examples)["click"]  # yesterday's model, its own vocabulary
    warm_old = metrics.auc(labels[old], warm_p[old])
    yesterday_old = metrics.auc(labels[old], served_p[old])
    figures = {"cold_day2_auc": cold, "warm_day2_auc": warm, "warm_auc_day1_items": warm_old,
               "day1_model_auc_day1_items": yesterday_old,
               "bayes_day2_auc": truth["day2"]["bayes"]["eval"]["click"]["auc"]}
    print("daily warm start: " + json.dumps(figures))
    with open(os.path.join(os.environ.get("DAILY_FIGURES_DIR", str(tmp_path)), "daily_warm_start.json"), "w") as f:
        json.dump({"generator": dataclasses.asdict(DAYS), **figures}, f, indent=2)
    assert warm_old >= yesterday_old - 0.01, figures
