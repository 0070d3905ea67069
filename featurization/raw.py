"""Raw tf.Examples as a client sends them: one feature per schema field, named as the field.

The Example contract (docs/SERVING.md gives it as proto fields):

* a categorical field ``f``: ``bytes_list`` of its keys exactly as the log writes them (several
  keys: multi-hot); if a key's value in the log is not 1, the parallel ``float_list`` feature
  ``f:value`` holds one value per key (no ``f:value``: every value is 1);
* a ``binned`` or ``numeric`` field: ``float_list`` with the raw number;
* an absent field is missing, as in the ETL;
* columns of an entity table (``schema.entity_tables``) that the Example lacks are joined in the
  graph from the export's copy of the table, by the keys of the table's key field;
* any other feature key is refused: ``InvalidArgumentError`` naming the key.

Keys are hashed in the graph (``feature_hash(f, key)`` as ``Fingerprint64("f=" + key)``), so the
entries this module produces are exactly the ETL's record entries ``(hash, value, field id)``; the
featurizer then maps them to rows. Within an example, entries come in schema field order, then the
joined columns.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from feature_schema import Schema, feature_hash
from feature_schema import rules, tables

VALUE_SUFFIX = ":value"  # serving.protocol.VALUE_SUFFIX, what clients send; a test checks they agree


def value_feature(field: str) -> str:
    """Name of the parallel float feature of a categorical field's values."""
    return field + VALUE_SUFFIX


class Entries:
    """Flat features of a batch: example index, hash, value, field id, and the key strings of the
    categorical ones (empty for value fields), all ``[n]``, grouped by source."""

    def __init__(self, ex, hashes, values, fids, keys):
        self.ex, self.hashes, self.values, self.fids, self.keys = ex, hashes, values, fids, keys

    @staticmethod
    def concat(parts: list["Entries"]) -> "Entries":
        return Entries(*(tf.concat([getattr(p, a) for p in parts], axis=0)
                         for a in ("ex", "hashes", "values", "fids", "keys")))

    def gather(self, idx) -> "Entries":
        return Entries(*(tf.gather(getattr(self, a), idx) for a in ("ex", "hashes", "values", "fids", "keys")))


class _Join(tf.Module):
    """One entity table in the graph: key -> row, and each column's cells by row."""

    def __init__(self, schema: Schema, table, field_ids: dict, value_fields: set):
        super().__init__(name=f"join_{table.name}")
        rows = tables.read_table(schema.table_file(table), table.key_column, table.columns)
        keys = list(rows)
        self.key_field = table.key_field
        self.size = len(keys)
        self.index = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(keys or [""], tf.string),
                                                tf.constant(np.arange(len(keys)) if keys else [-1], tf.int64)),
            default_value=-1)
        self.columns = []  # (field name, field id, is value field, cells)
        for j, col in enumerate(table.columns):
            if col not in field_ids:
                continue  # a column the schema does not know (e.g. a fixed vocabulary without it)
            cells = [rows[k][j] for k in keys]
            if col in value_fields:
                vals = np.array([_number(c) for c in cells], np.float32)
                self.columns.append((col, field_ids[col], True, tf.constant(vals if keys else [np.nan])))
            else:
                self.columns.append((col, field_ids[col], False, tf.constant(cells or [""], tf.string)))


def _number(cell: str) -> float:
    """A value cell as the record would hold it; empty or malformed cells are missing (NaN)."""
    try:
        v = float(cell)
    except ValueError:
        return math.nan
    return rules.to_float32(v) if math.isfinite(v) else math.nan


