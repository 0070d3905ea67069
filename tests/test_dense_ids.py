"""``data.dense_ids``: DeepFM trained on the featurization layer's dense layout learns what it learns on
the sparse layout, and exports with the same signatures: the TF Serving loader's outputs (raw
Examples, rank, hashed records) equal the in-process model on dense-layout batches."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from export import exporter
from feature_schema import configs, load_schema
from featurization import Featurizer
from serving import protocol
from serving.examples import ExampleBuilder
from trainer import config as config_lib
from trainer import data
from trainer import train as trainer_lib

from conftest import tf1_run

N = 2000  # eval records compared
N_EVAL = 4000  # the tiny log's eval split


def _deepfm(tiny_etl, run_dir, base, dense):
    return config_lib.resolve("generated_fm", overrides={
        "model": {"name": "deepfm", "embedding_dim": 4, "hidden_units": [16], "l2_embedding": 1e-4,
                  "l2_linear": 1e-4},
        "data": {"path": tiny_etl, "batch_size": 512, "dense_ids": dense}, "run_dir": run_dir,
        "export_base": base, "train": {"epochs": 1, "verbose": 0}})


@pytest.fixture(scope="module")
def runs(tiny_etl, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("export-dense"))
    out = {}
    for dense in (True, False):
        run = str(tmp_path_factory.mktemp(f"run-dense-{dense}"))
        trainer_lib.train(_deepfm(tiny_etl, run, base, dense))
        out[dense] = run
    version, check = exporter.export(out[True], base, "dfm_dense")
    return {"runs": out, "version": version, "check": check}


def _dense_predict(model, schema, records):
    fz = Featurizer(schema)
    out = []
    for start in range(0, len(records), 1024):
        feats, _, _ = data.parse_batch(tf.constant(records[start:start + 1024]), schema, fz, dense=True)
        assert feats["ids"].dense_shape.numpy()[1] == 0 and feats["dense_ids"].shape[1] == schema.num_fields
        out.append(model(feats, training=False)["click"].numpy())
    return np.concatenate(out)


def test_training_on_the_dense_layout_learns_the_same_model(runs, tiny_etl):
    """Same seed, same example order, same features: after an epoch both layouts' models agree
    (up to float summation order)."""
    schema = load_schema(tiny_etl)
    records = exporter.eval_examples(schema, N)
    dense_model = trainer_lib.load_trained(runs["runs"][True])[2]
    sparse_model = trainer_lib.load_trained(runs["runs"][False])[2]
    want = exporter.in_process_predict(sparse_model, schema, records, 1024)["click"]
    got = _dense_predict(dense_model, schema, records)
    assert np.max(np.abs(got - want)) <= 1e-4
    assert np.std(want) > 1e-3  # the models learned something that varies by example


def test_export_of_a_dense_trained_model_serves_what_it_predicts_on_dense_batches(runs, tiny_etl, tiny_raw):
    schema = load_schema(tiny_etl)
    check = runs["check"]  # the exporter's TF Serving check (sparse layout in the graph), every signature
    assert {"serving_default", "rank", "predict_hashed"} <= set(check["per_signature"]), check
    assert check["max_abs_diff"] <= exporter.MAX_ABS_DIFF
    records = exporter.eval_examples(schema, N_EVAL)
    model = trainer_lib.load_trained(runs["runs"][True])[2]
    want = _dense_predict(model, schema, records)
    served = tf1_run(runs["version"], {protocol.EXAMPLES_INPUT: np.array(records, object)}, "predict_hashed")
    assert np.max(np.abs(served["click"] - want)) <= 1e-5
    # Every eval line sent raw scores as its record does on the dense layout (records are not in line
    # order: the sorted scores of all lines agree).
    builder = ExampleBuilder(schema)
    with open(os.path.join(tiny_raw[0], "eval.libffm"), "rb") as f:
        raw = [builder.line_example(line)[1] for line in f.read().splitlines()]
    served_raw = tf1_run(runs["version"], {protocol.EXAMPLES_INPUT: np.array(raw, object)})["click"]
    assert served_raw.shape == want.shape
    assert np.max(np.abs(np.sort(served_raw) - np.sort(want))) <= 1e-5


def _held(n):
    """featurized_split's structure for n examples: example i has ids [i, 100 + i], label i % 2."""
    i = np.arange(n, dtype=np.int64)
    features = {"dense_ids": tf.constant(np.stack([i, 100 + i], 1)), "dense_values": tf.ones([n, 2]),
                "dense_fields": tf.constant(np.tile([[0, 1]], [n, 1]), tf.int64)}
    return features, {"click": tf.constant(i % 2, tf.float32)}, tf.ones([n])


