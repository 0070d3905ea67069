"""Raw tf.Examples as a client sends them: one feature per schema field, named as the field.

The Example contract (docs/SERVING.md gives it as proto fields):

* a categorical field ``f``: ``bytes_list`` of its keys exactly as the log writes them (several
  keys: multi-hot); if a key's value in the log is not 1, the parallel ``float_list`` feature
  ``f:value`` holds one value per key (no ``f:value``: every value is 1);
* a sequence field (``hist``): ``bytes_list`` of its keys in order (most recent first), keys of the
  field named by its ``vocabulary_of`` (``item`` keys); the graph keeps the first ``max_length``;
* a ``binned`` or ``numeric`` field: ``float_list`` with the raw number;
* an absent field is missing, as in the ETL;
* a vector field (``schema.vector_fields``, e.g. ``item_vec``) is not sent: the graph joins its
  vectors from the export's copy of its table by the key field's keys (the featurization layer);
* columns of an entity table (``schema.entity_tables``) that the Example lacks are joined in the
  graph from the export's copy of the table, by the keys of the table's key field;
* any other feature key is refused: ``InvalidArgumentError`` naming the key.

Keys are hashed in the graph (``feature_hash(f, key)`` as ``Fingerprint64("f=" + key)``; a
sequence's keys with its ``vocabulary_of`` field's name, ``Fingerprint64("item=" + key)``), so the
entries this module produces are exactly the ETL's record entries ``(hash, value, field id)``; the
featurizer then maps them to rows. Within an example, entries come in this order: the categorical
fields (schema order), the binned and numeric fields, then the joined columns.
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
    """Flat features of a batch, all ``[n]``: example index, hash, value, field id, the key strings
    of the categorical ones (empty for value fields) and, for a column joined from an entity table,
    the field id of the table's key field (``via``; -1 for the Example's own features)."""

    _PARTS = ("ex", "hashes", "values", "fids", "keys", "via")

    def __init__(self, ex, hashes, values, fids, keys, via=None):
        self.ex, self.hashes, self.values, self.fids, self.keys = ex, hashes, values, fids, keys
        self.via = tf.fill(tf.shape(ex), tf.constant(-1, tf.int64)) if via is None else via

    @staticmethod
    def concat(parts: list["Entries"]) -> "Entries":
        return Entries(*(tf.concat([getattr(p, a) for p in parts], axis=0) for a in Entries._PARTS))

    def gather(self, idx) -> "Entries":
        return Entries(*(tf.gather(getattr(self, a), idx) for a in Entries._PARTS))


class _Join(tf.Module):
    """One entity table in the graph: key -> row, and each column's cells by row."""

    def __init__(self, schema: Schema, table, field_ids: dict, value_fields: set):
        super().__init__(name=f"join_{table.name}")
        rows = tables.read_table(schema.table_file(table), table.key_column, table.columns)
        keys = list(rows)
        self.key_field = table.key_field
        self.key_fid = field_ids[table.key_field]
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
        self.allowed_table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(self.allowed), tf.ones([len(self.allowed)], tf.int64)), default_value=0)
        self.joins = [_Join(schema, t, self.field_ids, self.value_fields) for t in schema.entity_tables] if join else []
        self.cat_fields = tuple(f for f in self.fields if f.kind == "categorical")
        self.num_fields = tuple(f for f in self.fields if f.kind != "categorical")

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
        known = self.allowed_table.lookup(keys) > 0
        return tf.debugging.Assert(tf.reduce_all(known), [
            "tf.Example feature keys that are not fields of the model's schema:", tf.boolean_mask(keys, ~known),
            "the schema's fields:", tf.constant(self.allowed)], summarize=20)

    def entries(self, serialized: tf.Tensor) -> tuple[Entries, tf.Tensor]:
        """(entries of the Examples with their joins, batch size) of serialized raw Examples ``[batch]``.

        All fields of a kind are handled at once (one sparse concat, one hash, one lookup), not
        field by field: a small request's cost is mostly the number of graph ops.
        """
        parsed = parse_examples(serialized, self.spec())
        # After the parse, which reports bytes that are not an Example as InvalidArgument.
        with tf.control_dependencies([t.values for t in parsed.values()]):
            check = self.check_keys(serialized)
        batch = tf.shape(serialized, out_type=tf.int64)[0]
        parts = []
        if self.cat_fields:
            parts.append(self._categorical_entries(parsed, batch))
        if self.num_fields:
            parts.append(self._number_entries(parsed))
        with tf.control_dependencies([check]):
            own = Entries.concat(parts) if len(parts) > 1 else parts[0]
            own = Entries(tf.identity(own.ex), own.hashes, own.values, own.fids, own.keys)
        if not self.joins:
            return own, batch
        nf = len(self.fields)
        present = tf.math.unsorted_segment_max(tf.ones_like(own.ex, tf.int32), own.ex * nf + own.fids, batch * nf)
        present = tf.reshape(present > 0, tf.stack([batch, nf]))
        key_of = {}
        for join in self.joins:
            if join.key_field not in key_of:
                keep = tf.where(tf.equal(own.fids, self.field_ids[join.key_field]))[:, 0]
                key_of[join.key_field] = own.gather(keep)
        joined = [e for join in self.joins for e in self._join_entries(join, key_of[join.key_field], present)]
        return Entries.concat([own] + joined), batch

    def _categorical_entries(self, parsed, batch) -> Entries:
        """Every categorical field's keys, hashed at once; values from the ``f:value`` companions."""
        fields = self.cat_fields
        keys, slot, col = _concat([parsed[f.name] for f in fields])
        vals, vslot, vcol = _concat([parsed[value_feature(f.name)] for f in fields])
        ex = keys.indices[:, 0]
        fids = tf.gather(tf.constant([f.id for f in fields], tf.int64), slot)
        # A sequence of another field's keys (vocabulary_of) hashes them as that field's features.
        prefixes = tf.constant([f.key_namespace + "=" for f in fields])
        hashes = _fingerprint(tf.strings.join([tf.gather(prefixes, slot), keys.values]))
        # Values: the f:value entry at the same (example, field, position), 1 without one.
        n = len(fields)
        vex = vals.indices[:, 0]
        nk = tf.math.unsorted_segment_sum(tf.ones_like(ex), ex * n + slot, batch * n)
        nv = tf.math.unsorted_segment_sum(tf.ones_like(vex), vex * n + vslot, batch * n)
        bad = tf.reshape((nv != 0) & (nv != nk), tf.stack([batch, n]))
        check = tf.debugging.Assert(~tf.reduce_any(bad), [
            "a <field>:value feature must hold one value per key of <field>; offending fields:",
            tf.boolean_mask(tf.constant([value_feature(f.name) for f in fields]), tf.reduce_any(bad, axis=0))],
            summarize=20)
        width = tf.maximum(tf.reduce_max(tf.concat([nk, [0]], 0)), 1)
        dense = tf.scatter_nd(tf.stack([vex, vslot, vcol], 1), vals.values - 1.0, tf.stack([batch, n, width]))
        with tf.control_dependencies([check]):
            values = tf.gather_nd(dense, tf.stack([ex, slot, col], 1)) + 1.0
        return Entries(ex, hashes, values, fids, keys.values)

    def _number_entries(self, parsed) -> Entries:
        """Every binned/numeric field's numbers: hash of the field's value key, the raw value."""
        fields = self.num_fields
        nums, slot, _ = _concat([parsed[f.name] for f in fields])
        hashes = tf.gather(tf.constant([feature_hash(f.name, rules.value_key(f.name)) for f in fields], tf.int64),
                           slot)
        fids = tf.gather(tf.constant([f.id for f in fields], tf.int64), slot)
        return Entries(nums.indices[:, 0], hashes, nums.values, fids, tf.fill(tf.shape(slot), ""))

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
            e.via = tf.fill(tf.shape(e.ex), tf.constant(join.key_fid, tf.int64))
            out.append(e.gather(tf.where(keep)[:, 0]))
        return out


