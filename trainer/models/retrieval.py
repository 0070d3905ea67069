"""Two-tower retrieval (DSSM-style): user and item towers, in-batch sampled softmax with logQ correction.

Huang et al., "Learning Deep Structured Semantic Models for Web Search using Clickthrough Data"
(DSSM, CIKM 2013): two towers map the query side and the document side to vectors scored by their
inner product. Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations" (RecSys 2019): train them with a softmax over the other items of the batch, each
logit corrected by the log of the item's sampling probability.

The ``two_tower`` model trains in ``trainer.train``'s ordinary loop: it is a Keras model whose
``compute_loss`` (called by Keras' own ``train_step`` and ``test_step``) adds the in-batch softmax
to the compiled loss. A batch holds impressions; the clicked ones are the queries, and the items of
*all* the batch's impressions are the candidates, so an item's chance of being a candidate is its
share of impressions, which is exactly the vocabulary's training count: ``q`` of the logQ
correction is then the true sampling probability, not an estimate. The compiled loss trains only a
two-scalar calibration ``sigmoid(a <u, v> / T + b)`` (the towers see none of its gradient), so the
model also reports a click probability, and the loop's AUC, log loss, early stopping and the ranking
exporter work unchanged.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from feature_schema import Schema, read_vocabulary
from trainer import layers
from trainer.models.base import RankingModel, register_model

USER_VECTOR = "user_vector"
ITEM_VECTOR = "item_vector"
# Logit of an accidental hit (another row of the positive's own item): out of every softmax.
_MASKED = -1e9


def in_batch_softmax_loss(query, candidates, positive, candidate_ids=None, log_q=None, temperature: float = 1.0,
                          weights=None):
    """Mean in-batch sampled softmax loss with logQ correction (Yi et al., RecSys 2019, eq. 3 and 4).

        l_ij = <x_i, y_j> / T - log q_j                  (j over the batch's candidates)
        loss_i = -log( exp(l_{i,p_i}) / sum_j exp(l_ij) )

    where ``p_i`` is the candidate column of query i's own item. A candidate holding the same item as
    ``p_i`` in another column (an "accidental hit") is dropped from query i's softmax: it is the
    positive, not a negative. The result is ``sum_i w_i loss_i / sum_i w_i`` (0 without queries).

    Args:
      query: ``[P, d]`` query vectors.
      candidates: ``[B, d]`` candidate vectors.
      positive: ``[P]`` int, the column of each query's positive in ``candidates``.
      candidate_ids: ``[B]`` int item ids of the candidates (accidental hits), or None.
      log_q: ``[B]`` log sampling probability of each candidate, or None (no correction).
      temperature: T.
      weights: ``[P]`` query weights, or None.

    Returns:
      A scalar float32.
    """
    logits = tf.matmul(query, candidates, transpose_b=True) / temperature
    if log_q is not None:
        logits -= log_q[None, :]
    positive = tf.cast(positive, tf.int64)
    if candidate_ids is not None:
        own = tf.gather(candidate_ids, positive)
        same = tf.equal(own[:, None], candidate_ids[None, :])
        not_self = tf.not_equal(positive[:, None], tf.range(tf.shape(candidates, out_type=tf.int64)[0])[None, :])
        logits = tf.where(same & not_self, tf.cast(_MASKED, logits.dtype), logits)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positive, logits=logits)
    w = tf.ones_like(loss) if weights is None else tf.cast(weights, loss.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(w * loss), tf.reduce_sum(w))


class Tower(keras.layers.Layer):
    """One tower of a two-tower model: an MLP and a linear map to d dimensions, optionally L2-normalised.

        y = W_out MLP(x) + b_out            (y / ||y|| with ``normalize``)

    (Huang et al., DSSM, CIKM 2013; Yi et al., RecSys 2019, who normalise and score with a temperature.)

    Input: ``[batch, n]``. Output: ``[batch, output_dim]``.

    Args:
      output_dim: d.
      hidden_units, activation, dropout, l2, seed: of the MLP (``l2`` also on the output kernel).
      normalize: divide by the L2 norm.
    """

    def __init__(self, output_dim: int, hidden_units=(), activation: str = "relu", dropout: float = 0.0,
                 l2: float = 0.0, normalize: bool = False, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if output_dim < 1:
            raise ValueError(f"output_dim must be >= 1, got {output_dim}")
        self.output_dim = output_dim
        self.normalize = normalize
        self.mlp = layers.MLP(hidden_units, activation, dropout, l2, seed, name="mlp")
        self.out = keras.layers.Dense(output_dim, kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
                                      name="out")

    def call(self, x, training=False):
        y = self.out(self.mlp(x, training=training))
        return tf.math.l2_normalize(y, axis=1) if self.normalize else y

    def get_config(self):
        c = self.mlp.get_config()
        return {**super().get_config(), "output_dim": self.output_dim, "normalize": self.normalize,
                **{k: c[k] for k in ("hidden_units", "activation", "dropout", "l2", "seed")}}


def item_log_q(schema: Schema, item_field: str) -> np.ndarray:
    """``log q`` per global row (0 outside ``item_field``): q = the row's share of training impressions.

    Counts are the vocabulary's training counts; the field's rare row holds the impressions of every
    item that kept no row of its own (the train split's examples minus the kept items' counts, at least 1).
    """
    field = schema.field(item_field)
    counts = {e.index: e.count for e in read_vocabulary(schema.vocabulary_file()) if e.field == item_field}
    examples = schema.splits.get("train", {}).get("examples") or sum(counts.values())
    counts[field.rare_id] = max(examples - sum(counts.values()), 1)
    total = float(sum(counts.values()))
    out = np.zeros(schema.num_features, np.float32)
    for row, n in counts.items():
        out[row] = np.log(n / total)
    return out


@register_model("two_tower")
class TwoTower(RankingModel):
    """Two-tower retrieval (DSSM; Yi et al. 2019): user and item towers, dot product, in-batch softmax + logQ."""

    def __init__(self, cfg, schema, tasks, **kwargs):
        super().__init__(cfg, schema, tasks, **kwargs)
        unknown = [n for n in (*cfg.user_fields, *cfg.item_fields) if n not in {f.name for f in schema.fields}]
        if unknown:
            raise ValueError(f"two_tower: model.user_fields/item_fields name {unknown}, not fields of the schema "
                             f"{[f.name for f in schema.fields]}")
        self.user_fields = self.field_ids(cfg.user_fields)
        self.item_fields = self.field_ids(cfg.item_fields)
        if not self.user_fields or not self.item_fields or set(self.user_fields) & set(self.item_fields):
            raise ValueError(f"two_tower needs disjoint, non-empty model.user_fields {list(cfg.user_fields)} and "
                             f"model.item_fields {list(cfg.item_fields)}")
        self.item_key_field = schema.field(cfg.item_fields[0])
        if self.item_key_field.kind != "categorical" or self.item_key_field.multi_hot:
            raise ValueError(f"two_tower: the item field {self.item_key_field.name!r} (first of model.item_fields) "
                             f"must be categorical with one key per example")
        self.embedding = self._embedding()
        self.user_cat, self.user_values = self._split_fields(self.user_fields, "user_values")
        self.item_cat, self.item_values = self._split_fields(self.item_fields, "item_values")
        tower = dict(hidden_units=cfg.hidden_units, activation=cfg.activation, dropout=cfg.dropout, l2=cfg.l2_dense,
                     normalize=cfg.normalize_towers)
        self.user_tower = Tower(cfg.tower_dim, name="user_tower", **tower)
        self.item_tower = Tower(cfg.tower_dim, name="item_tower", **tower)
        # Starts at the training click rate: its two scalars learn slowly at the towers' learning rate.
        rate = min(max(schema.labels[schema.label_names.index(self.tasks[0])].positive_rate, 1e-4), 1 - 1e-4)
        self.calibration = keras.layers.Dense(1, kernel_initializer="ones", name="calibration",
                                              bias_initializer=keras.initializers.Constant(np.log(rate / (1 - rate))))
        # A constant of today's vocabulary, not a variable: a warm start or checkpoint must not bring back
        # another vocabulary's counts. A config-only rebuild (from_config: no schema directory) has none.
        self.log_q = tf.constant(item_log_q(schema, self.item_key_field.name)) if schema.base_dir else None
        self.softmax_loss = keras.metrics.Mean(name="in_batch_softmax")
        self.total_loss = keras.metrics.Mean(name="two_tower_loss")

    @property
    def metrics(self):
        return super().metrics + [self.softmax_loss, self.total_loss]

    def compute_metrics(self, x, y, y_pred, sample_weight):
        # Keras' "loss" tracks only the compiled loss; report the whole objective under that name.
        out = super().compute_metrics(x, y, y_pred, sample_weight)
        out["loss"] = out.pop(self.total_loss.name)
        return out

    def user_vector(self, features, emb=None, training=False):
        """``[batch, tower_dim]`` user-tower vectors of a sparse batch (only ``user_fields`` are read)."""
        emb = self.embedding(features) if emb is None else emb
        return self.user_tower(self._deep_input(features, emb, self.user_cat, self.user_values), training=training)

    def item_vector(self, features, emb=None, training=False):
        """``[batch, tower_dim]`` item-tower vectors of a sparse batch (only ``item_fields`` are read)."""
        emb = self.embedding(features) if emb is None else emb
        return self.item_tower(self._deep_input(features, emb, self.item_cat, self.item_values), training=training)

    def item_rows(self, features):
        """``[batch]`` vocabulary row of each example's item (the field's rare row when absent)."""
        rows, ids, _, fields, batch = layers.sparse_parts(features)
        f = self.item_key_field
        keyed = tf.where(tf.equal(fields, f.id), ids, tf.cast(f.rare_id, tf.int64))
        # Rows of other fields count as the rare row, the field's lowest, so the max is the item's row.
        out = tf.math.unsorted_segment_max(keyed, rows, batch)
        return tf.maximum(out, f.rare_id)

    def call(self, features, training=False):
        emb = self.embedding(features)
        u = self.user_vector(features, emb, training)
        v = self.item_vector(features, emb, training)
        score = tf.reduce_sum(u * v, axis=1, keepdims=True) / self.cfg.temperature
        p = tf.sigmoid(tf.squeeze(self.calibration(tf.stop_gradient(score)), axis=1))
        return {self.tasks[0]: p, USER_VECTOR: u, ITEM_VECTOR: v}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        """The compiled loss (the calibration's log loss and the L2 terms) plus the in-batch softmax."""
        loss = super().compute_loss(x, y, y_pred, sample_weight)
        task = self.tasks[0]
        clicked = tf.reshape(y[task] > 0.5, [-1])
        w = sample_weight[task] if isinstance(sample_weight, dict) else sample_weight
        w = tf.ones_like(y[task]) if w is None else w
        items = self.item_rows(x)
        if self.cfg.logq_correction and self.log_q is None:
            raise ValueError("two_tower: logQ needs the vocabulary's counts; build the model from a schema loaded "
                             "from its ETL directory (feature_schema.load_schema)")
        softmax = in_batch_softmax_loss(
            tf.boolean_mask(y_pred[USER_VECTOR], clicked), y_pred[ITEM_VECTOR],
            tf.boolean_mask(tf.range(tf.shape(items, out_type=tf.int64)[0]), clicked), items,
            tf.gather(self.log_q, items) if self.cfg.logq_correction else None,
            self.cfg.temperature, tf.boolean_mask(tf.reshape(w, [-1]), clicked))
        self.softmax_loss.update_state(softmax)
        self.total_loss.update_state(loss + softmax, sample_weight=tf.cast(tf.size(items), tf.float32))
        return loss + softmax
