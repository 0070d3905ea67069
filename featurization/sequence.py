"""Positions of a sequence field's entries in the sparse batch (``feature_schema.rules``: sequences).

A sequence field's keys (the user's last clicked items, most recent first) are entries of the sparse
batch like any multi-hot field's, in their order. Its position ``j`` in an example is the j-th entry
of that field there; only positions below ``max_length`` count. These helpers find them; the
featurization layer uses them to drop what lies beyond ``max_length`` and to lay out the vectors of a
sequence's keys, and ``trainer.models.sequence`` to turn a sequence into ``[batch, max_length]`` rows.
"""
from __future__ import annotations

import tensorflow as tf


def ranks_within(keys: tf.Tensor) -> tf.Tensor:
    """For each entry, how many earlier entries (in the given order) have the same key.

    Args:
      keys: ``[n]`` int64.

    Returns:
      ``[n]`` int64 ranks: 0 for the first entry of each key, 1 for the second, ...
    """
    order = tf.argsort(keys, stable=True)
    sorted_keys = tf.gather(keys, order)
    first = tf.searchsorted(sorted_keys, sorted_keys, side="left", out_type=tf.int64)
    rank_sorted = tf.range(tf.size(keys, out_type=tf.int64)) - first
    return tf.scatter_nd(tf.cast(order[:, None], tf.int64), rank_sorted, tf.shape(keys, out_type=tf.int64))


def within_max_length(ex: tf.Tensor, fids: tf.Tensor, max_length: tf.Tensor, num_fields: int) -> tf.Tensor:
    """Which entries to keep: all but a sequence field's entries after the first ``max_length`` of an example.

    Args:
      ex: ``[n]`` int64 example of each entry; entries of one example and field in their order.
      fids: ``[n]`` int64 field ids.
      max_length: ``[num_fields]`` int64, a field's longest sequence (a large number for other fields).
      num_fields: fields of the schema.

    Returns:
      ``[n]`` bool.
    """
    rank = ranks_within(ex * num_fields + fids)
    return rank < tf.gather(max_length, fids)


def sequence_slots(indices: tf.Tensor, fids: tf.Tensor, field_id: int, max_length: int):
    """(entry index, example, position) of the first ``max_length`` entries of one field per example.

    Args:
      indices: ``[n, 2]`` int64 (example, column) of the sparse batch's entries.
      fids: ``[n]`` int64 field id of each entry.
      field_id: the sequence field.
      max_length: L; later entries of the field are left out.

    Returns:
      Three ``[m]`` int64 tensors: the selected entries' indices into the ``n`` entries, their
      examples, and their positions ``0..L-1`` in the field (by column order within the example).
    """
    sel = tf.where(tf.equal(fids, field_id))[:, 0]
    idx = tf.gather(indices, sel)
    width = tf.reduce_max(tf.concat([idx[:, 1] + 1, [1]], axis=0))
    # Sort by (example, column), then rank within the example: the field's order in each example.
    order = tf.argsort(idx[:, 0] * width + idx[:, 1], stable=True)
    sel, ex = tf.gather(sel, order), tf.gather(idx[:, 0], order)
    pos = ranks_within(ex)
    keep = tf.where(pos < max_length)[:, 0]
    return tf.gather(sel, keep), tf.gather(ex, keep), tf.gather(pos, keep)


def dense_sequence(values: tf.Tensor, indices: tf.Tensor, fids: tf.Tensor, batch: tf.Tensor, field_id: int,
                   max_length: int):
    """One field's entries as ``[batch, max_length, ...]`` by position, and the mask of real positions.

    Args:
      values: ``[n, ...]`` per-entry values (rows, vectors).
      indices, fids, field_id, max_length: as in ``sequence_slots``.
      batch: scalar int64, examples in the batch.

    Returns:
      (``[batch, max_length, ...]`` values, zero where no entry; ``[batch, max_length]`` bool mask).
    """
    sel, ex, pos = sequence_slots(indices, fids, field_id, max_length)
    where = tf.stack([ex, pos], axis=1)
    picked = tf.gather(values, sel)
    shape = tf.concat([tf.stack([batch, tf.constant(max_length, tf.int64)]),
                       tf.shape(values, out_type=tf.int64)[1:]], axis=0)
    dense = tf.scatter_nd(where, picked, shape)
    mask = tf.scatter_nd(where, tf.ones_like(ex, tf.int32), tf.stack([batch, tf.constant(max_length, tf.int64)])) > 0
    return dense, mask
