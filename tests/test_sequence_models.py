"""DIN and DICM: their layers against hand-computed values, every model on a log with a behaviour sequence
and item vectors, and the exports through the TF Serving loader."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from etl.config import EntityTableConfig, FieldConfig
from feature_schema import load_schema
from generator.clicklog import GeneratorConfig, generate
from trainer import config as config_lib
from trainer import data
from trainer import train as trainer_lib
from trainer.models import MODELS
from trainer.models.sequence import Dice, LocalActivationUnit, PReLU, sequence_rows

from conftest import generated_etl_config

# A short behaviour log: histories of up to 6 clicks (5 kept by the ETL), 4-float item vectors.
BEHAVIOUR = GeneratorConfig.preset("behaviour", n_train=6000, n_eval=2000, n_users=60, n_items=40, n_queries=20,
                                   n_brands=12, burn_in=3000, history_length=6, vector_dim=4, seed=3)
MAX_LENGTH = 5


# ---------------------------------------------------------------- layers by hand

def test_dice_at_inference_uses_the_moving_statistics():
    layer = Dice(epsilon=0.0)
    layer.build((None, 2))
    layer.moving_mean.assign([0.5, 0.0])
    layer.moving_var.assign([0.25, 4.0])
    layer.alpha.assign([0.1, 0.2])
    out = layer(tf.constant([[1.0, -2.0]])).numpy()
    # Unit 0: p = sigmoid((1 - 0.5) / 0.5) = sigmoid(1); f = p * 1 + (1 - p) * 0.1 * 1.
    # Unit 1: p = sigmoid(-2 / 2) = sigmoid(-1); f = p * -2 + (1 - p) * 0.2 * -2.
    s1, sm1 = 1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))
    np.testing.assert_allclose(out, [[s1 + (1 - s1) * 0.1, -2 * sm1 - 0.4 * (1 - sm1)]], rtol=1e-6)


def test_dice_in_training_uses_the_masked_batch_and_moves_the_averages():
    layer = Dice(epsilon=1e-8, momentum=0.9)
    x = tf.constant([[[1.0], [100.0]], [[3.0], [5.0]]])
    mask = tf.constant([[True, False], [True, True]])
    out = layer(x, mask=mask, training=True).numpy()
    mean, var = 3.0, 8.0 / 3.0  # of 1, 3, 5: the padding's 100 does not count
    p = 1 / (1 + np.exp(-(x.numpy() - mean) / np.sqrt(var + 1e-8)))
    np.testing.assert_allclose(out, p * x.numpy(), rtol=1e-5)  # alpha starts at 0
    np.testing.assert_allclose(layer.moving_mean.numpy(), [0.1 * mean], rtol=1e-6)
    np.testing.assert_allclose(layer.moving_var.numpy(), [0.9 + 0.1 * var], rtol=1e-6)


def test_prelu_by_hand():
    layer = PReLU()
    layer.build((None, 2))
    layer.alpha.assign([0.5, 0.0])
    np.testing.assert_allclose(layer(tf.constant([[-2.0, -2.0], [3.0, 1.0]])).numpy(), [[-1.0, 0.0], [3.0, 1.0]])


def _unit(softmax=False):
    """A local activation unit whose weight is a = 0.5 |<e_j, q>| + 0.1 (PReLU, alpha 0.5, on +-<e_j, q>)."""
    lau = LocalActivationUnit((2,), "prelu", softmax=softmax, name="lau")
    keys, query, mask = tf.zeros([1, 3, 2]), tf.zeros([1, 2]), tf.ones([1, 3], tf.bool)
    lau(keys, query, mask)
    kernel = np.zeros([8, 2], np.float32)
    kernel[6:8] = [[1.0, -1.0], [1.0, -1.0]]  # the e_j * q block: +-<e_j, q>
    lau.dense[0].kernel.assign(kernel)
    lau.acts[0].alpha.assign([0.5, 0.5])
    lau.score.kernel.assign([[1.0], [1.0]])
    lau.score.bias.assign([0.1])
    return lau


def test_local_activation_unit_by_hand_no_softmax_and_masked():
    lau = _unit()
    keys = tf.constant([[[1.0, 2.0], [0.0, 1.0], [3.0, 3.0]], [[2.0, 0.0], [1.0, 1.0], [50.0, 50.0]]])
    query = tf.constant([[1.0, -1.0], [1.0, 1.0]])
    mask = tf.constant([[True, True, False], [True, False, False]])
    # Example 0: <e_j, q> = -1, -1 -> a = 0.6, 0.6 (not normalised); the masked third counts 0.
    # Example 1: <e_0, q> = 2 -> a = 1.1; the others are masked.
    np.testing.assert_allclose(lau.weights_of(keys, query, mask).numpy(), [[0.6, 0.6, 0.0], [1.1, 0.0, 0.0]],
                               rtol=1e-6)
    np.testing.assert_allclose(lau(keys, query, mask).numpy(), [[0.6, 1.8], [2.2, 0.0]], rtol=1e-6)


def test_local_activation_unit_by_hand_softmax_over_the_masked_positions():
    lau = _unit(softmax=True)
    keys = tf.constant([[[1.0, 2.0], [0.0, 1.0], [3.0, 3.0]], [[2.0, 0.0], [1.0, 1.0], [50.0, 50.0]],
                        [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    query = tf.constant([[1.0, -1.0], [1.0, 1.0], [1.0, 1.0]])
    mask = tf.constant([[True, True, False], [True, True, False], [False, False, False]])
    # Example 0: raw a = 0.6, 0.6 -> softmax 1/2, 1/2; the masked third (raw 0.1) gets 0.
    # Example 1: <e_j, q> = 2, 2 -> raw a = 1.1, 1.1 -> 1/2, 1/2; the masked 50s (raw 50.1) get 0.
    # Example 2: nothing real -> weights 0, pooled 0.
    np.testing.assert_allclose(lau.weights_of(keys, query, mask).numpy(),
                               [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(lau(keys, query, mask).numpy(), [[0.5, 1.5], [1.5, 0.5], [0.0, 0.0]], rtol=1e-6)
    # Unequal raw weights: <e_j, q> = -1, 5 -> raw 0.6, 2.6 -> e^0.6 / (e^0.6 + e^2.6), e^2.6 / (...).
    w = lau.weights_of(tf.constant([[[1.0, 2.0], [3.0, -2.0]]]), tf.constant([[1.0, -1.0]]),
                       tf.constant([[True, True]])).numpy()
    np.testing.assert_allclose(w, [[1 / (1 + np.exp(2.0)), 1 / (1 + np.exp(-2.0))]], rtol=1e-6)


def test_attention_layers_config_and_savedmodel_round_trip(tmp_path):
    for layer in (Dice(epsilon=1e-6, momentum=0.5), LocalActivationUnit((4, 3), "dice", l2=1e-3),
                  LocalActivationUnit((4,), "prelu", softmax=True)):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
    lau = _unit()
    keys = tf.constant([[[1.0, 2.0], [0.0, 1.0], [3.0, 3.0]]])
    query, mask = tf.constant([[1.0, -1.0]]), tf.constant([[True, True, False]])
    module = tf.Module()
    module.lau = lau
    module.f = tf.function(lambda k, q, m: lau(k, q, m), input_signature=[
        tf.TensorSpec([None, None, 2]), tf.TensorSpec([None, 2]), tf.TensorSpec([None, None], tf.bool)])
    tf.saved_model.save(module, str(tmp_path / "lau"))
    loaded = tf.saved_model.load(str(tmp_path / "lau"))
    np.testing.assert_allclose(loaded.f(keys, query, mask).numpy(), [[0.6, 1.8]], rtol=1e-6)


# ---------------------------------------------------------------- models on a behaviour log

@pytest.fixture(scope="module")
def behaviour_etl(tmp_path_factory):
    """(ETL dir, raw dir) of a short behaviour log: hist (max 5 of 6 written) of item keys, item_vec (4 floats)."""
    import apache_beam as beam

    from etl import pipeline

    raw = str(tmp_path_factory.mktemp("behaviour-raw"))
    generate(raw, BEHAVIOUR)
    out = str(tmp_path_factory.mktemp("behaviour-etl"))
    base = generated_etl_config(raw, out)
    cfg = dataclasses.replace(
        base, fields=base.fields + (FieldConfig("hist", sequence=True, max_length=MAX_LENGTH, vocabulary_of="item"),
                                    FieldConfig("item_vec", kind="vector", dim=4)),
        entity_tables=base.entity_tables + (EntityTableConfig("item_vectors", os.path.join(raw, "item_vectors.tsv"),
                                                              "item"),))
    with beam.Pipeline() as p:
        pipeline.build_pipeline(p, cfg)
    pipeline.write_schema(cfg)
    return out, raw


def _cfg(etl, name, run_dir="", **model):
    return config_lib.resolve("", overrides={
        "data": {"path": etl, "batch_size": 64}, "run_dir": run_dir or "unused",
        "model": {"name": name, "embedding_dim": 4, "hidden_units": [16], "tower_units": [8],
                  "attention_units": [8], **model},
        "optimizer": {"name": "adam", "learning_rate": 0.01}, "train": {"epochs": 1, "verbose": 0, "report": False}})


def test_the_log_has_truncated_sequences_and_vectors(behaviour_etl):
    schema = load_schema(behaviour_etl[0])
    assert schema.counts["train"]["truncated"]["hist"]["lines"] > 0  # six written, five kept
    features, _, _ = next(iter(data.make_dataset(schema, "eval", 32)))
    rows, mask = sequence_rows(features, schema.field("hist").id, MAX_LENGTH)
    assert rows.shape == (32, MAX_LENGTH) and mask.numpy().sum(axis=1).max() == MAX_LENGTH
    assert features["vectors"]["hist"]["item_vec"].shape == (32, MAX_LENGTH, 4)
    # A sequence's rows are rows of item's block or hist's rare row.
    item, hist = schema.field("item"), schema.field("hist")
    used = rows.numpy()[mask.numpy()]
    assert np.all(((used >= item.offset) & (used < item.offset + item.vocab_size)) | (used == hist.rare_id))


def _spec(value):
    """The value's spec; a sparse batch's width varies from batch to batch (sequences)."""
    if isinstance(value, tf.SparseTensor):
        return tf.SparseTensorSpec([None, None], value.dtype)
    return tf.type_spec_from_value(value)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_on_sequences_and_vectors(name, behaviour_etl):
    schema = load_schema(behaviour_etl[0])
    batches = list(data.make_dataset(schema, "train", 64).take(4))
    keras.utils.set_random_seed(1)
    cfg = _cfg(behaviour_etl[0], name)
    model = trainer_lib.build_and_compile(cfg, schema)
    ds = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=tf.nest.map_structure(
        _spec, batches[0]))
    history = model.fit(trainer_lib._select(ds, model.tasks, cfg.train), epochs=4, verbose=0).history["loss"]
    assert all(np.isfinite(history)) and history[-1] < history[0], (name, history)
    out = model(batches[0][0], training=False)
    for key in model.serving_outputs:
        assert out[key].shape == (64,)


def test_din_attention_depends_on_the_candidate(behaviour_etl):
    """DIN's pooled history changes with the candidate item; mean pooling's would not."""
    schema = load_schema(behaviour_etl[0])
    keras.utils.set_random_seed(2)
    model = trainer_lib.build_and_compile(_cfg(behaviour_etl[0], "din", attention_activation="prelu"), schema)
    features, _, _ = next(iter(data.make_dataset(schema, "eval", 16)))
    emb = model.embedding(features)
    sid, cid, length = model.sequences[0]
    rows, mask = sequence_rows(features, sid, length)
    keys = tf.nn.embedding_lookup(model.embedding.v, rows)
    w1 = model.attention[0].weights_of(keys, emb[:, cid], mask)
    w2 = model.attention[0].weights_of(keys, tf.roll(emb[:, cid], 1, axis=0), mask)
    assert np.all(w1.numpy()[~mask.numpy()] == 0)
    assert np.max(np.abs(w1.numpy() - w2.numpy())) > 1e-4


@pytest.mark.parametrize("name", ["din", "dicm"])
def test_export_verifies_every_signature_and_raw_lines_with_histories(name, behaviour_etl, tmp_path):
    """A SavedModel round trip: every signature through the TF1 loader against the in-process model
    (``exporter.export`` refuses to publish otherwise), and the eval lines sent raw, with their hist,
    score as their ETL records do."""
    from export import exporter
    from serving.examples import ExampleBuilder

    etl, raw_dir = behaviour_etl
    run_dir = str(tmp_path / "run")
    trainer_lib.train(_cfg(etl, name, run_dir))
    version, check = exporter.export(run_dir, str(tmp_path / "export"), name)
    assert check["max_abs_diff"] <= exporter.MAX_ABS_DIFF and set(check["per_signature"]) == {
        "predict_hashed", "predict_ids", "serving_default", "classification", "regression", "rank"}
    assert check["warmup_records"] == 12
    schema = load_schema(etl)
    records = exporter.eval_examples(schema, 2000)
    builder = ExampleBuilder(schema)
    with open(os.path.join(raw_dir, "eval.libffm"), "rb") as f:
        lines = f.read().splitlines()
    assert any(b" hist:" in line for line in lines)
    raw = [builder.line_example(line)[1] for line in lines]
    sm = exporter.SessionModel(version)
    try:
        hashed = sm.run_examples("predict_hashed", records)["click"]
        served = sm.run_examples("serving_default", raw)["click"]
    finally:
        sm.close()
    np.testing.assert_allclose(np.sort(served), np.sort(hashed), atol=1e-5)
