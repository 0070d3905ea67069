"""Every registered model trains on the tiny generated set; structural properties of the models."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from feature_schema import load_schema
from trainer import config as config_lib
from trainer import data
from trainer import train as trainer_lib
from trainer.models import MODELS, RankingModel, build_model


def _cfg(tiny_etl, name, **model):
    return config_lib.resolve("", overrides={
        "data": {"path": tiny_etl, "batch_size": 64},
        "model": {"name": name, "embedding_dim": 4, "hidden_units": [16], "tower_units": [8], **model},
        "optimizer": {"name": "adam", "learning_rate": 0.01}})


@pytest.fixture(scope="module")
def batches(tiny_etl):
    schema = load_schema(tiny_etl)
    return schema, list(data.make_dataset(schema, "train", 64).take(4))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_with_finite_falling_loss_and_serves_its_outputs(name, tiny_etl, batches):
    schema, raw = batches
    keras.utils.set_random_seed(1)
    cfg = _cfg(tiny_etl, name)
    if getattr(MODELS[name], "needs_sequence", False):  # tests/test_sequence_models.py trains it on a behaviour log
        with pytest.raises(ValueError, match="sequence field"):
            trainer_lib.build_and_compile(cfg, schema)
        return
    model = trainer_lib.build_and_compile(cfg, schema)
    ds = trainer_lib._select(_from_list(raw), model.tasks, cfg.train)
    history = model.fit(ds, epochs=4, verbose=0).history["loss"]
    assert all(np.isfinite(history))
    assert history[-1] < history[0], (name, history)  # four passes over four batches lower their loss

    # Tasks: single-task models predict the first label, multi-task ones every label of the schema.
    assert model.tasks == (schema.label_names if MODELS[name].multi_task else schema.label_names[:1])
    assert set(model.tasks) <= set(model.serving_outputs)
    features, _, _ = raw[0]
    out = model(features, training=False)
    assert set(model.serving_outputs) <= set(out)
    for key in model.serving_outputs:
        p = out[key].numpy()
        assert p.shape == (64,) and np.all((p > 0) & (p < 1)), key

    # get_config rebuilds the same architecture (and silences Keras' non-serializable warning).
    clone = type(model).from_config(model.get_config())
    clone(features)
    assert clone.tasks == model.tasks and [v.shape for v in clone.variables] == [v.shape for v in model.variables]


# XLA compilation takes seconds per model: the default suite covers the models of the speed experiments.
# din and dicm need a sequence field, which the tiny log lacks (tests/test_sequence_models.py trains them).
@pytest.mark.parametrize("name", [n if n in ("ffm", "deepfm") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(MODELS) if not getattr(MODELS[n], "needs_sequence", False)])
def test_every_model_trains_the_same_under_xla_and_steps_per_execution(name, tiny_etl, batches):
    schema, raw = batches
    histories, calls = [], []
    for jit, per_call in ((False, 1), (True, 2)):
        keras.utils.set_random_seed(1)
        cfg = config_lib.resolve("", overrides={
            "data": {"path": tiny_etl, "batch_size": 64},
            "model": {"name": name, "embedding_dim": 4, "hidden_units": [16], "tower_units": [8]},
            "optimizer": {"name": "adam", "learning_rate": 0.01},
            "train": {"jit_compile": jit, "steps_per_execution": per_call}})
        model = trainer_lib.build_and_compile(cfg, schema)
        assert (model.xla_train_step is not None) is jit
        batch_ends = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: calls.append(per_call))
        ds = trainer_lib._select(_from_list(raw), model.tasks, cfg.train).repeat()
        histories.append(model.fit(ds, epochs=2, steps_per_epoch=4, verbose=0, callbacks=[batch_ends]).history)
    # Same initial weights and batches: XLA only reorders float arithmetic.
    for key in histories[0]:
        np.testing.assert_allclose(histories[1][key], histories[0][key], rtol=2e-3, err_msg=key)
    # 8 steps: 8 calls of the train function one step at a time, 4 calls of two steps.
    assert calls.count(1) == 8 and calls.count(2) == 4


def _from_list(items):
    return tf.data.Dataset.from_generator(lambda: iter(items), output_signature=tf.nest.map_structure(
        tf.type_spec_from_value, items[0]))


def _randomize(model):
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))


def _with_field_row(features, schema, field, row_in_field):
    """The batch with every feature of ``field`` replaced by that field's row ``row_in_field``."""
    ids, fields = features["ids"], features["fields"]
    f = schema.field(field)
    new = tf.where(fields.values == f.id, tf.cast(f.offset + row_in_field, tf.int64), ids.values)
    return {**features, "ids": tf.SparseTensor(ids.indices, new, ids.dense_shape)}


