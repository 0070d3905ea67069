"""Layers against hand-computed values, plus serialization and save/load round trips."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from trainer import layers


def sparse_batch(rows):
    """rows: list of [(id, value, field), ...] -> {"ids","values","fields"} SparseTensors."""
    idx, ids, vals, fields = [], [], [], []
    width = max(len(r) for r in rows)
    for b, r in enumerate(rows):
        for j, (i, v, f) in enumerate(r):
            idx.append([b, j])
            ids.append(i)
            vals.append(v)
            fields.append(f)
    shape = [len(rows), width]
    return {"ids": tf.SparseTensor(idx, tf.constant(ids, tf.int64), shape),
            "values": tf.SparseTensor(idx, tf.constant(vals, tf.float32), shape),
            "fields": tf.SparseTensor(idx, tf.constant(fields, tf.int64), shape)}


BATCH = [[(0, 1.0, 0), (2, 2.0, 1), (3, 1.0, 2)],
         [(1, 0.5, 0), (3, 1.0, 2)]]


def test_linear_hand_computed():
    layer = layers.Linear(4)
    layer.build(None)
    layer.w.assign([[0.1], [0.2], [0.3], [0.4]])
    layer.bias.assign([0.5])
    out = layer(sparse_batch(BATCH)).numpy()
    # Row 0: 0.5 + 0.1*1 + 0.3*2 + 0.4*1 = 1.6; row 1: 0.5 + 0.2*0.5 + 0.4 = 1.0
    np.testing.assert_allclose(out, [[1.6], [1.0]], rtol=1e-6)


def test_fm_interaction_hand_computed_and_linear_only_fields():
    v = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]], np.float32)
    layer = layers.FMInteraction(4, 2)
    layer.build(None)
    layer.v.assign(v)
    out = layer(sparse_batch(BATCH)).numpy()
    # Row 0: pairs (0,2):<v0,v2>*1*2 = 2; (0,3): <v0,v3>*1 = 2; (2,3): <v2,v3>*2 = 2 -> 6.
    # Row 1: (1,3): <v1,v3>*0.5*1 = -0.5.
    np.testing.assert_allclose(out, [[6.0], [-0.5]], rtol=1e-6)
    # Field 2 linear-only: feature 3 takes part in no pair -> row 0: 2, row 1: 0.
    lin_only = layers.FMInteraction(4, 2, linear_only_fields=(2,))
    lin_only.build(None)
    lin_only.v.assign(v)
    np.testing.assert_allclose(lin_only(sparse_batch(BATCH)).numpy(), [[2.0], [0.0]], atol=1e-6)


def test_touched_l2_counts_only_rows_in_the_batch():
    layer = layers.FMInteraction(4, 2, l2=0.1)
    layer.build(None)
    layer.v.assign(np.ones((4, 2), np.float32))
    layer(sparse_batch([[(0, 1.0, 0), (0, 1.0, 1)]]))
    # Two uses of row 0 (squared norm 2 each), batch of 1: 0.1/2 * 4 (gradient 0.1 * v per use, as libffm).
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), 0.2, rtol=1e-6)


# FFM table v[id, target field, :] for 4 features, 3 fields, k=2.
FFM_V = np.array([[[1, 0], [1, 2], [0, 1]],
                  [[0, 0], [2, 1], [1, 1]],
                  [[3, 0], [0, 0], [1, -1]],
                  [[1, 1], [-1, 0], [0, 0]]], np.float32)


def _ffm(**kwargs):
    layer = layers.FFMInteraction(4, 3, 2, **kwargs)
    layer.build(None)
    layer.v.assign(FFM_V)
    return layer


# Both ways of building the field grid: one gather per (example, field) slot (no crossed field
# declared multi-hot) and one per feature (field 0 declared multi-hot, so the layer must sum).
PATHS = pytest.mark.parametrize("multi_hot", [(), (0,)], ids=["by_slot", "by_feature"])


@PATHS
def test_ffm_interaction_hand_computed(multi_hot):
    # Row 0 (id0 f0 x1, id2 f1 x2, id3 f2 x1):
    #   (0,2): <v[0,f1], v[2,f0]> = <[1,2],[3,0]> = 3, * 1*2 -> 6
    #   (0,3): <v[0,f2], v[3,f0]> = <[0,1],[1,1]> = 1, * 1*1 -> 1
    #   (2,3): <v[2,f2], v[3,f1]> = <[1,-1],[-1,0]> = -1, * 2*1 -> -2      total 5
    # Row 1 (id1 f0 x0.5, id3 f2 x1): <v[1,f2], v[3,f0]> = <[1,1],[1,1]> = 2, * 0.5 -> 1
    batch = sparse_batch(BATCH)
    np.testing.assert_allclose(_ffm(multi_hot_fields=multi_hot)(batch).numpy(), [[5.0], [1.0]], rtol=1e-6)
    # libffm normalisation divides by sum x^2: 5 / 6 and 1 / 1.25.
    np.testing.assert_allclose(_ffm(normalize=True, multi_hot_fields=multi_hot)(batch).numpy(), [[5 / 6], [0.8]],
                               rtol=1e-6)
    # Field 2 linear-only: only (0,2) remains in row 0 (normalised by 1 + 4); row 1 has no pair.
    np.testing.assert_allclose(_ffm(linear_only_fields=(2,), multi_hot_fields=multi_hot)(batch).numpy(),
                               [[6.0], [0.0]], atol=1e-6)
    np.testing.assert_allclose(
        _ffm(linear_only_fields=(2,), normalize=True, multi_hot_fields=multi_hot)(batch).numpy(), [[1.2], [0.0]],
        atol=1e-6)


def test_ffm_multi_hot_field():
    # Two features of one field pair through that field's vectors: <v[0,f0], v[2,f0]> = 3.
    two = sparse_batch([[(0, 1.0, 0), (2, 1.0, 0)]])
    np.testing.assert_allclose(_ffm(multi_hot_fields=(0,))(two).numpy(), [[3.0]], rtol=1e-6)
    # ... and with f1 (id3 x2): + <v[0,f1], v[3,f0]> * 2 + <v[2,f1], v[3,f0]> * 2 = 3 + 2*3 + 0 = 9.
    three = sparse_batch([[(0, 1.0, 0), (2, 1.0, 0), (3, 2.0, 1)]])
    np.testing.assert_allclose(_ffm(multi_hot_fields=(0,))(three).numpy(), [[9.0]], rtol=1e-6)
    # Without the declaration the layer keeps its promise-based layout: one feature per slot (the
    # largest id, 2, with the slot's summed value 2): <v[2,f1], v[3,f0]> * 2 * 2 = 0.
    np.testing.assert_allclose(_ffm()(three).numpy(), [[0.0]], atol=1e-6)
    # A multi-hot field that is linear-only takes part in no pair either way.
    np.testing.assert_allclose(_ffm(linear_only_fields=(0,), multi_hot_fields=(0,))(three).numpy(), [[0.0]],
                               atol=1e-6)


@PATHS
def test_ffm_with_every_field_once(multi_hot):
    # Row 0 of BATCH alone: one feature per field in field order (the ETL's layout without multi-hot).
    grid = sparse_batch(BATCH[:1])
    np.testing.assert_allclose(_ffm(multi_hot_fields=multi_hot)(grid).numpy(), [[5.0]], rtol=1e-6)
    np.testing.assert_allclose(_ffm(normalize=True, multi_hot_fields=multi_hot)(grid).numpy(), [[5 / 6]], rtol=1e-6)
    layer = _ffm(l2=0.1, multi_hot_fields=multi_hot)
    layer(grid)
    # The six vectors of row 0 (squared norms 20 in all, see below), batch of 1: 0.1/2 * 20.
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), 1.0, rtol=1e-6)


@PATHS
def test_ffm_l2_counts_each_used_vector_once_per_use(multi_hot):
    layer = _ffm(l2=0.1, multi_hot_fields=multi_hot)
    layer(sparse_batch(BATCH))
    # Row 0 uses v[0,f1] (|.|^2 = 5), v[2,f0] (9), v[0,f2] (1), v[3,f0] (2), v[2,f2] (2), v[3,f1] (1) = 20;
    # row 1 uses v[1,f2] (2), v[3,f0] (2) = 4. 0.1/2 * 24 / batch 2 = 0.6. Padding adds nothing.
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), 0.6, rtol=1e-6)
    # Multi-hot: row [id0 f0, id2 f0, id3 f1] uses v[0,f0] (1) and v[2,f0] (9) for their pair,
    # v[0,f1] (5), v[3,f0] (2), v[2,f1] (0), v[3,f0] (2) for the pairs with id3: 19 -> 0.1/2 * 19.
    if multi_hot:
        layer = _ffm(l2=0.1, multi_hot_fields=multi_hot)
        layer(sparse_batch([[(0, 1.0, 0), (2, 1.0, 0), (3, 2.0, 1)]]))
        np.testing.assert_allclose(float(tf.add_n(layer.losses)), 0.95, rtol=1e-6)


@PATHS
def test_ffm_gradient_touches_only_used_vectors(multi_hot):
    layer = _ffm(multi_hot_fields=multi_hot)
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(layer(sparse_batch([[(0, 1.0, 0), (3, 2.0, 2)]])))
    grad = tf.convert_to_tensor(tape.gradient(out, layer.v)).numpy()
    # y = <v[0,f2], v[3,f0]> * 2: d/dv[0,f2] = 2 v[3,f0] = [2,2]; d/dv[3,f0] = 2 v[0,f2] = [0,2].
    expected = np.zeros_like(FFM_V)
    expected[0, 2] = [2, 2]
    expected[3, 0] = [0, 2]
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_lookup_gradient_dense_for_small_tables_sparse_for_large(monkeypatch):
    table = tf.Variable(np.arange(8, dtype=np.float32).reshape(4, 2))
    ids = tf.constant([1, 3, 1], tf.int64)
    weights = tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])

    def grad():
        with tf.GradientTape() as tape:
            rows = layers.lookup(table, ids)
            y = tf.reduce_sum(rows * weights)
        np.testing.assert_array_equal(rows.numpy(), [[2, 3], [6, 7], [2, 3]])
        return tape.gradient(y, table)

    # Row 1 is used twice: its gradient is the sum of both uses.
    expected = [[0, 0], [6, 8], [0, 0], [3, 4]]
    dense = grad()
    assert isinstance(dense, tf.Tensor)
    np.testing.assert_allclose(dense.numpy(), expected)
    monkeypatch.setattr(layers, "DENSE_GRADIENT_MAX_ELEMENTS", 7)  # the table has 8 elements
    sparse = grad()
    assert isinstance(sparse, tf.IndexedSlices)
    np.testing.assert_array_equal(sparse.indices.numpy(), [1, 3, 1])  # one row per use, for the optimizer
    np.testing.assert_allclose(tf.convert_to_tensor(sparse).numpy(), expected)


def test_field_sums_hand_computed():
    vals = tf.constant([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [4.0, 1.0]])
    batch = tf.constant(2, tf.int64)
    # One feature per field in field order, then: example 0 with two features in field 1, example 1
    # without field 0.
    cases = [([0, 0, 1, 1], [0, 1, 0, 1], [[[1, 0], [2, 0]], [[3, 1], [4, 1]]]),
             ([0, 0, 0, 1], [0, 1, 1, 1], [[[1, 0], [5, 1]], [[0, 0], [4, 1]]])]
    compiled = tf.function(layers.field_sums, jit_compile=True)
    for rows, fields, expected in cases:
        args = (vals, tf.constant(rows, tf.int64), tf.constant(fields, tf.int64), batch, 2)
        np.testing.assert_allclose(layers.field_sums(*args).numpy(), expected)
        np.testing.assert_allclose(compiled(*args).numpy(), expected)


def test_layers_under_xla_match_eager_values_and_gradients():
    cases = [(_ffm(normalize=True, l2=0.1, linear_only_fields=(2,)), BATCH),
             (_ffm(normalize=True, l2=0.1, multi_hot_fields=(0,)), BATCH + [[(0, 1.0, 0), (2, 1.0, 0)]]),
             (_ffm(l2=0.1), BATCH[:1]), (_embedding("mean", l2=0.2), MULTI_HOT),
             (layers.Linear(4, l2=0.1, fields=(0, 2)), BATCH), (layers.FMInteraction(4, 2, (2,), l2=0.1), BATCH)]
    for layer, rows in cases:
        batch = sparse_batch(rows)

        def value_and_grads(features):
            with tf.GradientTape() as tape:
                out = layer(features)
                y = tf.reduce_sum(out * tf.range(1.0, 1.0 + tf.cast(tf.size(out), tf.float32))[:, None]
                                  if out.shape.rank == 2 else out) + tf.add_n(layer.losses or [0.0])
            return out, [tf.convert_to_tensor(g) for g in tape.gradient(y, layer.trainable_variables)]

        eager = value_and_grads(batch)
        xla = tf.function(value_and_grads, jit_compile=True)(batch)
        for a, b in zip(tf.nest.flatten(eager), tf.nest.flatten(xla)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def _savedmodel_round_trip(layer, batch, path):
    before = layer(batch).numpy()
    module = tf.Module()
    module.layer = layer
    module.f = tf.function(lambda ids, vals, fields: layer({"ids": ids, "values": vals, "fields": fields}),
                           input_signature=[tf.SparseTensorSpec([None, None], tf.int64),
                                            tf.SparseTensorSpec([None, None], tf.float32),
                                            tf.SparseTensorSpec([None, None], tf.int64)])
    tf.saved_model.save(module, path)
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(loaded.f(batch["ids"], batch["values"], batch["fields"]).numpy(), before,
                               rtol=1e-6)


def test_ffm_config_and_savedmodel_round_trip(tmp_path):
    layer = layers.FFMInteraction(4, 3, 2, (2,), normalize=True, l2=1e-3, init="uniform", init_stddev=0.2,
                                  multi_hot_fields=(1,))
    clone = layers.FFMInteraction.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    _savedmodel_round_trip(_ffm(normalize=True), sparse_batch(BATCH), str(tmp_path / "ffm"))
    _savedmodel_round_trip(_ffm(normalize=True, multi_hot_fields=(0,)), sparse_batch(BATCH), str(tmp_path / "ffm2"))
    # libffm's initializer: U(0, 1/sqrt(k)).
    uniform = layers.FFMInteraction(50, 3, 4, init="uniform")
    uniform.build(None)
    v = uniform.v.numpy()
    assert v.min() >= 0.0 and v.max() <= 0.5 and v.std() > 0.1


def test_layers_config_round_trip_and_savedmodel(tmp_path):
    for layer in (layers.Linear(4, l2=0.01), layers.FMInteraction(4, 2, (1,), l2=0.1, init_stddev=0.2)):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
    fm = layers.FMInteraction(4, 2, (2,))
    batch = sparse_batch(BATCH)
    before = fm(batch).numpy()
    module = tf.Module()
    module.fm = fm
    module.f = tf.function(lambda ids, vals, fields: fm({"ids": ids, "values": vals, "fields": fields}),
                           input_signature=[tf.SparseTensorSpec([None, None], tf.int64),
                                            tf.SparseTensorSpec([None, None], tf.float32),
                                            tf.SparseTensorSpec([None, None], tf.int64)])
    tf.saved_model.save(module, str(tmp_path / "fm"))
    loaded = tf.saved_model.load(str(tmp_path / "fm"))
    np.testing.assert_allclose(loaded.f(batch["ids"], batch["values"], batch["fields"]).numpy(), before, rtol=1e-6)
    assert isinstance(fm, keras.layers.Layer)


def test_linear_restricted_to_fields():
    layer = layers.Linear(4, l2=0.1, fields=(0, 2))
    layer.build(None)
    layer.w.assign([[0.1], [0.2], [0.3], [0.4]])
    layer.bias.assign([0.5])
    out = layer(sparse_batch(BATCH)).numpy()
    # Field 1 (id 2) left out: row 0: 0.5 + 0.1 + 0.4 = 1.0; row 1: 0.5 + 0.2*0.5 + 0.4 = 1.0.
    np.testing.assert_allclose(out, [[1.0], [1.0]], rtol=1e-6)
    # L2 only on the kept rows: 0.1/2 * (0.01 + 0.16 + 0.04 + 0.16) / 2.
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), 0.05 * 0.37 / 2, rtol=1e-5)


EMB = np.array([[1, 0], [0, 2], [3, 1], [-1, 1]], np.float32)
# Row 0: id0 (f0), id1 (f0) and id2 (f2), values 1, 0.5, 2; row 1: only id3 (f1).
MULTI_HOT = [[(0, 1.0, 0), (1, 0.5, 0), (2, 2.0, 2)], [(3, 1.0, 1)]]


def _embedding(combiner, l2=0.0):
    layer = layers.FieldEmbedding(4, 3, 2, combiner=combiner, l2=l2)
    layer.build(None)
    layer.v.assign(EMB)
    return layer


def test_field_embedding_sum_and_mean_pooling():
    # On the field grid (one feature per field in field order): e_f = v_{id} x.
    np.testing.assert_allclose(_embedding("sum")(sparse_batch([[(0, 1.0, 0), (1, 0.5, 1), (2, 2.0, 2)]])).numpy(),
                               [[[1, 0], [0, 1], [6, 2]]], atol=1e-6)
    out = _embedding("sum")(sparse_batch(MULTI_HOT)).numpy()
    assert out.shape == (2, 3, 2)
    # Field 0 of row 0: [1,0]*1 + [0,2]*0.5 = [1,1]; field 2: [3,1]*2 = [6,2]; absent fields are 0.
    np.testing.assert_allclose(out, [[[1, 1], [0, 0], [6, 2]], [[0, 0], [-1, 1], [0, 0]]], atol=1e-6)
    mean = _embedding("mean")(sparse_batch(MULTI_HOT)).numpy()
    np.testing.assert_allclose(mean[0, 0], [0.5, 0.5], atol=1e-6)  # two features in field 0
    np.testing.assert_allclose(mean[0, 2], [6, 2], atol=1e-6)
    layer = _embedding("sum", l2=0.2)
    layer(sparse_batch(MULTI_HOT))
    # Touched rows 0..3 with squared norms 1, 4, 10, 2: 0.2/2 * 17 / batch 2.
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), 0.85, rtol=1e-6)


def test_field_values_and_field_fm():
    vals = layers.FieldValues((2, 0))(sparse_batch(MULTI_HOT)).numpy()
    # Output columns: field 2 then field 0 (1 + 0.5); row 1 has neither.
    np.testing.assert_allclose(vals, [[2.0, 1.5], [0.0, 0.0]], atol=1e-6)
    emb = tf.constant([[[1, 0], [2, 1], [0, 3]]], tf.float32)
    # <e0,e1> + <e0,e2> + <e1,e2> = 2 + 0 + 3 = 5.
    np.testing.assert_allclose(layers.FieldFMInteraction()(emb).numpy(), [[5.0]], rtol=1e-6)


def test_mlp_and_task_tower_hand_computed():
    mlp = layers.MLP((2,), activation="relu")
    x = tf.constant([[1.0, -1.0]])
    mlp(x)
    mlp.dense[0].kernel.assign([[1.0, -2.0], [3.0, 1.0]])
    mlp.dense[0].bias.assign([0.5, 0.5])
    # [1,-1] @ K + b = [1-3+0.5, -2-1+0.5] = [-1.5, -2.5] -> relu -> [0, 0]; flip the input sign:
    np.testing.assert_allclose(mlp(-x).numpy(), [[2.5, 3.5]], rtol=1e-6)
    tower = layers.TaskTower((2,), activation="relu")
    tower(x)
    tower.mlp.dense[0].kernel.assign([[1.0, 0.0], [0.0, 1.0]])
    tower.mlp.dense[0].bias.assign([0.0, 0.0])
    tower.logit.kernel.assign([[2.0], [-1.0]])
    tower.logit.bias.assign([0.25])
    # relu([2, 3]) . [2, -1] + 0.25 = 1.25
    np.testing.assert_allclose(tower(tf.constant([[2.0, 3.0]])).numpy(), [[1.25]], rtol=1e-6)
    # Dropout acts only in training.
    drop = layers.MLP((64,), dropout=0.5, seed=1)
    ones = tf.ones([4, 8])
    np.testing.assert_allclose(drop(ones, training=False).numpy(), drop(ones).numpy())
    assert np.mean(drop(ones, training=True).numpy() == 0) > 0.2


def test_new_layers_config_and_savedmodel_round_trip(tmp_path):
    for layer in (layers.FieldEmbedding(4, 3, 2, "mean", l2=0.1, init_stddev=0.3), layers.FieldValues((2, 0)),
                  layers.MLP((4, 2), "tanh", 0.1, 1e-4, seed=3), layers.TaskTower((3,), "relu", 0.0, 1e-3),
                  layers.Linear(4, fields=(1,)), layers.FieldFMInteraction()):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
    batch = sparse_batch(MULTI_HOT)
    _savedmodel_round_trip(_embedding("mean"), batch, str(tmp_path / "emb"))
    _savedmodel_round_trip(layers.FieldValues((2, 0)), batch, str(tmp_path / "values"))
    _savedmodel_round_trip(layers.Linear(4, fields=(0,)), batch, str(tmp_path / "wide"))
    tower = layers.TaskTower((3,))
    x = tf.constant([[1.0, 2.0], [0.5, -1.0]])
    before = tower(x).numpy()
    module = tf.Module()
    module.tower = tower
    module.f = tf.function(lambda t: tower(t), input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "tower"))
    loaded = tf.saved_model.load(str(tmp_path / "tower"))  # keep a reference: it owns the variables
    np.testing.assert_allclose(loaded.f(x).numpy(), before, rtol=1e-6)


def _moe():
    """Two experts of one relu layer (2 units) over d=2, two tasks; weights set by hand."""
    layer = layers.MixtureOfExperts(2, 2, (2,), activation="relu")
    layer(tf.zeros([1, 2]))
    layer.experts[0].dense[0].kernel.assign([[1.0, 0.0], [0.0, 1.0]])
    layer.experts[0].dense[0].bias.assign([0.0, 0.0])
    layer.experts[1].dense[0].kernel.assign([[0.0, 1.0], [1.0, 0.0]])
    layer.experts[1].dense[0].bias.assign([1.0, -5.0])
    layer.gates[0].kernel.assign([[0.0, 0.0], [0.0, 0.0]])          # logits [0, 0]
    layer.gates[1].kernel.assign([[0.0, np.log(3.0)], [0.0, 0.0]])  # logits [0, x_0 ln 3]
    return layer


def test_mixture_of_experts_hand_computed():
    layer = _moe()
    x = tf.constant([[1.0, 2.0], [-1.0, 1.0]])
    # Row 0: expert 0 = relu([1, 2]) = [1, 2]; expert 1 = relu([2+1, 1-5]) = [3, 0].
    #   Gate 0: softmax([0, 0]) = [1/2, 1/2] -> [2, 1]. Gate 1: softmax([0, ln 3]) = [1/4, 3/4]
    #   -> 1/4 [1, 2] + 3/4 [3, 0] = [2.5, 0.5].
    # Row 1: expert 0 = relu([-1, 1]) = [0, 1]; expert 1 = relu([1+1, -1-5]) = [2, 0].
    #   Gate 0 -> [1, 0.5]. Gate 1: softmax([0, -ln 3]) = [3/4, 1/4] -> 3/4 [0, 1] + 1/4 [2, 0] = [0.5, 0.75].
    np.testing.assert_allclose(layer.gate_weights(x).numpy(),
                               [[[0.5, 0.5], [0.25, 0.75]], [[0.5, 0.5], [0.75, 0.25]]], rtol=1e-6)
    out = layer(x).numpy()
    assert out.shape == (2, 2, 2)
    np.testing.assert_allclose(out, [[[2.0, 1.0], [2.5, 0.5]], [[1.0, 0.5], [0.5, 0.75]]], rtol=1e-6)
    # One expert: every gate's softmax is 1, so every task reads that expert.
    single = layers.MixtureOfExperts(3, 1, (2,))
    single(x)
    single.experts[0].dense[0].kernel.assign([[1.0, 0.0], [0.0, 1.0]])
    single.experts[0].dense[0].bias.assign([0.0, 0.0])
    np.testing.assert_allclose(single(x).numpy(), [[[1, 2]] * 3, [[0, 1]] * 3], atol=1e-6)
    with pytest.raises(ValueError, match="expert_units"):
        layers.MixtureOfExperts(2, 2, ())


def test_mixture_of_experts_l2_and_gradient_reaches_every_expert_and_gate():
    keras.utils.set_random_seed(3)  # an unlucky draw leaves an expert's 4 ReLUs dead on both inputs
    layer = layers.MixtureOfExperts(2, 3, (4,), l2=0.1)
    x = tf.constant([[1.0, 2.0], [-1.0, 1.0]])
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(layer(x))
    grads = tape.gradient(out, [e.dense[0].kernel for e in layer.experts] + [g.kernel for g in layer.gates])
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)
    # L2 0.1 ||W||^2 on the 3 expert and 2 gate kernels.
    kernels = [e.dense[0].kernel for e in layer.experts] + [g.kernel for g in layer.gates]
    expected = sum(0.1 * float(tf.reduce_sum(tf.square(k))) for k in kernels)
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), expected, rtol=1e-5)


def test_mixture_of_experts_config_and_savedmodel_round_trip(tmp_path):
    layer = layers.MixtureOfExperts(3, 4, (8, 2), "tanh", 0.1, 1e-3, seed=5)
    clone = layers.MixtureOfExperts.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    moe = _moe()
    x = tf.constant([[1.0, 2.0], [-1.0, 1.0]])
    before = moe(x).numpy()
    module = tf.Module()
    module.moe = moe
    module.f = tf.function(lambda t: moe(t), input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "moe"))
    loaded = tf.saved_model.load(str(tmp_path / "moe"))
    np.testing.assert_allclose(loaded.f(x).numpy(), before, rtol=1e-6)


def test_mlp_in_bfloat16_computes_in_bfloat16_keeps_float32_variables_and_output():
    mlp = layers.MLP((2,), activation="relu", compute_dtype="bfloat16")
    x = tf.constant([[1.0, -1.0]])
    mlp(x)
    # Values exact in bfloat16 (8 significant bits), so the hand-computed result is exact too.
    mlp.dense[0].kernel.assign([[1.0, -2.0], [3.0, 1.0]])
    mlp.dense[0].bias.assign([0.5, 0.5])
    out = mlp(-x)
    assert out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), [[2.5, 3.5]])  # as the float32 test above
    assert mlp.dense[0].compute_dtype == "bfloat16" and mlp.dense[0].kernel.dtype == tf.float32
    # bfloat16 rounds: 1 + 2^-9 is not representable (it becomes 1), in float32 it is.
    mlp.dense[0].kernel.assign([[1.0 + 2.0 ** -9, 0.0], [0.0, 0.0]])
    mlp.dense[0].bias.assign([0.0, 0.0])
    np.testing.assert_array_equal(mlp(tf.constant([[1.0, 0.0]])).numpy(), [[1.0, 0.0]])
    clone = layers.MLP.from_config(mlp.get_config())
    assert clone.get_config()["compute_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="compute_dtype"):
        layers.MLP((2,), compute_dtype="float16")


def dense_batch(grid, multi_hot=()):
    """grid: [[(id, value), ...] one per dense column] with column j = field j, plus the multi-hot
    fields' features as sparse rows [(id, value, field), ...] per example: the dense layout."""
    sparse = sparse_batch([list(r) for r in multi_hot] if multi_hot else [[(0, 0.0, 0)]] * len(grid))
    if not multi_hot:  # an empty sparse part of width 0
        empty = tf.zeros([0, 2], tf.int64)
        shape = [len(grid), 0]
        sparse = {"ids": tf.SparseTensor(empty, tf.zeros([0], tf.int64), shape),
                  "values": tf.SparseTensor(empty, tf.zeros([0], tf.float32), shape),
                  "fields": tf.SparseTensor(empty, tf.zeros([0], tf.int64), shape)}
    return {**sparse, "dense_ids": tf.constant([[i for i, _ in r] for r in grid], tf.int64),
            "dense_values": tf.constant([[v for _, v in r] for r in grid], tf.float32),
            "dense_fields": tf.constant([list(range(len(r))) for r in grid], tf.int64)}


