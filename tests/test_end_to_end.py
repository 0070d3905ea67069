"""Generator -> Beam ETL -> trainer -> export -> TF-Serving-style Session load, on a tiny log."""
from __future__ import annotations

import json
import os

import numpy as np

from export import exporter
from feature_schema import load_schema
from trainer import config as config_lib
from trainer import train as trainer_lib


def test_chain_learns_planted_structure_and_serves_identically(tiny_raw, tiny_etl, tmp_path):
    _, truth = tiny_raw
    run_dir = str(tmp_path / "run")
    export_base = str(tmp_path / "export")
    cfg = config_lib.resolve("generated_fm", overrides={
        "data": {"path": tiny_etl, "batch_size": 128}, "run_dir": run_dir, "export_base": export_base,
        "train": {"epochs": 3, "verbose": 0}})
    results = trainer_lib.train(cfg)

    # metrics.json is shaped {task: {auc, logloss, calibration}} for the eval split.
    with open(os.path.join(run_dir, "metrics.json")) as f:
        written = json.load(f)
    assert set(written) == {"click"}
    assert {"auc", "logloss", "calibration"} <= set(written["click"])

    # The model closes at least half of the gap between chance and the Bayes-optimal AUC,
    # measured on the same eval file the generator scored with the planted probabilities.
    bayes_auc = truth["bayes"]["eval"]["click"]["auc"]
    auc = results["click"]["auc"]
    assert auc - 0.5 >= 0.5 * (bayes_auc - 0.5), (auc, bayes_auc)
    assert results["click"]["logloss"] < truth["bayes"]["eval"]["click"]["logloss"] + 0.1

    # Export: TF Serving layout <base>/<model>/<integer version>/ with a SavedModel.
    path, check = exporter.export(run_dir)
    assert os.path.dirname(path) == os.path.join(export_base, "fm")
    assert os.path.basename(path).isdigit()
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert os.path.exists(os.path.join(path, "assets.extra", "schema.json"))
    assert not [d for d in os.listdir(os.path.join(export_base, "fm")) if d.startswith(".tmp")]

    # The Session-loaded SavedModel (tf.compat.v1 loader, tensors by name) returns the
    # in-process model's probabilities on every eval example.
    schema = load_schema(tiny_etl)
    examples = exporter.eval_examples(schema, 10_000)
    assert len(examples) == schema.splits["eval"]["examples"] == truth["config"]["n_eval"]
    served = exporter.session_predict(path, examples)
    _, _, model = trainer_lib.load_trained(run_dir)
    local = exporter.in_process_predict(model, schema, examples, 512)
    assert np.max(np.abs(served["click"] - local["click"])) <= 1e-5
    assert check["max_abs_diff"] <= 1e-5
    # And those probabilities are the ones behind the reported eval AUC.
    from trainer import metrics
    labels = np.array([_label(e, "click") for e in examples])
    assert abs(metrics.auc(labels, served["click"]) - auc) < 1e-6


def _label(serialized: bytes, name: str) -> float:
    import tensorflow as tf
    ex = tf.train.Example.FromString(serialized)
    return ex.features.feature[name].float_list.value[0]
