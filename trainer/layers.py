"""Interaction layers over sparse features.

Every layer takes the batch's sparse features as a dict of ``tf.SparseTensor``s
``{"ids", "values", "fields"}`` of dense shape ``[batch, max_nnz]`` (vocabulary
rows, values, field ids: see ``trainer.data``) and returns a dense tensor.
Tables are sized from the schema (``num_features``, ``num_fields``); nothing is
hard-coded.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras


def sparse_parts(features):
    """(row of each feature in the batch, ids, values, fields, batch size) of a sparse batch."""
    ids = features["ids"]
    rows = ids.indices[:, 0]
    batch = ids.dense_shape[0]
    return rows, ids.values, features["values"].values, features["fields"].values, batch


def _touched_l2(rows_emb: tf.Tensor, l2: float) -> tf.Tensor:
    """L2 of the table rows a batch touched (as libffm does), normalised by batch."""
    return l2 * tf.reduce_sum(tf.square(rows_emb))


class Linear(keras.layers.Layer):
    """First-order term with global bias: ``y = w0 + sum_i w_{id_i} x_i``.

    (Logistic regression; the linear part of Rendle, "Factorization Machines", ICDM 2010.)

    Input: sparse features. Output: ``[batch, 1]`` logits.

    Args:
      num_features: rows of the weight table (schema ``num_features``).
      l2: L2 penalty on the rows a batch touches.
    """

    def __init__(self, num_features: int, l2: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = num_features
        self.l2 = l2

    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=(self.num_features, 1), initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(1,), initializer="zeros")
        super().build(input_shape)

    def call(self, features):
        rows, ids, values, _, batch = sparse_parts(features)
        w = tf.gather(self.w, ids)
        if self.l2:
            self.add_loss(_touched_l2(w, self.l2) / tf.cast(batch, tf.float32))
        out = tf.math.unsorted_segment_sum(w * values[:, None], rows, batch)
        return out + self.bias

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features, "l2": self.l2}


class FMInteraction(keras.layers.Layer):
    """Second-order FM term (Rendle, "Factorization Machines", ICDM 2010).

        y = sum_{i<j} <v_i, v_j> x_i x_j
          = 1/2 sum_k [ (sum_i v_{i,k} x_i)^2 - sum_i v_{i,k}^2 x_i^2 ]

    Features of ``linear_only_fields`` take part in no pair.

    Input: sparse features. Output: ``[batch, 1]``.

    Args:
      num_features: rows of the latent table.
      embedding_dim: latent dimension k.
      linear_only_fields: field ids excluded from interactions.
      l2: L2 penalty on the latent rows a batch touches.
      init_stddev: stddev of the normal initializer.
    """

    def __init__(self, num_features: int, embedding_dim: int, linear_only_fields=(), l2: float = 0.0,
                 init_stddev: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.num_features = num_features
        self.embedding_dim = embedding_dim
        self.linear_only_fields = tuple(int(f) for f in linear_only_fields)
        self.l2 = l2
        self.init_stddev = init_stddev

    def build(self, input_shape):
        self.v = self.add_weight(name="v", shape=(self.num_features, self.embedding_dim),
                                 initializer=keras.initializers.RandomNormal(stddev=self.init_stddev))
        super().build(input_shape)

    def call(self, features):
        rows, ids, values, fields, batch = sparse_parts(features)
        v = tf.gather(self.v, ids)
        if self.l2:
            self.add_loss(_touched_l2(v, self.l2) / tf.cast(batch, tf.float32))
        x = values
        if self.linear_only_fields:
            keep = tf.reduce_all(tf.not_equal(fields[:, None], tf.constant(self.linear_only_fields, tf.int64)), axis=1)
            x = x * tf.cast(keep, x.dtype)
        vx = v * x[:, None]
        s = tf.math.unsorted_segment_sum(vx, rows, batch)
        sq = tf.math.unsorted_segment_sum(tf.square(vx), rows, batch)
        return 0.5 * tf.reduce_sum(tf.square(s) - sq, axis=1, keepdims=True)

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features, "embedding_dim": self.embedding_dim,
                "linear_only_fields": list(self.linear_only_fields), "l2": self.l2,
                "init_stddev": self.init_stddev}
