"""MLR / LS-PLM: the layer against hand-computed values, save/load round trips, the ``mlr`` model through the
TF Serving loader."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from export import exporter
from feature_schema import load_schema
from tests.test_layers import BATCH, sparse_batch
from trainer import config as config_lib
from trainer import layers
from trainer import train as trainer_lib
from trainer.models.mlr import PiecewiseLogistic

# 4 features, m = 2 regions; feature 3 is the only feature of field 2.
U = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, -0.5], [9.0, 9.0]], np.float32)
W = np.array([[0.2, -0.1], [0.4, 0.3], [-0.3, 0.1], [7.0, 7.0]], np.float32)


def _plm(linear_only=(2,), l2=0.0):
    layer = PiecewiseLogistic(4, 2, linear_only_fields=linear_only, l2=l2)
    layer.build(None)
    layer.u.assign(U)
    layer.w.assign(W)
    layer.gate_bias.assign([0.1, -0.1])
    layer.region_bias.assign([0.0, 0.5])
    if linear_only:
        layer.s.assign([[0.0], [0.0], [0.0], [0.6]])
    return layer


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_piecewise_logistic_hand_computed():
    # Field 2 (feature 3) is linear-only: not in the gate, no weight per region, one shared weight s = 0.6.
    # Row 0 (f0 x1, f2 x2, f3 x1): gate = u0 + 2 u2 + a = [1,0] + [1,-1] + [0.1,-0.1] = [2.1, -1.1]
    #   -> softmax [sig(3.2), 1 - sig(3.2)]; regions = w0 + 2 w2 + b + 0.6 = [0.2, 1.2]
    #   p = sig(3.2) sig(0.2) + (1 - sig(3.2)) sig(1.2) = 0.558399
    # Row 1 (f1 x0.5, f3 x1): gate = 0.5 u1 + a = [0.1, 0.4] -> [sig(-0.3), 1 - sig(-0.3)];
    #   regions = 0.5 w1 + b + 0.6 = [0.8, 1.25]; p = sig(-0.3) sig(0.8) + (1 - sig(-0.3)) sig(1.25) = 0.740138
    p0 = _sig(3.2) * _sig(0.2) + (1 - _sig(3.2)) * _sig(1.2)
    p1 = _sig(-0.3) * _sig(0.8) + (1 - _sig(-0.3)) * _sig(1.25)
    np.testing.assert_allclose([p0, p1], [0.5583992, 0.7401379], rtol=1e-6)
    layer = _plm()
    np.testing.assert_allclose(layer(sparse_batch(BATCH)).numpy(), [[p0], [p1]], rtol=1e-6)
    # The linear-only feature's gate and region rows are never used: no gradient reaches them.
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(layer(sparse_batch(BATCH)))
    gu, gw, gs = (tf.convert_to_tensor(g).numpy() for g in tape.gradient(out, [layer.u, layer.w, layer.s]))
    assert np.all(gu[3] == 0) and np.all(gw[3] == 0) and np.all(gs[:3] == 0) and gs[3, 0] > 0


def test_piecewise_logistic_l2_on_touched_rows():
    layer = _plm(l2=0.1)
    layer(sparse_batch(BATCH))
    # u rows used: 0, 2 (row 0), 1 (row 1): 1 + 0.5 + 1 = 2.5; w rows: 0.05 + 0.1 + 0.25 = 0.4;
    # s row 3, used twice: 2 * 0.36. 0.1/2 * 3.62 / batch 2 = 0.0905.
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), 0.0905, rtol=1e-5)


def test_one_region_is_logistic_regression():
    plm = PiecewiseLogistic(4, 1)
    plm.build(None)
    plm.w.assign(W[:, :1])
    plm.region_bias.assign([0.3])
    lr = layers.Linear(4)
    lr.build(None)
    lr.w.assign(W[:, :1])
    lr.bias.assign([0.3])
    batch = sparse_batch(BATCH)
    np.testing.assert_allclose(plm(batch).numpy(), tf.sigmoid(lr(batch)).numpy(), rtol=1e-6)


def test_piecewise_logistic_config_and_savedmodel_round_trip(tmp_path):
    layer = PiecewiseLogistic(4, 3, (2,), l2=1e-3, init_stddev=0.2)
    clone = PiecewiseLogistic.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="init_stddev"):
        PiecewiseLogistic(4, 2, init_stddev=0.0)
    plm = _plm()
    batch = sparse_batch(BATCH)
    before = plm(batch).numpy()
    module = tf.Module()
    module.plm = plm
    module.f = tf.function(lambda ids, vals, fields: plm({"ids": ids, "values": vals, "fields": fields}),
                           input_signature=[tf.SparseTensorSpec([None, None], tf.int64),
                                            tf.SparseTensorSpec([None, None], tf.float32),
                                            tf.SparseTensorSpec([None, None], tf.int64)])
    tf.saved_model.save(module, str(tmp_path / "plm"))
    loaded = tf.saved_model.load(str(tmp_path / "plm"))
    np.testing.assert_allclose(loaded.f(batch["ids"], batch["values"], batch["fields"]).numpy(), before, rtol=1e-6)


def test_mlr_model_exports_and_matches_through_the_tf_serving_loader(tiny_etl, tmp_path):
    run = str(tmp_path / "run")
    cfg = config_lib.resolve("", overrides={
        "data": {"path": tiny_etl, "batch_size": 512}, "run_dir": run,
        "model": {"name": "mlr", "num_regions": 3, "l2_linear": 1e-5},
        "optimizer": {"name": "adam", "learning_rate": 0.01}, "train": {"epochs": 1, "verbose": 0, "report": False}})
    metrics = trainer_lib.train(cfg)
    assert 0.5 < metrics["click"]["auc"] < 1.0
    path, check = exporter.export(run, str(tmp_path / "export"), "mlr")
    # export() compares every signature, Session-loaded by tensor names, with the in-process model.
    assert check["max_abs_diff"] <= 1e-5 and check["examples"] == 4000
    schema = load_schema(tiny_etl)
    examples = exporter.eval_examples(schema, 50)
    _, _, model = trainer_lib.load_trained(run)
    served = exporter.session_predict(path, examples)["click"]
    np.testing.assert_allclose(served, exporter.in_process_predict(model, schema, examples, 50)["click"], atol=1e-6)
    assert model.plm.num_regions == 3