def _passes(ds, n_batches):
    it = iter(ds)
    return [next(it)[0]["dense_ids"].numpy()[:, 0] for _ in range(n_batches)]


def test_in_memory_dataset_permutes_every_pass_and_keeps_the_layout():
    ds = data.in_memory_dataset(_held(10), 4, shuffle=True, seed=3, repeat=True)
    got = _passes(ds, 6)  # two passes of batches 4, 4, 2
    assert [len(b) for b in got] == [4, 4, 2] * 2
    first, second = np.concatenate(got[:3]), np.concatenate(got[3:])
    assert sorted(first) == sorted(second) == list(range(10))  # every example once per pass
    assert first.tolist() != second.tolist()  # a fresh permutation per pass
    again = np.concatenate(_passes(data.in_memory_dataset(_held(10), 4, shuffle=True, seed=3, repeat=True), 3))
    assert again.tolist() == first.tolist()  # the seed fixes the order
    features, labels, _ = next(iter(ds))
    ids = features["dense_ids"].numpy()
    assert (ids[:, 1] == ids[:, 0] + 100).all() and (labels["click"].numpy() == ids[:, 0] % 2).all()
    assert features["ids"].dense_shape.numpy().tolist() == [4, 0]  # the empty sparse part
    # Without shuffling: file order; drop_remainder drops the partial batch; without repeat a new
    # iteration (Keras' next epoch) is a new permutation.
    assert np.concatenate(_passes(data.in_memory_dataset(_held(10), 4, shuffle=False), 3)).tolist() == list(range(10))
    assert [len(b[2]) for b in data.in_memory_dataset(_held(10), 4, False, drop_remainder=True)] == [4, 4]
    once = data.in_memory_dataset(_held(10), 10, shuffle=True, seed=3)
    assert [b[0]["dense_ids"].numpy()[:, 0].tolist() for b in once] != [b[0]["dense_ids"].numpy()[:, 0].tolist()
                                                                          for b in once]


def test_featurize_once_holds_the_dense_layout_of_every_record(tiny_etl):
    schema = load_schema(tiny_etl)
    features, labels, weights = data.featurized_split(schema, "eval", sorted(
        p for pattern in schema.split_files("eval") for p in tf.io.gfile.glob(pattern)))
    assert features["dense_ids"].shape == (N_EVAL, schema.num_fields) and weights.shape == (N_EVAL,)
    want, want_labels, _ = data.parse_batch(tf.constant(exporter.eval_examples(schema, N_EVAL)), schema, dense=True)

    def rows(f, lab):  # the records in a canonical order (the files are read interleaved)
        keys = ("dense_ids", "dense_values", "dense_fields")
        return sorted(zip(*(f[k].numpy().tolist() for k in keys), lab[schema.label_names[0]].numpy().tolist()))

    assert rows(features, labels) == rows(want, want_labels)
    ds = data.make_dataset(schema, "eval", 1000, shuffle_buffer=1, seed=1, featurize_once=True)
    assert sum(int(w.shape[0]) for _, _, w in ds) == N_EVAL


N_TRAIN = 12_000  # the tiny log's train split (conftest.TINY)