def parse_examples(serialized: tf.Tensor, spec: dict) -> dict:
    """``tf.io.parse_example(serialized, spec)``, parsed in the calling thread.

    ``ParseExample`` cuts any batch of 8 or more Examples into at least 8 minibatches and hands all
    but one to the intra-op pool, even a pool of one thread, then waits for them. ``ParseSequenceExample``
    reads its context the same way without that hand-off, and a serialized ``tf.Example`` is a
    ``SequenceExample`` with only a context: both messages' field 1 is a ``Features``. The hand-off
    cost a DeepFM request of 10 to 100 Examples 0.1-0.15 ms (``python -m bench.bench_parse``). A
    feature of the wrong type fails as ``Context feature: <key>. Data types don't match``.
    """
    context, _, _ = tf.io.parse_sequence_example(serialized, context_features=spec)
    return context


def _fingerprint(strings):
    return tf.bitcast(tf.fingerprint(strings), tf.int64)


def _concat(sparse: list):
    """(the fields' SparseTensors side by side, field slot of each entry, its position in its field).

    ``tf.sparse.concat`` along the columns keeps the entries sorted by example, then field; an
    entry's field is found from the column offsets of the fields' widths.
    """
    if len(sparse) == 1:
        sp = sparse[0]
        return sp, tf.zeros_like(sp.indices[:, 0]), sp.indices[:, 1]
    cat = tf.sparse.concat(axis=1, sp_inputs=sparse)
    ends = tf.cumsum(tf.stack([sp.dense_shape[1] for sp in sparse]))
    col = cat.indices[:, 1]
    slot = tf.searchsorted(ends, col, side="right", out_type=tf.int64)
    start = tf.gather(tf.concat([[0], ends[:-1]], 0), slot)
    return cat, slot, col - start


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