@pytest.mark.parametrize("name", ["mtl", "esmm", "mmoe"])
def test_cvr_tower_never_sees_position_but_ctr_does(name, tiny_etl, batches):
    schema, raw = batches
    model = build_model(_cfg(tiny_etl, name, bias_fields=["position"]).model, schema)
    features = raw[0][0]
    model(features)
    _randomize(model)
    top, low = (model(_with_field_row(features, schema, "position", r)) for r in (1, 3))
    assert np.max(np.abs(top["click"].numpy() - low["click"].numpy())) > 1e-3
    cvr = "cvr" if name == "esmm" else "conversion"
    np.testing.assert_array_equal(top[cvr].numpy(), low[cvr].numpy())


def test_esmm_ctcvr_is_ctr_times_cvr(tiny_etl, batches):
    schema, raw = batches
    model = build_model(_cfg(tiny_etl, "esmm").model, schema)
    features = raw[0][0]
    model(features)
    _randomize(model)
    out = {k: v.numpy() for k, v in model(features).items()}
    assert model.serving_outputs == ("click", "conversion", "ctr", "cvr", "ctcvr")
    np.testing.assert_allclose(out["ctcvr"], out["ctr"] * out["cvr"], rtol=1e-6)
    np.testing.assert_array_equal(out["conversion"], out["ctcvr"])
    np.testing.assert_array_equal(out["click"], out["ctr"])
    assert model.derived_eval == {"cvr": ("conversion", "click")}


@pytest.mark.parametrize("name", ["mtl", "mmoe"])
def test_task_private_fields_reach_only_their_tower(name, tiny_etl, batches):
    schema, raw = batches
    model = build_model(_cfg(tiny_etl, name, task_fields={"conversion": ["price"]}).model, schema)
    features = raw[0][0]
    model(features)
    _randomize(model)
    a, b = (model(_with_field_row(features, schema, "price", r)) for r in (1, 7))
    np.testing.assert_array_equal(a["click"].numpy(), b["click"].numpy())
    assert np.max(np.abs(a["conversion"].numpy() - b["conversion"].numpy())) > 1e-3
    with pytest.raises(ValueError, match="not a task"):
        build_model(_cfg(tiny_etl, name, task_fields={"ctr": ["price"]}).model, schema)
    with pytest.raises(KeyError, match="no field"):
        build_model(_cfg(tiny_etl, name, bias_fields=["slot"]).model, schema)


