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
    """``l2/2 * sum ||w||^2`` over the table rows a batch touched, once per use (as libffm does:
    the gradient per use is ``l2 * w``, so ``l2`` means what ``ffm-train -l`` means)."""
    return 0.5 * l2 * tf.reduce_sum(tf.square(rows_emb))


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


def dense_parts(features):
    """Pads a sparse batch to dense ``[batch, n]`` tensors (n = the batch's widest example).

    Returns:
      (ids int64, values float32, fields int64, present float32), all ``[batch, n]``;
      padding slots have id 0, value 0, field 0 and ``present`` 0.
    """
    ids = features["ids"]
    shape = ids.dense_shape
    idx = ids.indices

    def scatter(v):
        return tf.scatter_nd(idx, v, shape)

    present = scatter(tf.ones_like(features["values"].values))
    return scatter(ids.values), scatter(features["values"].values), scatter(features["fields"].values), present


class FFMInteraction(keras.layers.Layer):
    """Field-aware pairwise term (Juan et al., "Field-aware Factorization Machines for CTR
    Prediction", RecSys 2016; libffm).

        y = r * sum_{i<j} <v_{i, f_j}, v_{j, f_i}> x_i x_j,
        r = 1 / sum_i x_i^2 if ``normalize`` (libffm's instance-wise normalisation) else 1,

    where ``v_{i, f}`` is the latent vector of feature i used against field f. Features of
    ``linear_only_fields`` take part in no pair (nor in r). Two features of the same field (multi-hot)
    pair through ``<v_{i, f}, v_{j, f}>`` as in libffm.

    Input: sparse features. Output: ``[batch, 1]``. Table: ``[num_features, num_fields, k]``.

    L2 follows libffm: every latent vector a pair *uses* adds ``l2/2 * ||v||^2`` per use (gradient
    ``l2 * v`` per use, the same lambda as ``ffm-train -l``), summed and divided by the batch size
    like the log loss.

    Args:
      num_features: rows of the latent table (schema ``num_features``).
      num_fields: fields (schema ``num_fields``).
      embedding_dim: latent dimension k.
      linear_only_fields: field ids excluded from interactions.
      normalize: libffm's instance-wise normalisation.
      l2: L2 penalty per use of a latent vector.
      init: ``normal`` (N(0, init_stddev^2)) or ``uniform`` (libffm's U(0, 1/sqrt(k))).
      init_stddev: stddev of the normal initializer.
    """

    def __init__(self, num_features: int, num_fields: int, embedding_dim: int, linear_only_fields=(),
                 normalize: bool = False, l2: float = 0.0, init: str = "normal", init_stddev: float = 0.01,
                 **kwargs):
        super().__init__(**kwargs)
        if embedding_dim < 1 or num_fields < 1 or num_features < 1:
            raise ValueError(f"FFM needs positive sizes, got features={num_features} fields={num_fields} "
                             f"k={embedding_dim}")
        if init not in ("normal", "uniform"):
            raise ValueError(f"init must be normal or uniform, got {init!r}")
        self.num_features = num_features
        self.num_fields = num_fields
        self.embedding_dim = embedding_dim
        self.linear_only_fields = tuple(int(f) for f in linear_only_fields)
        self.normalize = normalize
        self.l2 = l2
        self.init = init
        self.init_stddev = init_stddev

    def build(self, input_shape):
        if self.init == "uniform":
            initializer = keras.initializers.RandomUniform(0.0, 1.0 / float(self.embedding_dim) ** 0.5)
        else:
            initializer = keras.initializers.RandomNormal(stddev=self.init_stddev)
        self.v = self.add_weight(name="v", shape=(self.num_features, self.num_fields, self.embedding_dim),
                                 initializer=initializer)
        super().build(input_shape)

    def call(self, features):
        ids, x, fields, present = dense_parts(features)
        crossed = present * _not_in(fields, self.linear_only_fields)
        x = x * crossed
        n = tf.shape(ids)[1]
        rows = tf.gather(self.v, ids)                                    # [B, n, F, k]
        # v[b, i, j] = latent vector of feature i against the field of feature j.
        target = tf.broadcast_to(fields[:, None, :], tf.stack([tf.shape(ids)[0], n, n]))
        v = tf.gather(rows, target, axis=2, batch_dims=2)                # [B, n, n, k]
        dots = tf.reduce_sum(v * tf.transpose(v, [0, 2, 1, 3]), axis=-1)  # <v_{i,f_j}, v_{j,f_i}>
        upper = tf.linalg.band_part(tf.ones(tf.stack([n, n])), 0, -1) - tf.eye(n)  # i < j
        xx = x[:, :, None] * x[:, None, :]
        out = tf.reduce_sum(dots * xx * upper, axis=[1, 2])
        if self.normalize:
            out = out / tf.maximum(tf.reduce_sum(tf.square(x), axis=1), 1e-12)
        if self.l2:
            uses = crossed[:, :, None] * crossed[:, None, :] * (1.0 - tf.eye(n))  # i != j, both crossed
            penalty = 0.5 * self.l2 * tf.reduce_sum(tf.reduce_sum(tf.square(v), -1) * uses)
            self.add_loss(penalty / tf.cast(tf.shape(ids)[0], tf.float32))
        return out[:, None]

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features, "num_fields": self.num_fields,
                "embedding_dim": self.embedding_dim, "linear_only_fields": list(self.linear_only_fields),
                "normalize": self.normalize, "l2": self.l2, "init": self.init, "init_stddev": self.init_stddev}


def _not_in(fields, excluded):
    """1.0 where the field id is not in ``excluded`` (same shape as ``fields``)."""
    if not excluded:
        return tf.ones_like(fields, tf.float32)
    hit = tf.reduce_any(tf.equal(fields[..., None], tf.constant(excluded, tf.int64)), axis=-1)
    return 1.0 - tf.cast(hit, tf.float32)