def test_featurize_once_auto_holds_a_split_that_qualifies_and_fits(tiny_etl):
    schema = load_schema(tiny_etl)
    # 9 single-valued fields x (8 + 4 + 8 bytes) + weight and two labels x 4 bytes = 192 bytes per example.
    assert data.featurized_bytes(schema, "train") == N_TRAIN * 192
    assert data.featurize_once_fits(schema, "train", N_TRAIN * 192)
    assert not data.featurize_once_fits(schema, "train", N_TRAIN * 192 - 1)
    multi = dataclasses.replace(schema, fields=tuple(dataclasses.replace(f, multi_hot=f.name == "query")
                                                     for f in schema.fields))
    assert not data.featurize_once_fits(multi, "train", 1 << 30)
    assert not data.featurize_once_fits(dataclasses.replace(schema, fill_missing=False), "train", 1 << 30)

    def once(value, files=None, budget=1 << 30):
        cfg = config_lib.resolve("", overrides={"data": {"path": tiny_etl, "featurize_once": value,
                                                         "featurize_once_max_bytes": budget}})
        return trainer_lib.featurizes_once(cfg, schema, files)

    assert once(None) and not once(None, budget=1000) and not once(False) and once(True, budget=0)
    assert not once(None, files=["a worker's shard"])  # a parameter-server worker builds its input in a graph
    assert config_lib.resolve("", overrides={"data": {}}).data.featurize_once is False  # off unless asked
    with pytest.raises(ValueError, match="featurize_once_max_bytes"):
        config_lib.resolve("", overrides={"data": {"featurize_once_max_bytes": -1}})


def _rows(features, labels):
    """Each example as a tuple (its dense rows, values, click label): a multiset key of the example."""
    ids, vals = features["dense_ids"].numpy(), features["dense_values"].numpy()
    return [(*i, *np.round(v, 5), c) for i, v, c in zip(ids.tolist(), vals.tolist(), labels["click"].numpy().tolist())]


def test_featurize_once_training_input_reshuffles_every_epoch_and_holds_the_pipelines_examples(tiny_etl):
    """Through ``train_dataset`` (what ``train`` fits on, auto on): every Keras epoch of ceil(12,000 / 1024)
    = 12 steps sees each training example exactly once, in another order than the epoch before, and
    the same examples the pipeline parses every epoch."""
    schema = load_schema(tiny_etl)
    cfg = config_lib.resolve("", overrides={"data": {"path": tiny_etl, "batch_size": 1024, "featurize_once": None}})
    assert trainer_lib.steps_per_epoch(cfg, schema) == 12
    it = iter(trainer_lib.train_dataset(cfg, schema, ("click",), repeat=True))
    epochs = []
    for _ in range(2):
        batches = [next(it) for _ in range(12)]
        assert [int(b[2]["click"].shape[0]) for b in batches] == [1024] * 11 + [N_TRAIN - 11 * 1024]
        epochs.append([r for f, y, _ in batches for r in _rows(f, y)])
    pipeline = data.make_dataset(schema, "train", 4096, dense_ids=True)
    parsed = sorted(r for f, y, _ in pipeline for r in _rows(f, y))
    assert len(parsed) == N_TRAIN
    assert sorted(epochs[0]) == sorted(epochs[1]) == parsed  # every example once per epoch
    assert epochs[0] != epochs[1]  # a fresh permutation per epoch
    again = iter(trainer_lib.train_dataset(cfg, schema, ("click",), repeat=True))
    assert [r for _ in range(12) for f, y, _ in [next(again)] for r in _rows(f, y)] == epochs[0]  # the seed fixes it


def test_a_model_trained_on_the_split_featurized_once_learns_as_much_and_exports(runs, tiny_etl, tmp_path):
    """One epoch held in memory (auto) against one epoch of the pipeline (the ``runs`` fixture's dense
    run, same seed, another example order): eval AUC within 0.01 and logloss within 0.005 (one epoch on
    the tiny log reaches AUC ~0.54), and the exporter's TF Serving check passes."""
    cfg = _deepfm(tiny_etl, str(tmp_path / "run"), str(tmp_path / "export"), True)
    cfg = config_lib.resolve("generated_fm", overrides={**configs.to_dict(cfg), "data": {
        **configs.to_dict(cfg)["data"], "featurize_once": None}})
    assert trainer_lib.featurizes_once(cfg, load_schema(tiny_etl))
    got = trainer_lib.train(cfg)["click"]
    with open(os.path.join(runs["runs"][True], "metrics.json")) as f:
        want = json.load(f)["click"]
    assert abs(got["auc"] - want["auc"]) <= 0.01 and abs(got["logloss"] - want["logloss"]) <= 0.005, (got, want)
    assert got["auc"] > 0.5
    _, check = exporter.export(cfg.run_dir, cfg.export_base, "dfm_once")
    assert {"serving_default", "rank", "predict_hashed"} <= set(check["per_signature"]), check
    assert check["max_abs_diff"] <= exporter.MAX_ABS_DIFF
