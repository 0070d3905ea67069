"""tf.data input pipeline over the ETL's TFRecords, derived from the schema.

Files are interleaved, examples shuffled, then a whole batch of serialized
examples is parsed at once with ``tf.io.parse_example`` (vectorised parsing is
several times faster than parsing one example at a time) and mapped to
vocabulary rows by the featurization layer (``featurization.Featurizer``, the
same layer the exported model applies to what clients send), with parallel
calls and prefetching tuned by AUTOTUNE.

Each element is ``(features, labels, weights)``:
  features: {"ids", "values", "fields"} -> tf.SparseTensor [batch, max_nnz]
    (int64 vocabulary rows, float32 values, int64 field ids; missing fields included);
    with ``dense_ids`` the featurization layer's dense layout instead: the records' lists parsed as
    dense ``[batch, L]`` tensors (padded), the single-valued fields as ``"dense_ids"``,
    ``"dense_values"``, ``"dense_fields"`` ``[batch, S]`` and only the multi-hot fields sparse;
  labels: {label name -> float32 [batch]};
  weights: float32 [batch] sample weights (1 where the example has none).
"""
from __future__ import annotations

import tensorflow as tf

from feature_schema import Schema
from featurization import Featurizer
from featurization.layer import DENSE_FIELDS, DENSE_IDS, DENSE_VALUES, PAD_FIELD_HASH

FEATURE_KEYS = ("ids", "values", "fields")
DENSE_KEYS = (DENSE_IDS, DENSE_VALUES, DENSE_FIELDS)


def parse_spec(schema: Schema, dense: bool = False) -> dict:
    """The `tf.io.parse_example` spec of the ETL's hashed records (``dense``: the feature lists as
    ``[batch, L]`` tensors padded with field hash ``PAD_FIELD_HASH``, for ``Featurizer.from_dense_records``)."""
    k = schema.example_keys
    if dense:
        def listed(dtype, pad):
            return tf.io.FixedLenSequenceFeature([], dtype, allow_missing=True, default_value=pad)
        lists = {k.hashes: listed(tf.int64, 0), k.values: listed(tf.float32, 0.0),
                 k.field_hashes: listed(tf.int64, PAD_FIELD_HASH)}
    else:
        lists = {key: tf.io.VarLenFeature(dt) for key, dt in ((k.hashes, tf.int64), (k.values, tf.float32),
                                                             (k.field_hashes, tf.int64))}
    spec = {**lists, k.weight: tf.io.FixedLenFeature([1], tf.float32, default_value=[1.0])}
    for name in schema.label_names:
        spec[name] = tf.io.FixedLenFeature([1], tf.float32)
    return spec


def parse_batch(serialized: tf.Tensor, schema: Schema, featurizer: Featurizer | None = None, dense: bool = False):
    """Parses and featurizes a batch of serialized records into (features, labels, weights)
    (``dense``: the featurization layer's dense layout)."""
    k = schema.example_keys
    featurizer = featurizer if featurizer is not None else Featurizer(schema)
    parsed = tf.io.parse_example(serialized, parse_spec(schema, dense))
    featurize = featurizer.from_dense_records if dense else featurizer.from_records
    features = featurize(parsed[k.hashes], parsed[k.values], parsed[k.field_hashes])
    labels = {name: tf.squeeze(parsed[name], axis=1) for name in schema.label_names}
    weights = tf.squeeze(parsed[k.weight], axis=1)
    return features, labels, weights


def make_dataset(schema: Schema, split: str, batch_size: int, shuffle_buffer: int = 0, seed: int = 0,
                 cache: bool = False, num_parallel_reads: int = 4, repeat: bool = False,
                 drop_remainder: bool = False, files: list[str] | None = None,
                 deterministic: bool | None = None, featurizer: Featurizer | None = None,
                 dense_ids: bool = False, featurize_once: bool = False) -> tf.data.Dataset:
    """Builds the dataset of one split.

    Args:
      schema: the ETL schema (file globs, keys, labels).
      split: ``train`` or ``eval``.
      batch_size: examples per batch.
      shuffle_buffer: example-level shuffle buffer; 0 keeps file order (eval).
      seed: shuffle seed.
      cache: cache the raw records in memory after the first pass.
      num_parallel_reads: files read concurrently.
      repeat: repeat forever (for step-based training).
      drop_remainder: drop the last partial batch.
      files: explicit files instead of the split's globs (a worker's shard).
      deterministic: keep the parallel interleave and map in order, so a seed fixes the example
        order; None: in order only without shuffling (a shuffled order is random anyway).
      featurizer: the featurization layer (default: built from ``schema``).
      dense_ids: parse the feature lists densely and give the single-valued fields as dense
        ``[batch, S]`` tensors (the featurization layer's dense layout; module docstring).
      featurize_once: parse and featurize the split once (dense layout) into tensors held in memory;
        each pass gathers its batches from a fresh permutation of all examples (``shuffle_buffer`` > 0:
        shuffled with ``seed``, reshuffled every pass; 0: file order). Needs every field single-valued.
    """
    if deterministic is None:
        deterministic = not shuffle_buffer
    if files is None:
        files = []
        for pattern in schema.split_files(split):
            files.extend(sorted(tf.io.gfile.glob(pattern)))
    if not files:
        raise FileNotFoundError(f"no TFRecord files for split {split!r} ({schema.split_files(split)})")
    if featurize_once:
        held = featurized_split(schema, split, files, featurizer, num_parallel_reads)
        return in_memory_dataset(held, batch_size, shuffle_buffer > 0, seed, repeat, drop_remainder)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_buffer:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=schema.compression or None),
        cycle_length=max(1, min(num_parallel_reads, len(files))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic)
    if cache:  # raw records, before the shuffle, so every epoch is shuffled anew
        ds = ds.cache()
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    featurizer = featurizer if featurizer is not None else Featurizer(schema)
    ds = ds.map(lambda s: parse_batch(s, schema, featurizer, dense_ids), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=deterministic)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


