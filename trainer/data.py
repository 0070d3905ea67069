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
  labels: {label name -> float32 [batch]};
  weights: float32 [batch] sample weights (1 where the example has none).
"""
from __future__ import annotations

import tensorflow as tf

from feature_schema import Schema
from featurization import Featurizer

FEATURE_KEYS = ("ids", "values", "fields")


def parse_spec(schema: Schema) -> dict:
    """The `tf.io.parse_example` spec of the ETL's hashed records."""
    k = schema.example_keys
    spec = {
        k.hashes: tf.io.VarLenFeature(tf.int64),
        k.values: tf.io.VarLenFeature(tf.float32),
        k.field_hashes: tf.io.VarLenFeature(tf.int64),
        k.weight: tf.io.FixedLenFeature([1], tf.float32, default_value=[1.0]),
    }
    for name in schema.label_names:
        spec[name] = tf.io.FixedLenFeature([1], tf.float32)
    return spec


def parse_batch(serialized: tf.Tensor, schema: Schema, featurizer: Featurizer | None = None):
    """Parses and featurizes a batch of serialized records into (features, labels, weights)."""
    k = schema.example_keys
    featurizer = featurizer if featurizer is not None else Featurizer(schema)
    parsed = tf.io.parse_example(serialized, parse_spec(schema))
    features = featurizer.from_records(parsed[k.hashes], parsed[k.values], parsed[k.field_hashes])
    labels = {name: tf.squeeze(parsed[name], axis=1) for name in schema.label_names}
    weights = tf.squeeze(parsed[k.weight], axis=1)
    return features, labels, weights


def make_dataset(schema: Schema, split: str, batch_size: int, shuffle_buffer: int = 0, seed: int = 0,
                 cache: bool = False, num_parallel_reads: int = 4, repeat: bool = False,
                 drop_remainder: bool = False, files: list[str] | None = None,
                 deterministic: bool | None = None, featurizer: Featurizer | None = None,
                 cache_featurized: bool = False) -> tf.data.Dataset:
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
      cache_featurized: parse and featurize each example once, in the first pass, and cache the
        featurized examples in memory (later passes skip parsing and featurization); then shuffle and
        batch them. The batches are those of ``cache`` (the same examples in the same order: an
        example's featurization does not depend on its batch), at the cost of re-batching sparse
        examples instead of parsing a batch of records.
    """
    if deterministic is None:
        deterministic = not shuffle_buffer
    if files is None:
        files = []
        for pattern in schema.split_files(split):
            files.extend(sorted(tf.io.gfile.glob(pattern)))
    if not files:
        raise FileNotFoundError(f"no TFRecord files for split {split!r} ({schema.split_files(split)})")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_buffer:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=schema.compression or None),
        cycle_length=max(1, min(num_parallel_reads, len(files))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic)
    featurizer = featurizer if featurizer is not None else Featurizer(schema)
    if cache_featurized and not shuffle_buffer:  # the same batches every pass: cache them whole
        ds = _parsed(ds, batch_size, schema, featurizer, deterministic, drop_remainder).cache()
        return (ds.repeat() if repeat else ds).prefetch(tf.data.AUTOTUNE)
    if cache_featurized:  # parsed in (unshuffled) batches, cached as dense examples, shuffled below
        ds = _parsed(ds, batch_size, schema, featurizer, deterministic=True).unbatch()
        ds = ds.map(_to_dense_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
    elif cache:  # raw records, before the shuffle, so every epoch is shuffled anew
        ds = ds.cache()
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if cache_featurized:
        ds = ds.padded_batch(batch_size, drop_remainder=drop_remainder).map(_to_sparse_batch)
    else:
        ds = _parsed(ds, batch_size, schema, featurizer, deterministic, drop_remainder)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


def _parsed(records: tf.data.Dataset, batch_size: int, schema: Schema, featurizer: Featurizer,
            deterministic: bool, drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of serialized records -> parsed and featurized (features, labels, weights)."""
    ds = records.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(lambda s: parse_batch(s, schema, featurizer), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=deterministic)



def _to_dense_example(features, labels, weights):
    """One featurized example with each sparse tensor as its values (``[n]``: its ``n`` features, in
    order) and ``n`` under ``"_nnz"``: dense examples batch much faster than sparse ones."""
    nnz = tf.size(features["ids"].values, tf.int64)
    check = tf.debugging.assert_equal(features["ids"].indices[:, 0], tf.range(nnz),
                                      message="featurized positions are not 0..n-1")
    with tf.control_dependencies([check]):
        out = {k: (v.values if isinstance(v, tf.SparseTensor) else v) for k, v in features.items()}
        out["_nnz"] = tf.identity(nnz)
    return out, labels, weights


def _to_sparse_batch(features, labels, weights):
    """``padded_batch`` of ``_to_dense_example``s -> the sparse batch ``parse_batch`` gives (width: the
    batch's most features per example)."""
    features = dict(features)
    nnz = features.pop("_nnz")
    width = tf.shape(features["ids"], out_type=tf.int64)[1]
    mask = tf.range(width)[None, :] < nnz[:, None]
    indices = tf.where(mask)
    shape = tf.stack([tf.shape(nnz, out_type=tf.int64)[0], width])
    sparse = {k: tf.SparseTensor(indices, tf.boolean_mask(features[k], mask), shape) for k in FEATURE_KEYS}
    return {**features, **sparse}, labels, weights