def test_mmoe_towers_read_their_own_gate_mixture(tiny_etl, batches):
    schema, raw = batches
    model = build_model(_cfg(tiny_etl, "mmoe", num_experts=3, expert_units=[6], bias_tasks=[]).model, schema)
    features = raw[0][0]
    model(features)
    _randomize(model)
    out = model(features)
    # No shared bottom: the experts read the flattened embeddings, and tower t reads gate t's mixture.
    assert not hasattr(model, "bottom") and len(model.moe.experts) == 3
    deep = model._deep_input(features, model.embedding(features), model.deep_fields, model.values)
    mixed = model.moe(deep)
    for i, t in enumerate(model.tasks):
        expected = tf.sigmoid(model.towers[t](mixed[:, i])[:, 0])
        np.testing.assert_allclose(out[t].numpy(), expected.numpy(), rtol=1e-5)
    # Zeroing the conversion gate's kernel makes its softmax uniform: its mixture is the experts' mean.
    model.moe.gates[1].kernel.assign(tf.zeros_like(model.moe.gates[1].kernel))
    experts = [e(deep) for e in model.moe.experts]
    np.testing.assert_allclose(model.moe(deep)[:, 1].numpy(), (tf.add_n(experts) / 3).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_experts"):
        _cfg(tiny_etl, "mmoe", num_experts=0)


def test_wide_deep_position_enters_only_through_the_wide_weights(tiny_etl, batches):
    schema, raw = batches
    model = build_model(_cfg(tiny_etl, "wide_deep").model, schema)
    features = raw[0][0]
    model(features)
    _randomize(model)
    top, low = (model(_with_field_row(features, schema, "position", r))["click"].numpy() for r in (1, 3))
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    pos = schema.field("position").offset
    w = model.wide.w.numpy()[:, 0]
    np.testing.assert_allclose(logit(top) - logit(low), w[pos + 1] - w[pos + 3], atol=2e-4)


def test_deepfm_fm_and_deep_share_one_embedding_table(tiny_etl, batches):
    schema, raw = batches
    model = build_model(_cfg(tiny_etl, "deepfm").model, schema)
    features = raw[0][0]
    model(features)
    tables = [v for v in model.variables if v.shape == (schema.num_features, 4)]
    assert tables == [model.embedding.v]
    fields = list(model.deep_fields)
    with tf.GradientTape(persistent=True) as tape:
        emb = model.embedding(features)
        fm = tf.reduce_sum(model.fm(tf.gather(emb, fields, axis=1)))
        deep = tf.reduce_sum(model.mlp(model._deep_input(features, emb, model.deep_fields, model.values)))
    for part in (fm, deep):
        grad = tf.convert_to_tensor(tape.gradient(part, model.embedding.v))
        assert float(tf.reduce_sum(tf.abs(grad))) > 0


def test_unknown_model_and_task_errors(tiny_etl, batches):
    schema, _ = batches
    with pytest.raises(ValueError, match="unknown model"):
        build_model(_cfg(tiny_etl, "nope").model, schema)
    with pytest.raises(ValueError, match="single-task"):
        build_model(_cfg(tiny_etl, "ffm", tasks=["click", "conversion"]).model, schema)
    with pytest.raises(ValueError, match="not labels"):
        build_model(_cfg(tiny_etl, "mtl", tasks=["click", "purchase"]).model, schema)
    assert issubclass(MODELS["esmm"], RankingModel)


def test_mlp_dtype_bfloat16_puts_only_the_deep_part_in_bfloat16_and_predicts_close_to_float32(tiny_etl, batches):
    schema, raw = batches
    features, _, _ = raw[0]
    models = {}
    for dtype in ("float32", "bfloat16"):
        keras.utils.set_random_seed(3)
        models[dtype] = build_model(_cfg(tiny_etl, "deepfm", hidden_units=[16, 8], mlp_dtype=dtype).model, schema)
        models[dtype](features)
    models["bfloat16"].set_weights(models["float32"].get_weights())
    bf16 = models["bfloat16"]
    assert [layer.compute_dtype for layer in bf16.mlp.dense] == ["bfloat16", "bfloat16"]
    # Embeddings, the linear and FM parts, the logit layer and every variable stay float32.
    assert {bf16.embedding.compute_dtype, bf16.linear.compute_dtype, bf16.deep_logit.compute_dtype} == {"float32"}
    assert {v.dtype for v in bf16.variables} == {tf.float32}
    p32, p16 = (models[d](features)[bf16.tasks[0]] for d in ("float32", "bfloat16"))
    assert p16.dtype == tf.float32
    # bfloat16 keeps 8 significant bits: predictions agree to about 1e-2, not exactly.
    np.testing.assert_allclose(p16.numpy(), p32.numpy(), atol=2e-2)
    assert not np.array_equal(p16.numpy(), p32.numpy())
    with pytest.raises(ValueError, match="mlp_dtype"):
        _cfg(tiny_etl, "deepfm", mlp_dtype="float16")