def featurized_bytes(schema: Schema, split: str) -> int | None:
    """Bytes ``featurized_split`` holds for a split: per example and field an int64 row, a float32 value
    and an int64 field id, plus a float32 weight and one per label (None: the schema has no count)."""
    n = schema.splits.get(split, {}).get("examples")
    return None if n is None else int(n) * (20 * schema.num_fields + 4 * (1 + len(schema.label_names)))


def featurize_once_fits(schema: Schema, split: str, max_bytes: int) -> bool:
    """Whether ``data.featurize_once`` unset (auto) holds a split in memory: every field single-valued,
    ``fill_missing``, no vector fields (the dense layout's conditions) and ``featurized_bytes`` at most
    ``max_bytes``."""
    size = featurized_bytes(schema, split)
    return (size is not None and size <= max_bytes and schema.fill_missing and not schema.vector_fields
            and len(schema.single_field_ids) == schema.num_fields)


def featurized_split(schema: Schema, split: str, files: list[str], featurizer: Featurizer | None = None,
                     num_parallel_reads: int = 4):
    """(features, labels, weights) of every record of ``files``, parsed and featurized once in the dense
    layout and concatenated: ``[n, fields]`` tensors, ``[n]`` labels and weights.

    Raises:
      ValueError: a schema with a multi-hot field (its features have no fixed place in a dense row).
    """
    if len(schema.single_field_ids) != schema.num_fields:
        raise ValueError("data.featurize_once needs every field single-valued; multi-hot: "
                         f"{[f.name for f in schema.fields if f.multi_hot]}")
    parts = list(make_dataset(schema, split, 8192, num_parallel_reads=num_parallel_reads, files=files,
                              deterministic=True, featurizer=featurizer, dense_ids=True))
    features = {k: tf.concat([p[0][k] for p in parts], 0) for k in DENSE_KEYS}
    labels = {name: tf.concat([p[1][name] for p in parts], 0) for name in schema.label_names}
    return features, labels, tf.concat([p[2] for p in parts], 0)


def in_memory_dataset(held, batch_size: int, shuffle: bool, seed: int = 0, repeat: bool = False,
                      drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of ``featurized_split``'s tensors gathered by a permutation drawn anew every pass (the
    way Keras feeds NumPy arrays), in the dense layout with an empty sparse part."""
    features, labels, weights = held
    n = int(weights.shape[0])
    full, rest = divmod(n, batch_size)
    if drop_remainder:
        rest = 0

    def batches(perm):
        """One pass's batches of example indices: whole ones, then the partial one."""
        out = tf.data.Dataset.from_tensor_slices(tf.reshape(perm[:full * batch_size], [full, batch_size]))
        return out.concatenate(tf.data.Dataset.from_tensors(perm[full * batch_size:])) if rest else out

    # One permutation op per pass, not one shuffled element per example. Each pass draws its own
    # key from ``seed``'s stream, which a new iteration (Keras' next epoch without repeat) redraws.
    passes = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    passes = passes if repeat else passes.take(1)
    order = tf.range(n, dtype=tf.int64)

    def permutation(key):
        return tf.random.experimental.stateless_shuffle(order, tf.stack([tf.constant(seed, tf.int64), key]))

    idx = passes.flat_map(lambda key: batches(permutation(key) if shuffle else order))

    def gather(i):
        batch = tf.shape(i, out_type=tf.int64)[0]
        shape = tf.stack([batch, tf.constant(0, tf.int64)])
        empty = tf.zeros([0, 2], tf.int64)
        out = {k: tf.SparseTensor(empty, tf.zeros([0], dt), shape)
               for k, dt in (("ids", tf.int64), ("values", tf.float32), ("fields", tf.int64))}
        out.update({k: tf.gather(v, i) for k, v in features.items()})
        return out, {k: tf.gather(v, i) for k, v in labels.items()}, tf.gather(weights, i)

    return idx.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
