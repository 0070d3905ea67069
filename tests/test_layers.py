"""Layers against hand-computed values, plus serialization and save/load round trips."""
from __future__ import annotations

import numpy as np
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
    # Two touched rows (row 0 twice) of squared norm 2 each, batch of 1: 0.1 * 4.
    np.testing.assert_allclose(float(tf.add_n(layer.losses)), 0.4, rtol=1e-6)


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