class RawParser(tf.Module):
    """Parses raw tf.Examples into ``Entries`` (see the module docstring).

    Args:
      schema: the ETL's schema; its ``entity_tables`` are joined when ``join`` is True.
      join: build the in-graph joins (reads the table files named by the schema).
      extra_features: further feature keys the Examples may carry (read by the caller, e.g. a bid).
    """

    def __init__(self, schema: Schema, join: bool = True, extra_features=()):
        super().__init__(name="raw_parser")
        self.fields = tuple(schema.fields)
        self.field_ids = {f.name: f.id for f in schema.fields}
        self.value_fields = {f.name for f in schema.fields if f.kind != "categorical"}
        self.allowed = tuple(f.name for f in self.fields) + tuple(
            value_feature(f.name) for f in self.fields if f.kind == "categorical") + tuple(extra_features)
        self.joins = [_Join(schema, t, self.field_ids, self.value_fields) for t in schema.entity_tables] if join else []

    def spec(self) -> dict:
        """The ``tf.io.parse_example`` spec of the fields."""
        spec = {}
        for f in self.fields:
            if f.kind == "categorical":
                spec[f.name] = tf.io.VarLenFeature(tf.string)
                spec[value_feature(f.name)] = tf.io.VarLenFeature(tf.float32)
            else:
                spec[f.name] = tf.io.VarLenFeature(tf.float32)
        return spec

    def check_keys(self, serialized: tf.Tensor):
        """An op that fails with InvalidArgument naming every feature key that is not allowed."""
        _, (features,) = tf.io.decode_proto(serialized, "tensorflow.Example", ["features"], [tf.string])
        _, (entries,) = tf.io.decode_proto(tf.reshape(features, [-1]), "tensorflow.Features", ["feature"],
                                           [tf.string])
        _, (keys,) = tf.io.decode_proto(tf.reshape(entries, [-1]), "tensorflow.Features.FeatureEntry", ["key"],
                                        [tf.string])
        keys = tf.reshape(keys, [-1])
        keys = tf.boolean_mask(keys, tf.strings.length(keys) > 0)  # decode_proto pads with empty strings
        known = tf.reduce_any(tf.equal(keys[:, None], tf.constant(self.allowed)[None, :]), axis=1)
        return tf.debugging.Assert(tf.reduce_all(known), [
            "tf.Example feature keys that are not fields of the model's schema:", tf.boolean_mask(keys, ~known),
            "the schema's fields:", tf.constant(self.allowed)], summarize=20)

    def entries(self, serialized: tf.Tensor) -> tuple[Entries, tf.Tensor]:
        """(entries of the Examples with their joins, batch size) of serialized raw Examples ``[batch]``."""
        parsed = tf.io.parse_example(serialized, self.spec())
        # After the parse, which reports bytes that are not an Example as InvalidArgument.
        with tf.control_dependencies([t.values for t in parsed.values()]):
            check = self.check_keys(serialized)
        with tf.control_dependencies([check]):
            parsed = {k: tf.SparseTensor(t.indices, tf.identity(t.values), t.dense_shape) for k, t in parsed.items()}
        batch = tf.shape(serialized, out_type=tf.int64)[0]
        parts = [self._field_entries(f, parsed) for f in self.fields]
        present = tf.stack([tf.math.bincount(tf.cast(p.ex, tf.int32), minlength=tf.cast(batch, tf.int32),
                                             maxlength=tf.cast(batch, tf.int32)) > 0 for p in parts], axis=1)
        by_field = dict(zip((f.name for f in self.fields), parts))
        for join in self.joins:
            parts.extend(self._join_entries(join, by_field[join.key_field], present))
        return Entries.concat(parts), batch

    def _field_entries(self, f, parsed) -> Entries:
        sp = parsed[f.name]
        ex = sp.indices[:, 0]
        n = tf.shape(ex)[0]
        fid = tf.fill([n], tf.constant(f.id, tf.int64))
        if f.kind != "categorical":
            h = tf.fill([n], tf.constant(feature_hash(f.name, rules.value_key(f.name)), tf.int64))
            return Entries(ex, h, sp.values, fid, tf.fill([n], ""))
        keys = sp.values
        hashes = _fingerprint(tf.strings.join([f.name + "=", keys]))
        return Entries(ex, hashes, self._key_values(f, sp, parsed[value_feature(f.name)]), fid, keys)

    @staticmethod
    def _key_values(f, keys: tf.SparseTensor, vals: tf.SparseTensor):
        """The value of each key: 1, or the ``f:value`` entry at the same position (one per key)."""
        batch = tf.cast(keys.dense_shape[0], tf.int32)
        nk = tf.math.bincount(tf.cast(keys.indices[:, 0], tf.int32), minlength=batch, maxlength=batch)
        nv = tf.math.bincount(tf.cast(vals.indices[:, 0], tf.int32), minlength=batch, maxlength=batch)
        check = tf.debugging.Assert(tf.reduce_all((nv == 0) | (nv == nk)), [
            f"feature {value_feature(f.name)!r} must hold one value per key of {f.name!r} (or be absent)"])
        width = tf.maximum(keys.dense_shape[1], vals.dense_shape[1])
        dense = tf.scatter_nd(vals.indices, vals.values - 1.0, tf.stack([keys.dense_shape[0], width])) + 1.0
        with tf.control_dependencies([check]):
            return tf.gather_nd(dense, keys.indices)

    @staticmethod
    def _join_entries(join: _Join, key_entries: Entries, present) -> list[Entries]:
        """The table columns of every key of the join's key field, where the example lacks the column."""
        row = join.index.lookup(key_entries.keys)
        found = row >= 0
        safe = tf.maximum(row, 0)
        out = []
        for name, fid, is_value, cells in join.columns:
            keep = found & ~tf.gather(present[:, fid], key_entries.ex)
            cell = tf.gather(cells, safe)
            if is_value:
                keep &= ~tf.math.is_nan(cell)
                n = tf.shape(cell)[0]
                e = Entries(key_entries.ex, tf.fill([n], tf.constant(feature_hash(name, name), tf.int64)), cell,
                            tf.fill([n], tf.constant(fid, tf.int64)), tf.fill([n], ""))
            else:
                keep &= tf.strings.length(cell) > 0
                n = tf.shape(cell)[0]
                e = Entries(key_entries.ex, _fingerprint(tf.strings.join([name + "=", cell])),
                            tf.ones([n], tf.float32), tf.fill([n], tf.constant(fid, tf.int64)), cell)
            out.append(e.gather(tf.where(keep)[:, 0]))
        return out


def _fingerprint(strings):
    return tf.bitcast(tf.fingerprint(strings), tf.int64)


def sparse_layout(ex: tf.Tensor, batch: tf.Tensor):
    """(order, indices [n, 2], dense_shape) that group entries by example, keeping their order.

    ``order`` permutes the entries so that examples come in order and each example's entries keep
    their relative order; ``indices`` are then (example, position) with positions 0..n_b-1.
    """
    order = tf.argsort(ex, stable=True)
    ex_sorted = tf.gather(ex, order)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(ex_sorted), ex_sorted, batch)
    start = tf.cumsum(counts, exclusive=True)
    pos = tf.range(tf.shape(ex_sorted, out_type=tf.int64)[0]) - tf.gather(start, ex_sorted)
    shape = tf.stack([batch, tf.reduce_max(tf.concat([counts, [0]], axis=0))])
    return order, tf.stack([ex_sorted, pos], axis=1), shape