# Every field once per example, as the featurization layer fills it: the same batch in both layouts.
GRID = [[(0, 1.0), (2, 2.0), (3, 1.0)], [(1, 0.5), (2, 1.0), (3, 0.0)]]
GRID_SPARSE = [[(i, v, f) for f, (i, v) in enumerate(r)] for r in GRID]
# Fields 0 and 1 dense, field 2 multi-hot (two features in example 0, none in example 1).
MIXED_DENSE = ([[(0, 1.0), (2, 2.0)], [(1, 0.5), (2, 1.0)]], [[(3, 1.0, 2), (1, 2.0, 2)], [(3, 0.0, 2)]])
MIXED_SPARSE = [[(0, 1.0, 0), (2, 2.0, 1), (3, 1.0, 2), (1, 2.0, 2)], [(1, 0.5, 0), (2, 1.0, 1), (3, 0.0, 2)]]


def _dense_layers():
    lin = layers.Linear(4, l2=0.1)
    lin.build(None)
    lin.w.assign([[1.0], [-2.0], [0.5], [3.0]])
    lin.bias.assign([0.25])
    wide = layers.Linear(4, l2=0.1, fields=(0, 2))
    wide.build(None)
    wide.w.assign(lin.w)
    fm = layers.FMInteraction(4, 2, l2=0.1)
    fm.build(None)
    fm.v.assign(EMB)
    ffm = layers.FFMInteraction(4, 3, 2, l2=0.1)
    ffm.build(None)
    ffm.v.assign(np.arange(24, dtype=np.float32).reshape(4, 3, 2) / 10.0)
    return {"linear": lin, "linear_fields": wide, "fm": fm, "ffm": ffm, "embedding_sum": _embedding("sum", l2=0.2),
            "embedding_mean": _embedding("mean", l2=0.2), "values": layers.FieldValues((2, 0))}


