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
  numeric field), appended after the example's own features in field order;
* a sequence field: its features keep their order; those after its first ``max_length`` in an
  example are dropped (the ETL's truncation, applied to any request); a sequence with
  ``vocabulary_of`` arrives hashed as that field's features, so its keys find that field's rows.

Multi-hot fields simply hold several features. The output is the sparse batch every model reads:
``{"ids", "values", "fields"}``, ``tf.SparseTensor``s of dense shape ``[batch, width]`` whose
entries are, per example, its features in input order and then its missing fields.

The dense layout (``from_dense_records``, the training pipeline's ``data.dense_ids``) gives the
same features, split: the fields that hold one feature per example (``schema.single_field_ids``:
not ``multi_hot``; with ``fill_missing``, exactly one after the missing ones are added) as dense
``[batch, S]`` tensors ``"dense_ids"``, ``"dense_values"``, ``"dense_fields"`` (column j: the j-th
such field, its row and value, or its rare row and missing value), and only the multi-hot fields'
features in the sparse ``{"ids", "values", "fields"}`` (width 0 when there are none). Same rules,
same rows: the dense layout only places them differently, without the sparse bookkeeping.

With vector fields (``schema.vector_fields``: e.g. ``item_vec``, d floats per item) the batch also
holds ``"vectors"``: ``vectors[key_field][v]`` is ``[batch, d]``, the vector of the example's key
(``item``; zeros for a key the table lacks or a missing field), and for a sequence field whose
``vocabulary_of`` is the key field, ``vectors[sequence][v]`` is ``[batch, max_length, d]``, the
vectors of its keys by position (zeros where the table lacks a key and after the sequence's end).
The table is a graph constant (``[rows + 1, d]``, the last row zeros) looked up by
``feature_hash(key_field, key)``: a key needs no vocabulary row to have a vector.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from feature_schema import Schema, feature_hash, field_hash, read_vocabulary
from feature_schema import rules, tables
from featurization import raw, sequence

CATEGORICAL, BINNED, NUMERIC = 0, 1, 2
# Straight-line TF code: AutoGraph's conversion only costs tracing time (most of an export's save).
_no_autograph = tf.autograph.experimental.do_not_convert
_KINDS = {"categorical": CATEGORICAL, "binned": BINNED, "numeric": NUMERIC}
VECTORS = "vectors"
DENSE_IDS, DENSE_VALUES, DENSE_FIELDS = "dense_ids", "dense_values", "dense_fields"
# Field hash of the padding of densely parsed records (``from_dense_records``); no field may hash to it.
PAD_FIELD_HASH = 0
_NO_LIMIT = np.iinfo(np.int64).max


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
        self.sequences = {f.id: f.max_length for f in fields if f.sequence}
        self._max_length = tf.constant([f.max_length if f.sequence else _NO_LIMIT for f in fields], tf.int64)
        self.vector_tables = [_VectorTable(schema, v) for v in schema.vector_fields]
        self.raw = raw.RawParser(schema, extra_features=extra_features) if raw_examples else None
        self._init_dense(schema)

    def _init_dense(self, schema: Schema) -> None:
        """Constants of the dense layout: each field's column among the single-valued fields (-1: multi-hot)."""
        fields = schema.fields
        if any(field_hash(f.name) == PAD_FIELD_HASH for f in fields):
            raise ValueError(f"a field name hashes to the padding field hash {PAD_FIELD_HASH}")
        self.single_fields = schema.single_field_ids
        self.has_multi_hot = len(self.single_fields) < len(fields)
        slot = np.full(len(fields), -1, np.int64)
        slot[list(self.single_fields)] = np.arange(len(self.single_fields))
        self._slot = tf.constant(slot)
        self._single_fids = tf.constant(self.single_fields, tf.int64)
        self._single_rare = tf.constant([fields[f].rare_id for f in self.single_fields], tf.int64)
        self._single_missing = tf.constant([0.0 if fields[f].kind == "numeric" else 1.0
                                            for f in self.single_fields], tf.float32)
        self._multi_hot = tf.constant([f.multi_hot for f in fields], tf.bool)

    def output_signature(self) -> dict:
        """The ``tf.TypeSpec`` structure of the featurized batch (what a model's traced call takes)."""
        sig = {k: tf.SparseTensorSpec([None, None], dt) for k, dt in (("ids", tf.int64), ("values", tf.float32),
                                                                       ("fields", tf.int64))}
        if self.vector_tables:
            out: dict = {}
            for t in self.vector_tables:
                out.setdefault(t.key_field, {})[t.field] = tf.TensorSpec([None, t.dim], tf.float32)
                for s, length in t.sequences:
                    out.setdefault(s, {})[t.field] = tf.TensorSpec([None, length, t.dim], tf.float32)
            sig[VECTORS] = out
        return sig

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
        if self.sequences:
            ctx = ctx.gather(tf.where(self._within_max_length(ctx.ex, ctx.fids))[:, 0])
            cand = cand.gather(tf.where(self._within_max_length(cand.ex, cand.fids))[:, 0])
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
        pairs = [(rows, ctx_rows), (values, ctx_values), (cand.fids, ctx.fids)]
        if self.vector_tables:
            pairs.append((self.vector_rows(cand.hashes, cand.fids), self.vector_rows(ctx.hashes, ctx.fids)))
        merged = [tf.gather(tf.concat([a, tf.gather(b, take[:, 1])], axis=0), order) for a, b in pairs]
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

    @_no_autograph
    def from_dense_records(self, hashes: tf.Tensor, values: tf.Tensor, field_hashes: tf.Tensor) -> dict:
        """Featurizes the ETL's hashed records parsed densely, into the dense layout (module docstring).

        Args:
          hashes, values, field_hashes: ``[batch, L]`` feature hashes, values and field hashes of each
            record, padded at the end with field hash ``PAD_FIELD_HASH`` (``tf.io.parse_example`` with
            ``FixedLenSequenceFeature(allow_missing=True)``, as ``trainer.data`` parses).

        Raises:
          ValueError: a schema without ``fill_missing`` (a single-valued field would have no row to
            hold when absent) or with vector fields.
          tf.errors.InvalidArgumentError: a field hash that names no field of the schema, or a field
            that is not ``multi_hot`` with several features in one record.
        """
        if not self.fill_missing or self.vector_tables:
            raise ValueError("the dense layout needs a schema with fill_missing and without vector fields")
        real = tf.reshape(tf.not_equal(field_hashes, PAD_FIELD_HASH), [-1])
        fids = self.field_table.lookup(tf.reshape(field_hashes, [-1]))
        check = tf.debugging.Assert(tf.reduce_all((fids >= 0) | ~real), [
            "feat_field_hashes holds field hashes that are not fields of the schema:",
            tf.boolean_mask(tf.reshape(field_hashes, [-1]), (fids < 0) & real)], summarize=10)
        with tf.control_dependencies([check]):
            fids = tf.where(real, fids, 0)  # padding: any field, masked out below
        batch, width = tf.unstack(tf.shape(hashes, out_type=tf.int64))
        rows, vals = self.rows_and_values(tf.reshape(hashes, [-1]), tf.cast(tf.reshape(values, [-1]), tf.float32),
                                          fids)
        ex = tf.reshape(tf.broadcast_to(tf.range(batch)[:, None], tf.stack([batch, width])), [-1])
        slot = tf.where(real, tf.gather(self._slot, fids), -1)
        out = self._dense(ex, slot, rows, vals, batch)
        out.update(self._multi_hot_part(ex, real & (slot < 0), rows, vals, fids, batch))
        return out

    def _dense(self, ex, slot, rows, values, batch) -> dict:
        """``[batch, S]`` rows, values and field ids of the single-valued fields from flat entries
        (``slot``: the entry's column, -1 for an entry of another field or padding)."""
        s = len(self.single_fields)
        n = batch * s + 1  # the last segment takes every other entry and is dropped
        seg = tf.where(slot >= 0, ex * s + slot, n - 1)
        count = tf.math.unsorted_segment_sum(tf.ones_like(seg, tf.int32), seg, n)[:-1]
        check = tf.debugging.Assert(tf.reduce_all(count <= 1), [
            "a field that is not multi_hot holds several features in one example; field ids:",
            tf.gather(self._single_fids, tf.math.floormod(tf.where(count > 1)[:, 0], s))], summarize=10)
        with tf.control_dependencies([check]):
            present = tf.reshape(count > 0, tf.stack([batch, s]))

        def grid(t, missing):
            t = tf.reshape(tf.math.unsorted_segment_sum(t, seg, n)[:-1], tf.stack([batch, s]))
            return tf.ensure_shape(tf.where(present, t, missing[None, :]), [None, s])

        return {DENSE_IDS: grid(rows, self._single_rare), DENSE_VALUES: grid(values, self._single_missing),
                DENSE_FIELDS: tf.ensure_shape(tf.tile(self._single_fids[None, :], tf.stack([batch, 1])), [None, s])}

    def _multi_hot_part(self, ex, mine, rows, values, fids, batch) -> dict:
        """The sparse batch of the multi-hot fields' entries (``mine``), their missing fields filled."""
        if not self.has_multi_hot:  # an empty sparse batch, without the bookkeeping
            empty = tf.zeros([0], tf.int64)
            return _sparse(tf.zeros([0, 2], tf.int64), tf.stack([batch, tf.constant(0, tf.int64)]), empty,
                           tf.zeros([0], tf.float32), empty)
        keep = tf.where(mine)[:, 0]
        ex, rows, values, fids = (tf.gather(t, keep) for t in (ex, rows, values, fids))
        if self.sequences:
            keep = tf.where(self._within_max_length(ex, fids))[:, 0]
            ex, rows, values, fids = (tf.gather(t, keep) for t in (ex, rows, values, fids))
        _, indices, shape = raw.sparse_layout(ex, batch)  # entries are in example order already
        return self.assemble(indices, shape, rows, values, fids, multi_hot_only=True)

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
        values = tf.cast(values, tf.float32)
        if self.sequences:
            keep = tf.where(self._within_max_length(indices[:, 0], fids))[:, 0]
            hashes, values, fids = (tf.gather(t, keep) for t in (hashes, values, fids))
            order, indices, dense_shape = raw.sparse_layout(tf.gather(indices[:, 0], keep), dense_shape[0])
            hashes, values, fids = (tf.gather(t, order) for t in (hashes, values, fids))
        rows, values = self.rows_and_values(hashes, values, fids)
        vrows = self.vector_rows(hashes, fids) if self.vector_tables else None
        return self.assemble(indices, dense_shape, rows, values, fids, vrows)

    def assemble(self, indices, dense_shape, rows, values, fids, vrows=None, multi_hot_only=False) -> dict:
        """The sparse batch of mapped features, with the missing fields' rows when the schema says so
        (only the multi-hot fields' with ``multi_hot_only``), and the vectors of the vector fields
        (``vrows``: ``vector_rows`` of the features)."""
        if self.fill_missing:
            indices, dense_shape, rows, values, fids, vrows = self._with_missing(indices, dense_shape[0], rows,
                                                                                 values, fids, vrows, multi_hot_only)
        out = _sparse(indices, dense_shape, rows, values, fids)
        if self.vector_tables:
            out[VECTORS] = self._vectors(indices, dense_shape[0], fids, vrows)
        return out

    def _within_max_length(self, ex, fids):
        """Which entries to keep: a sequence field's first ``max_length`` per example, every other entry."""
        return sequence.within_max_length(ex, fids, self._max_length, self.num_fields)

    def vector_rows(self, hashes, fids):
        """``[n, V]`` int64: per vector table, the table row of each feature's key (its zero row for a
        key the table lacks or a feature of another field)."""
        return tf.stack([t.rows(hashes, fids) for t in self.vector_tables], axis=1)

    def _vectors(self, indices, batch, fids, vrows) -> dict:
        """``{field: {vector field: [batch, d] or [batch, L, d]}}`` (module docstring)."""
        out: dict = {}
        ex = indices[:, 0]
        for j, t in enumerate(self.vector_tables):
            vec = tf.gather(t.table, vrows[:, j])
            own = tf.cast(tf.equal(fids, t.key_fid), tf.float32)[:, None]
            pooled = tf.math.unsorted_segment_sum(vec * own, ex, batch)
            out.setdefault(t.key_field, {})[t.field] = tf.reshape(pooled, [-1, t.dim])
            for (name, length), sid in zip(t.sequences, t.sequence_fids):
                dense, _ = sequence.dense_sequence(vec, indices, fids, batch, sid, length)
                out.setdefault(name, {})[t.field] = tf.reshape(dense, [-1, length, t.dim])
        return out

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

    def _with_missing(self, indices, batch, rows, values, fids, vrows=None, multi_hot_only=False):
        """Appends each example's missing fields (rare row) after its own features, in field order
        (only the multi-hot fields with ``multi_hot_only``).

        Returns:
          (indices, dense_shape, rows, values, fids, vrows) of the filled batch (vrows: None without).
        """
        ex = indices[:, 0]
        nf = tf.constant(self.num_fields, tf.int64)
        present = tf.math.unsorted_segment_max(tf.ones_like(ex, tf.int32), ex * nf + fids, batch * nf)
        missing = tf.reshape(present <= 0, tf.stack([batch, nf]))       # empty segments give int32 min
        if multi_hot_only:
            missing = missing & self._multi_hot[None, :]
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
        pairs = [[rows, tf.gather(self._rare, m_field)],
                 [values, tf.gather(self._missing_value, m_field)],
                 [fids, m_field]]
        if vrows is not None:  # a missing field has no key: every table's zero row
            zero = tf.constant([t.size for t in self.vector_tables], tf.int64)
            pairs.append([vrows, tf.tile(zero[None, :], tf.stack([tf.shape(m_field)[0], 1]))])
        out = [tf.dynamic_stitch(pos, pair) for pair in pairs]
        shape = tf.stack([batch, tf.reduce_max(tf.concat([width, [0]], axis=0))])
        return (tf.reshape(out_idx, [-1, 2]), shape, *out[:3], out[3] if vrows is not None else None)


class _VectorTable(tf.Module):
    """One vector field in the graph: the table ``[rows + 1, d]`` (last row zeros) and key hash -> row.

    Keys are hashed as the key field's features, ``feature_hash(key_field, key)``: what the records and
    raw Examples carry for the key field and for a sequence with ``vocabulary_of`` = the key field.
    """

    def __init__(self, schema: Schema, spec):
        super().__init__(name=f"vectors_{spec.name}")
        keys, vectors = tables.read_vectors(schema.table_file(spec), spec.key_column, spec.name, spec.dim)
        self.field, self.dim, self.key_field = spec.name, spec.dim, spec.key_field
        self.key_fid = schema.field(spec.key_field).id
        self.size = len(keys)
        seqs = [f for f in schema.fields if f.sequence and f.vocabulary_of == spec.key_field]
        self.sequences = tuple((f.name, f.max_length) for f in seqs)
        self.sequence_fids = tuple(f.id for f in seqs)
        table = np.zeros([len(keys) + 1, spec.dim], np.float32)
        if keys:
            table[:-1] = np.asarray(vectors, np.float32)
        self.table = tf.constant(table)
        self.index = _static_table([feature_hash(spec.key_field, k) for k in keys] or [0],
                                   list(range(len(keys))) or [-1])
        self._fids = tf.constant([self.key_fid, *self.sequence_fids], tf.int64)

    def rows(self, hashes, fids):
        """``[n]`` table row of each feature: its key's row for the key field and its sequences, else zeros."""
        row = self.index.lookup(hashes)
        mine = tf.reduce_any(tf.equal(fids[:, None], self._fids[None, :]), axis=1)
        return tf.where(mine & (row >= 0), row, tf.constant(self.size, tf.int64))


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
