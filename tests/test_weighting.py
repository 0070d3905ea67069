"""Uncertainty loss weighting (Kendall et al. 2018): the layer and the per-task losses by hand, the
models' compute_loss hook and its gradients, a train step, save/load round trips, warm start, config
errors and (slow) the parameter-server path."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from feature_schema import load_schema
from trainer import config as config_lib
from trainer import data
from trainer import train as trainer_lib
from trainer.models import build_model
from trainer.warm_start import warm_start
from trainer.weighting import UncertaintyWeighting, task_losses

S = [0.5, -1.0]


def test_weighted_loss_and_gradients_by_hand():
    layer = UncertaintyWeighting(("click", "conversion"), initial_log_variance=0.0)
    assert layer.log_variance.numpy().tolist() == [0.0, 0.0]
    layer.log_variance.assign(S)
    losses = tf.constant([0.3, 0.05])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(losses)
        total = layer(losses)
    # exp(-0.5) 0.3 + 0.5/2 + exp(1) 0.05 - 1/2 = 0.18195920 + 0.25 + 0.13591409 - 0.5
    assert total.numpy() == pytest.approx(0.0678732893, abs=1e-6)
    # d/ds_t = -exp(-s_t) L_t + 1/2; d/dL_t = exp(-s_t)
    np.testing.assert_allclose(tape.gradient(total, layer.log_variance).numpy(), [0.3180408021, 0.3640859086],
                               atol=1e-6)
    np.testing.assert_allclose(tape.gradient(total, losses).numpy(), [math.exp(-0.5), math.e], rtol=1e-6)
    assert {t: float(w) for t, w in layer.task_weights().items()} == pytest.approx(
        {"click": math.exp(-0.5), "conversion": math.e})
    with pytest.raises(ValueError, match="two or more tasks"):
        UncertaintyWeighting(("click",))


def test_task_losses_by_hand():
    y = {"click": tf.constant([1.0, 0.0]), "conversion": tf.constant([0.0, 0.0])}
    p = {"click": tf.constant([0.8, 0.4]), "conversion": tf.constant([0.1, 0.2])}
    w = {"click": tf.constant([1.0, 1.0]), "conversion": tf.constant([1.0, 0.0])}
    # click: (-ln 0.8 - ln 0.6) / 2; conversion: -ln 0.9 / 2 (the 0-weight example still counts in n = 2).
    np.testing.assert_allclose(task_losses(("click", "conversion"), y, p, w).numpy(),
                               [0.3669845876, 0.0526802578], atol=1e-6)
    np.testing.assert_allclose(task_losses(("click",), y, p, None).numpy(), [0.3669845876], atol=1e-6)


def test_layer_config_and_savedmodel_round_trip(tmp_path):
    layer = UncertaintyWeighting(("a", "b", "c"), initial_log_variance=0.25, name="w")
    clone = UncertaintyWeighting.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config() and clone.log_variance.numpy().tolist() == [0.25] * 3
    layer.log_variance.assign([0.1, -0.2, 0.3])
    module = tf.Module()
    module.layer = layer
    module.f = tf.function(lambda losses: layer(losses), input_signature=[tf.TensorSpec([3], tf.float32)])
    losses = tf.constant([0.4, 0.1, 0.02])
    before = layer(losses).numpy()
    tf.saved_model.save(module, str(tmp_path / "w"))
    loaded = tf.saved_model.load(str(tmp_path / "w"))
    assert loaded.f(losses).numpy() == pytest.approx(before, abs=1e-7)
    np.testing.assert_allclose(loaded.layer.log_variance.numpy(), [0.1, -0.2, 0.3])


def _cfg(tiny_etl, name, weighting="uncertainty", **train):
    return config_lib.resolve("", overrides={
        "data": {"path": tiny_etl, "batch_size": 64},
        "model": {"name": name, "embedding_dim": 4, "hidden_units": [16], "tower_units": [8],
                  "l2_embedding": 1e-3, "loss_weighting": weighting},
        "optimizer": {"name": "sgd", "learning_rate": 0.1}, "train": train})


@pytest.fixture(scope="module")
def batch(tiny_etl):
    schema = load_schema(tiny_etl)
    features, labels, weights = next(iter(data.make_dataset(schema, "train", 64)))
    return schema, features, labels, weights


def _bce(y, p):
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


@pytest.mark.parametrize("name", ["mtl", "mmoe", "esmm"])
def test_models_compute_loss_gradient_and_train_step(name, tiny_etl, batch):
    schema, features, labels, weights = batch
    keras.utils.set_random_seed(3)
    cfg = _cfg(tiny_etl, name, task_condition={"conversion": "click"} if name == "mtl" else {})
    model = trainer_lib.init_model(trainer_lib.build_and_compile(cfg, schema), schema)
    x, y, sw = features, {t: labels[t] for t in model.tasks}, trainer_lib.task_weights(
        labels, weights, model.tasks, cfg.train, True)
    model.loss_weighting.log_variance.assign(S)
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x, y, y_pred, sw)
    reg = float(tf.add_n(model.losses))
    assert reg > 0  # the L2 terms of the touched rows are added unweighted
    per_task = np.array([np.sum(sw[t].numpy() * _bce(y[t].numpy(), y_pred[t].numpy())) / 64 for t in model.tasks])
    s = np.array(S)
    assert float(loss) == pytest.approx(np.sum(np.exp(-s) * per_task + s / 2) + reg, rel=1e-5)
    # The per-task losses are Keras' own: its fixed-weight compiled loss is their sum plus the L2 terms.
    assert float(keras.Model.compute_loss(model, x, y, y_pred, sw)) == pytest.approx(per_task.sum() + reg, rel=1e-5)
    grad = tape.gradient(loss, model.loss_weighting.log_variance).numpy()
    np.testing.assert_allclose(grad, -np.exp(-s) * per_task + 0.5, rtol=1e-4)
    # One SGD step (no dropout: the same forward pass) moves s by -lr * gradient; the logs report the
    # weighted objective as "loss" and each task's weight exp(-s_t).
    logs = model.train_step((x, y, sw))
    np.testing.assert_allclose(model.loss_weighting.log_variance.numpy(), s - 0.1 * grad, rtol=1e-4)
    assert float(logs["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(logs[f"{model.tasks[1]}_loss_weight"]) == pytest.approx(math.exp(1.0 + 0.1 * grad[1]), rel=1e-4)


def test_fixed_weighting_is_unchanged(tiny_etl, batch):
    schema, features, labels, weights = batch
    model = trainer_lib.init_model(trainer_lib.build_and_compile(_cfg(tiny_etl, "mtl", "fixed"), schema), schema)
    assert model.loss_weighting is None
    assert not [v for v in model.variables if "log_variance" in v.name]
    y = {t: labels[t] for t in model.tasks}
    sw = {t: weights for t in model.tasks}
    y_pred = model(features, training=True)
    assert float(model.compute_loss(features, y, y_pred, sw)) == float(
        keras.Model.compute_loss(model, features, y, y_pred, sw))


def test_config_errors(tiny_etl, batch):
    schema = batch[0]
    with pytest.raises(ValueError, match="model.loss_weighting 'learned' not in fixed/uncertainty"):
        _cfg(tiny_etl, "mtl", "learned")
    with pytest.raises(ValueError, match="train.loss_weights .* both weigh the task losses"):
        _cfg(tiny_etl, "mtl", loss_weights={"click": 2.0})
    with pytest.raises(ValueError, match="weighs the losses of several tasks"):
        build_model(_cfg(tiny_etl, "fm").model, schema)
    with pytest.raises(ValueError, match="weighs the losses of several tasks"):
        build_model(dataclasses.replace(_cfg(tiny_etl, "mtl").model, tasks=("click",)), schema)


def test_trained_weights_survive_checkpoint_export_and_warm_start(mtl_fusion_export, tiny_etl):
    """The conftest run (mtl, uncertainty weighting, one epoch): s_t moved, and the final checkpoint,
    the export and a warm start from either carry it."""
    run_dir = mtl_fusion_export["run_dir"]
    cfg, schema, model = trainer_lib.load_trained(run_dir)
    trained = model.loss_weighting.log_variance.numpy()
    assert np.all(np.abs(trained) > 1e-3), trained
    # The epoch logs hold each task's weight exp(-s_t) (progress.jsonl, TensorBoard).
    epoch = [json.loads(line) for line in open(os.path.join(run_dir, trainer_lib.PROGRESS_FILE))][-2]
    assert epoch["conversion_loss_weight"] == pytest.approx(math.exp(-trained[1]), rel=1e-5)
    for source in (run_dir, mtl_fusion_export["path"]):
        fresh = trainer_lib.init_model(build_model(cfg.model, schema), schema)
        assert np.all(fresh.loss_weighting.log_variance.numpy() == 0)
        report = warm_start(fresh, schema, source)
        assert "model/loss_weighting/log_variance" in report.copied
        np.testing.assert_array_equal(fresh.loss_weighting.log_variance.numpy(), trained)
    # The final checkpoint (what BackupAndRestore and the exporter read) holds it.
    fresh = trainer_lib.init_model(build_model(cfg.model, schema), schema)
    tf.train.Checkpoint(model=fresh).read(os.path.join(run_dir, trainer_lib.WEIGHTS_DIR, "weights")).expect_partial()
    np.testing.assert_array_equal(fresh.loss_weighting.log_variance.numpy(), trained)


@pytest.mark.slow
def test_parameter_server_training_learns_the_weights(tiny_etl, tmp_path):
    """mtl with uncertainty weighting on a local cluster (1 worker, 1 parameter server): s_t lives on the
    parameter server, trains, reaches the chief's plain model and its export."""
    from test_distributed import _launch

    from export import exporter

    run_dir = str(tmp_path / "ps")
    proc = _launch(tiny_etl, run_dir, "mtl", epochs=1, workers=1, ps=1,
                   extra=("--set", "data.batch_size=256", "--set", "optimizer.learning_rate=0.01",
                          "--set", "model.loss_weighting=uncertainty"))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    _, _, model = trainer_lib.load_trained(run_dir)
    s = model.loss_weighting.log_variance.numpy()
    assert np.all(np.abs(s) > 1e-3), s
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["click"]["auc"] > 0.55, metrics
    _, check = exporter.export(run_dir, str(tmp_path / "export"))
    assert check["max_abs_diff"] <= 1e-5
