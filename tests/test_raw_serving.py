"""Every eval line sent as a raw Example over real gRPC scores as the in-process model on its ETL record.

Three logs: the generated one (item table joined in the graph, binned price, missing fields, unseen
keys), a libffm file with integer field ids and in-line numbers (numeric and zero-inflated binned
fields, multi-hot keys with values), and Frappe (libfm with the field map the export carries).
Records are not in line order, so the check is on the sorted scores of all lines, and on the AUC
the client computes from the lines' labels against the trainer's metrics.json.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from etl.config import EtlConfig, FieldConfig
from export import exporter
from feature_schema import load_schema
from serving import client as client_lib
from serving import server
from trainer import config as config_lib
from trainer import train as trainer_lib

FRAPPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "frappe")


def _run_etl(cfg):
    import apache_beam as beam

    from etl import pipeline

    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, cfg)
    return pipeline.write_schema(cfg)


def _train_export(etl_dir, tmp, model="fm", name="m", learning_rate=0.001, **train):
    run = str(tmp / f"run-{name}")
    trainer_lib.train(config_lib.resolve(overrides={
        "data": {"path": etl_dir, "batch_size": 512}, "model": {"name": model}, "run_dir": run,
        "optimizer": {"learning_rate": learning_rate}, "train": {"epochs": 1, "verbose": 0, "report": False, **train}}))
    version, _ = exporter.export(run, str(tmp / "export"), name)
    return run, version


def _serve_all_lines(version_dir, name, raw_eval, run_dir, etl_dir):
    """Scores every line of ``raw_eval`` over gRPC; checks it against the in-process model."""
    manager = server.ModelManager(server.single_model_config(name, os.path.dirname(version_dir)),
                                  session_config=server.session_config())
    srv = server.Server(manager, port=0)
    srv.start()
    try:
        with client_lib.ServingClient(srv.target, name, timeout_s=120) as c:
            with open(raw_eval, "rb") as f:
                lines = f.read().splitlines()
            schema = client_lib._load_schema(version_dir)
            field_map = client_lib._field_map(version_dir, "") if schema.format == "libfm" else None
            pred, labels = client_lib.score_lines(c, lines, schema.format, schema, field_map, splits=2)
    finally:
        srv.stop()
    schema = load_schema(etl_dir)
    task = schema.label_names[0]
    _, _, model = trainer_lib.load_trained(run_dir)
    records = exporter.eval_examples(schema, 10 ** 7)
    want = exporter.in_process_predict(model, schema, records, 4096)[task]
    got = pred.outputs[task]
    assert len(got) == len(lines) == len(records)
    assert np.max(np.abs(np.sort(got) - np.sort(want))) <= 1e-5
    with open(os.path.join(run_dir, "metrics.json")) as f:
        trained = json.load(f)[task]
    (row,) = [r for r in client_lib.report(pred, labels, schema) if r.startswith(task)]
    assert f"AUC {trained['auc']:.4f}" in row, (row, trained)
    return got


def test_generated_log(served_export, tiny_raw, tiny_etl):
    _serve_all_lines(served_export["versions"][2], "ctr", os.path.join(tiny_raw[0], "eval.libffm"),
                     served_export["runs"]["fm"], tiny_etl)


def _int_id_log(path, n, seed):
    """libffm lines with integer field ids: 0 user, 1 device (categorical), 2 age (numeric), 3 income
    (binned, 60% zeros), 4 tags (multi-hot, values 0.5-2); the click depends on all of them."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            user, device = rng.integers(50), rng.integers(4)
            age = float(rng.integers(18, 70))
            income = 0.0 if rng.random() < 0.6 else float(np.round(rng.lognormal(10, 1), 2))
            tags = rng.choice(8, size=rng.integers(0, 3), replace=False)
            vals = np.round(rng.uniform(0.5, 2.0, len(tags)), 2)
            logit = (user % 5 - 2) * 0.6 + 0.04 * (age - 40) + 0.8 * (income > 0) + sum(
                v * (0.5 if t < 4 else -0.5) for t, v in zip(tags, vals)) + (device == 1) * 0.5
            y = int(rng.random() < 1 / (1 + np.exp(-logit)))
            toks = [f"0:u{user}:1", f"1:d{device}:1", f"2:age:{age:g}", f"3:income:{income:g}"]
            toks += [f"4:t{t}:{v:g}" for t, v in zip(tags, vals)]
            f.write(f"{y} " + " ".join(toks) + "\n")


def test_libffm_integer_field_ids_with_numbers(tmp_path):
    train, evalf = str(tmp_path / "train.libffm"), str(tmp_path / "eval.libffm")
    _int_id_log(train, 6000, 1)
    _int_id_log(evalf, 2000, 2)
    etl_dir = str(tmp_path / "etl")
    schema = _run_etl(EtlConfig(
        input=train, eval_input=evalf, format="libffm", field_ids="index", out=etl_dir, min_count=2, num_shards=2,
        fields=(FieldConfig("user"), FieldConfig("device"), FieldConfig("age", kind="numeric"),
                FieldConfig("income", kind="binned", num_bins=5), FieldConfig("tags", multi_hot=True))))
    assert schema.field_index == ("user", "device", "age", "income", "tags")
    run, version = _train_export(etl_dir, tmp_path, model="fm", name="intid", learning_rate=0.05, epochs=3)
    scores = _serve_all_lines(version, "intid", evalf, run, etl_dir)
    assert np.std(scores) > 0.01  # the numbers and tags move the scores


@pytest.mark.slow  # about 90 s
@pytest.mark.skipif(not os.path.isdir(FRAPPE), reason="../shared/data/frappe not present")
def test_frappe(tmp_path):
    etl_dir = str(tmp_path / "etl")
    _run_etl(EtlConfig(input=os.path.join(FRAPPE, "frappe.validation.libfm"),
                       eval_input=os.path.join(FRAPPE, "frappe.test.libfm"), format="libfm",
                       field_map=os.path.join(FRAPPE, "frappe.fields.tsv"), out=etl_dir, num_shards=2))
    run, version = _train_export(etl_dir, tmp_path, model="fm", name="frappe")
    assert os.path.exists(os.path.join(version, "assets.extra", "field_map.tsv"))
    _serve_all_lines(version, "frappe", os.path.join(FRAPPE, "frappe.test.libfm"), run, etl_dir)