@pytest.mark.parametrize("mixed", [False, True], ids=["all-dense", "mixed"])
def test_layers_read_the_dense_layout_as_the_sparse_one(mixed):
    """Outputs, L2 losses and gradients of every layer agree on the two layouts of one batch."""
    dense = dense_batch(*MIXED_DENSE) if mixed else dense_batch(GRID)
    sparse = sparse_batch(MIXED_SPARSE if mixed else GRID_SPARSE)
    for name, layer in _dense_layers().items():
        results = []
        for batch in (dense, sparse):
            with tf.GradientTape() as tape:
                out = layer(batch)
                total = tf.reduce_sum(out * tf.reshape(tf.range(tf.size(out), dtype=tf.float32), out.shape))
                total += tf.add_n(layer.losses) if layer.losses else 0.0
            grads = tape.gradient(total, layer.trainable_weights)
            results.append((out.numpy(), float(tf.add_n(layer.losses)) if layer.losses else 0.0,
                            [tf.convert_to_tensor(g).numpy() for g in grads]))
        (o1, l1, g1), (o2, l2, g2) = results
        np.testing.assert_allclose(o1, o2, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(l1, l2, rtol=1e-6, err_msg=name)
        for a, b in zip(g1, g2):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_dense_layout_hand_computed():
    """Linear and FieldEmbedding on the dense grid by hand (the one-gather paths)."""
    lin = _dense_layers()["linear"]
    # Example 0: 1*1 + 0.5*2 + 3*1 + 0.25 = 5.25; example 1: -2*0.5 + 0.5*1 + 3*0 + 0.25 = -0.25.
    np.testing.assert_allclose(lin(dense_batch(GRID)).numpy(), [[5.25], [-0.25]], rtol=1e-6)
    emb = _embedding("sum")(dense_batch(GRID)).numpy()
    np.testing.assert_allclose(emb[0], [[1, 0], [6, 2], [-1, 1]], atol=1e-6)  # EMB rows 0, 2, 3 times 1, 2, 1
    np.testing.assert_allclose(emb[1], [[0, 1], [3, 1], [0, 0]], atol=1e-6)
