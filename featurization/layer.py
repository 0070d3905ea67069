"""The one featurization: hashed or raw features -> (vocabulary rows, values, field ids), in the graph.

TFX's transform-in-the-graph, built from the ETL's artifacts only (``schema.json``,
``vocabulary.tsv``). The trainer's input pipeline applies it to the ETL's records and the exported
SavedModel applies it to what a client sends, so training and serving cannot drift: no other code
maps a key to a row.

For each feature ``(field f, hash h, value v)`` (``feature_schema.rules`` states every rule):

* categorical: ``row = vocabulary[h]``, or ``rare[f]`` for a rare or unseen feature; value ``v``;
* binned: ``row = vocabulary[hash(f, "bin" + i)]`` (or ``rare[f]``) with ``i = #{edges_f <= v}``;
  value 1;
* numeric: ``row = vocabulary[h]`` (or ``rare[f]``); value ``(t_f(v) - mean_f) / std_f``;
* a field absent from an example (``schema.fill_missing``): ``rare[f]`` with value 1 (0 for a
  numeric field), appended after the example's own features in field order.

Multi-hot fields simply hold several features. The output is the sparse batch every model reads:
``{"ids", "values", "fields"}``, ``tf.SparseTensor``s of dense shape ``[batch, width]`` whose
entries are, per example, its features in input order and then its missing fields.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from feature_schema import Schema, feature_hash, field_hash, read_vocabulary
from feature_schema import rules
from featurization import raw

CATEGORICAL, BINNED, NUMERIC = 0, 1, 2
# Straight-line TF code: AutoGraph's conversion only costs tracing time (most of an export's save).
_no_autograph = tf.autograph.experimental.do_not_convert
_KINDS = {"categorical": CATEGORICAL, "binned": BINNED, "numeric": NUMERIC}


def fingerprint_int64(strings: tf.Tensor) -> tf.Tensor:
    """FarmHash Fingerprint64 of each string as int64: ``feature_schema.string_hash`` in the graph.

    ``tf.fingerprint`` returns the 8 bytes of the hash; read little-endian they are the same number
    as ``farmhash.fingerprint64`` (``tests/test_hashing.py``).
    """
    fp = tf.fingerprint(tf.reshape(strings, [-1]))
    return tf.reshape(tf.bitcast(fp, tf.int64), tf.shape(strings))


class Featurizer(tf.Module):
    """Maps features to the rows, values and field ids the models read (see the module docstring).

    Args:
      schema: the ETL's schema.
      vocabulary: the vocabulary entries (default: read ``schema.vocabulary_file()``).
      raw_examples: also parse raw tf.Examples (``from_examples``, ``from_context``), joining the
        schema's entity tables in the graph (reads the table files).
      extra_features: feature keys raw Examples may carry besides the fields (read by the caller).
    """

    def __init__(self, schema: Schema, vocabulary=None, raw_examples: bool = False, extra_features=(),
                 name: str = "featurizer"):
        super().__init__(name=name)
        self.schema = schema
        vocab = read_vocabulary(schema.vocabulary_file()) if vocabulary is None else list(vocabulary)
        row_of = {e.hash: e.index for e in vocab}
        self.num_fields = schema.num_fields
        self.vocabulary = _static_table(list(row_of), list(row_of.values()))
        self.field_table = _static_table([field_hash(f.name) for f in schema.fields],
                                         [f.id for f in schema.fields])
        fields = schema.fields
        rare = [f.rare_id for f in fields]
        self._rare = tf.constant(rare, tf.int64)
        self._kind = tf.constant([_KINDS[f.kind] for f in fields], tf.int32)
        self.has_binned = any(f.kind == "binned" for f in fields)
        self.has_numeric = any(f.kind == "numeric" for f in fields)
        self._missing_value = tf.constant([0.0 if f.kind == "numeric" else 1.0 for f in fields], tf.float32)
        self.fill_missing = schema.fill_missing
        if self.has_binned:
            self._edges, self._bin_rows = _bin_tables(fields, row_of)
        if self.has_numeric:
            self._mean, self._inv_std, self._log1p = _scaling_tables(fields)
        self.raw = raw.RawParser(schema, extra_features=extra_features) if raw_examples else None

    # ------------------------------------------------------------------ front ends

    @_no_autograph
    def from_examples(self, serialized: tf.Tensor) -> dict:
        """Featurizes serialized raw tf.Examples ``[batch]`` (``featurization.raw``'s contract).

        Raises:
          tf.errors.InvalidArgumentError: a feature key that is not a field, or malformed Examples.
        """
        e, batch = self.raw.entries(serialized)
        order, indices, shape = raw.sparse_layout(e.ex, batch)
        e = e.gather(order)
        return self.featurize(indices, shape, e.hashes, e.values, e.fids)

    @_no_autograph
    def from_context(self, context: tf.Tensor, examples: tf.Tensor) -> dict:
        """Featurizes N candidates that share one context Example (TF Ranking's ExampleListWithContext).

        Each candidate gets the context's fields it does not have itself (a candidate's field
        overrides the context's); a column the context joined from an entity table goes only to
        candidates that do not override the table's key field, so every result equals the flat
        path on the merged Example. The context is parsed, hashed, joined and looked up once.

        Args:
          context: scalar string, one serialized raw Example.
          examples: ``[N]`` serialized raw Examples.
        """
        ctx, _ = self.raw.entries(tf.reshape(context, [1]))
        cand, n = self.raw.entries(examples)
        ctx_rows, ctx_values = self.rows_and_values(ctx.hashes, ctx.values, ctx.fids)
        rows, values = self.rows_and_values(cand.hashes, cand.values, cand.fids)
        nf = tf.constant(self.num_fields, tf.int64)
        has = tf.math.unsorted_segment_max(tf.ones_like(cand.ex, tf.int32), cand.ex * nf + cand.fids, n * nf)
        has = tf.reshape(has > 0, tf.stack([n, nf]))
        # (candidate, context entry) pairs: the candidate lacks the entry's field (and the key field
        # it was joined through).
        via_has = tf.gather(tf.concat([has, tf.zeros([n, 1], tf.bool)], axis=1),
                            tf.where(ctx.via >= 0, ctx.via, nf), axis=1)
        take = tf.where(~tf.gather(has, ctx.fids, axis=1) & ~via_has)
        ex = tf.concat([cand.ex, take[:, 0]], axis=0)
        order, indices, shape = raw.sparse_layout(ex, n)
        merged = [tf.gather(tf.concat([a, tf.gather(b, take[:, 1])], axis=0), order)
                  for a, b in ((rows, ctx_rows), (values, ctx_values), (cand.fids, ctx.fids))]
        return self.assemble(indices, shape, *merged)

    @_no_autograph
    def from_records(self, hashes: tf.SparseTensor, values: tf.SparseTensor,
                     field_hashes: tf.SparseTensor) -> dict:
        """Featurizes the ETL's hashed records (parsed ``feat_hashes``, ``feat_vals``, ``feat_field_hashes``).

        Raises:
          tf.errors.InvalidArgumentError: a field hash that names no field of the schema.
        """
        fids = self.field_table.lookup(field_hashes.values)
        check = tf.debugging.Assert(tf.reduce_all(fids >= 0), [
            "feat_field_hashes holds field hashes that are not fields of the schema:",
            tf.boolean_mask(field_hashes.values, fids < 0)], summarize=10)
        with tf.control_dependencies([check]):
            fids = tf.identity(fids)
        return self.featurize(hashes.indices, hashes.dense_shape, hashes.values, values.values, fids)

    @_no_autograph
    def from_field_ids(self, hashes: tf.SparseTensor, values: tf.SparseTensor,
                       field_ids: tf.SparseTensor) -> dict:
        """Featurizes hashed features whose fields are given as schema field ids."""
        return self.featurize(hashes.indices, hashes.dense_shape, hashes.values, values.values, field_ids.values)

    # ------------------------------------------------------------------ the rules

    @_no_autograph
    def featurize(self, indices, dense_shape, hashes, values, fids) -> dict:
        """The whole mapping on flat features.

        Args:
          indices: ``[n, 2]`` int64 (example, position) of each feature; positions of an example are
            ``0..n_b-1``, examples in order (what ``tf.io.parse_example`` gives).
          dense_shape: ``[2]`` int64, ``(batch, width)``.
          hashes: ``[n]`` int64 feature hashes.
          values: ``[n]`` float32 values.
          fids: ``[n]`` int64 schema field ids (all valid).

        Returns:
          ``{"ids", "values", "fields"}`` sparse tensors (see the module docstring).
        """
        rows, values = self.rows_and_values(hashes, tf.cast(values, tf.float32), fids)
        return self.assemble(indices, dense_shape, rows, values, fids)

    def assemble(self, indices, dense_shape, rows, values, fids) -> dict:
        """The sparse batch of mapped features, with the missing fields' rows when the schema says so."""
        if not self.fill_missing:
            return _sparse(indices, dense_shape, rows, values, fids)
        return self._with_missing(indices, dense_shape[0], rows, values, fids)

    def rows_and_values(self, hashes, values, fids):
        """Vocabulary rows and model values of flat features (no missing fields)."""
        rare = tf.gather(self._rare, fids)
        rows = self.vocabulary.lookup(hashes)
        rows = tf.where(rows >= 0, rows, rare)
        if not (self.has_binned or self.has_numeric):
            return rows, values
        kind = tf.gather(self._kind, fids)
        if self.has_binned:
            # Bin = number of edges <= v (rules.bin_index); padding edges are +inf and never count.
            edges = tf.gather(self._edges, fids)
            b = tf.reduce_sum(tf.cast(edges <= values[:, None], tf.int64), axis=1)
            binned = tf.equal(kind, BINNED)
            rows = tf.where(binned, tf.gather_nd(self._bin_rows, tf.stack([fids, b], axis=1)), rows)
            values = tf.where(binned, tf.ones_like(values), values)
        if self.has_numeric:
            v = tf.where(tf.gather(self._log1p, fids), tf.sign(values) * tf.math.log1p(tf.abs(values)), values)
            scaled = (v - tf.gather(self._mean, fids)) * tf.gather(self._inv_std, fids)
            values = tf.where(tf.equal(kind, NUMERIC), scaled, values)
        return rows, values

    def _with_missing(self, indices, batch, rows, values, fids) -> dict:
        """Appends each example's missing fields (rare row) after its own features, in field order."""
        ex = indices[:, 0]
        nf = tf.constant(self.num_fields, tf.int64)
        present = tf.math.unsorted_segment_max(tf.ones_like(ex, tf.int32), ex * nf + fids, batch * nf)
        missing = tf.reshape(present <= 0, tf.stack([batch, nf]))       # empty segments give int32 min
        miss = tf.where(missing)                                         # [m, 2] (example, field), row-major
        own = tf.math.unsorted_segment_sum(tf.ones_like(ex), ex, batch)  # features per example
        n_miss = tf.reduce_sum(tf.cast(missing, tf.int64), axis=1)
        width = own + n_miss
        start = tf.cumsum(width, exclusive=True)
        m_ex, m_field = miss[:, 0], miss[:, 1]
        # k-th missing field of its example: position among the example's missing ones.
        k = tf.range(tf.shape(miss, out_type=tf.int64)[0]) - tf.gather(tf.cumsum(n_miss, exclusive=True), m_ex)
        m_col = tf.gather(own, m_ex) + k
        pos = [tf.cast(tf.gather(start, ex) + indices[:, 1], tf.int32), tf.cast(tf.gather(start, m_ex) + m_col, tf.int32)]
        out_idx = tf.dynamic_stitch(pos, [indices, tf.stack([m_ex, m_col], axis=1)])
        out = [tf.dynamic_stitch(pos, pair) for pair in (
            [rows, tf.gather(self._rare, m_field)],
            [values, tf.gather(self._missing_value, m_field)],
            [fids, m_field])]
        shape = tf.stack([batch, tf.reduce_max(tf.concat([width, [0]], axis=0))])
        return _sparse(tf.reshape(out_idx, [-1, 2]), shape, *out)


def _sparse(indices, dense_shape, rows, values, fids) -> dict:
    return {"ids": tf.SparseTensor(indices, rows, dense_shape),
            "values": tf.SparseTensor(indices, values, dense_shape),
            "fields": tf.SparseTensor(indices, fids, dense_shape)}


def _static_table(keys, values) -> tf.lookup.StaticHashTable:
    """int64 -> int64 table, -1 for absent keys."""
    init = tf.lookup.KeyValueTensorInitializer(tf.constant(np.array(keys, np.int64), tf.int64),
                                               tf.constant(np.array(values, np.int64), tf.int64))
    return tf.lookup.StaticHashTable(init, default_value=-1)


def _bin_tables(fields, row_of):
    """(edges [F, E] float32 padded with +inf, rows of bin i [F, E+1]) of the binned fields."""
    width = max([len(f.bin_boundaries or ()) for f in fields if f.kind == "binned"] + [1])
    edges = np.full([len(fields), width], np.inf, np.float32)
    rows = np.zeros([len(fields), width + 1], np.int64)
    for f in fields:
        rows[f.id, :] = f.rare_id
        if f.kind != "binned":
            continue
        b = np.array(f.bin_boundaries or (), np.float32)
        edges[f.id, :len(b)] = b
        for i in range(len(b) + 1):
            rows[f.id, i] = row_of.get(feature_hash(f.name, rules.bin_key(i)), f.rare_id)
    return tf.constant(edges), tf.constant(rows)


def _scaling_tables(fields):
    """(mean, 1/std, log1p?) per field of the numeric fields (identity elsewhere)."""
    mean = np.zeros(len(fields), np.float32)
    inv_std = np.ones(len(fields), np.float32)
    log1p = np.zeros(len(fields), bool)
    for f in fields:
        if f.kind != "numeric":
            continue
        stats = f.value_stats or {}
        mean[f.id] = stats.get("mean", 0.0)
        std = stats.get("std", 1.0)
        inv_std[f.id] = 1.0 / std if std > 0 else 1.0
        log1p[f.id] = f.transform == "log1p"
    return tf.constant(mean), tf.constant(inv_std), tf.constant(log1p)
