"""MLR / LS-PLM: a softmax over m regions gating m logistic regressions, as a layer and the ``mlr`` model.

Gai et al., "Learning Piece-wise Linear Models from Large Scale Data for Ad Click Prediction"
(Alibaba's MLR, arXiv 1704.05194, 2017). Registered by ``trainer/models/__init__.py``.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from trainer import layers
from trainer.models.base import RankingModel, register_model


class PiecewiseLogistic(keras.layers.Layer):
    """LS-PLM's mixture of region-wise logistic regressions over the sparse features.

        p(y=1 | x) = sum_{j=1..m} softmax_j(u_j . x + a_j) * sigmoid(w_j . x + b_j + s . x_lin)

    ``u_j`` divides the feature space into m regions (the gate), ``w_j`` is region j's LR. Features of
    ``linear_only_fields`` (position-like biases, ``x_lin``) neither choose a region nor get a weight
    per region: one weight ``s`` shifts every region's logit alike, so they enter no cross, as in the
    project's FM. m = 1 is logistic regression.

    Input: sparse features. Output: ``[batch, 1]`` probabilities (not logits).

    L2 as ``Linear``: ``l2/2 * ||row||^2`` per use of a row of ``u``, ``w`` (and ``s``), divided by the
    batch size (L1 comes from the FTRL optimizer, ``optimizer.l1``, as for the other linear models).

    Args:
      num_features: rows of the tables (schema ``num_features``).
      num_regions: m.
      linear_only_fields: field ids with one shared weight and no place in the gate.
      l2: L2 on the rows a batch touches.
      init_stddev: stddev of the normal initializer of ``u`` and ``w``; not 0, or all regions start equal
        and stay equal (their gradients coincide).
    """

    def __init__(self, num_features: int, num_regions: int, linear_only_fields=(), l2: float = 0.0,
                 init_stddev: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if num_features < 1 or num_regions < 1:
            raise ValueError(f"PiecewiseLogistic needs features and regions >= 1, got {num_features}, {num_regions}")
        if init_stddev <= 0:
            raise ValueError(f"init_stddev must be > 0 (equal regions never separate), got {init_stddev}")
        self.num_features = num_features
        self.num_regions = num_regions
        self.linear_only_fields = tuple(int(f) for f in linear_only_fields)
        self.l2 = l2
        self.init_stddev = init_stddev

    def build(self, input_shape):
        init = keras.initializers.RandomNormal(stddev=self.init_stddev)
        m = self.num_regions
        self.u = self.add_weight(name="u", shape=(self.num_features, m), initializer=init)
        self.w = self.add_weight(name="w", shape=(self.num_features, m), initializer=init)
        self.gate_bias = self.add_weight(name="gate_bias", shape=(m,), initializer="zeros")
        self.region_bias = self.add_weight(name="region_bias", shape=(m,), initializer="zeros")
        if self.linear_only_fields:
            self.s = self.add_weight(name="s", shape=(self.num_features, 1), initializer="zeros")
        super().build(input_shape)

    def call(self, features):
        rows, ids, values, fields, batch = layers.sparse_parts(features)
        crossed = layers._not_in(fields, self.linear_only_fields)
        u = tf.nn.embedding_lookup(self.u, ids) * crossed[:, None]  # other fields: no row used, no L2
        w = tf.nn.embedding_lookup(self.w, ids) * crossed[:, None]
        gate = tf.math.unsorted_segment_sum(u * values[:, None], rows, batch) + self.gate_bias
        region = tf.math.unsorted_segment_sum(w * values[:, None], rows, batch) + self.region_bias
        used = [u, w]
        if self.linear_only_fields:
            s = tf.nn.embedding_lookup(self.s, ids) * (1.0 - crossed)[:, None]
            region += tf.math.unsorted_segment_sum(s * values[:, None], rows, batch)
            used.append(s)
        if self.l2:
            self.add_loss(tf.add_n([layers._touched_l2(t, self.l2) for t in used]) / tf.cast(batch, tf.float32))
        p = tf.reduce_sum(tf.nn.softmax(gate, axis=1) * tf.sigmoid(region), axis=1, keepdims=True)
        return p

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features, "num_regions": self.num_regions,
                "linear_only_fields": list(self.linear_only_fields), "l2": self.l2,
                "init_stddev": self.init_stddev}


@register_model("mlr")
class MLR(RankingModel):
    """MLR / LS-PLM (Gai et al. 2017): softmax over ``model.num_regions`` regions x region-wise LR."""

    def __init__(self, cfg, schema, tasks, **kwargs):
        super().__init__(cfg, schema, tasks, **kwargs)
        self.plm = PiecewiseLogistic(self.num_features, cfg.num_regions, self.linear_only_fields,
                                     l2=cfg.l2_linear, name="plm")

    def call(self, features, training=False):
        return {self.tasks[0]: tf.squeeze(self.plm(features), axis=1)}
