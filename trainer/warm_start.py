"""Daily warm start: initialise today's model from yesterday's run or export.

Variables are matched by name. Tables indexed by vocabulary row (first dimension
equal to the schema's ``num_features``) are remapped row by row through the two
vocabularies: a feature present in both keeps its trained row wherever today's
ETL put it, each field's rare row maps to the same field's rare row, and rows of
features new today keep their fresh initialisation. Every other variable must
have the same shape in both models; a changed model shape is a clear error.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from feature_schema import SCHEMA_FILENAME, VOCAB_FILENAME, Schema, load_schema, read_vocabulary
from trainer import run_files


@dataclasses.dataclass
class WarmStartReport:
    """What a warm start copied.

    Attributes:
      source: the run or export directory read.
      copied: names of variables copied whole.
      remapped: table name -> (rows copied from the source, rows initialised fresh).
    """

    source: str
    copied: list[str] = dataclasses.field(default_factory=list)
    remapped: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        tables = ", ".join(f"{name}: {c} rows kept, {n} new" for name, (c, n) in self.remapped.items())
        return f"warm start from {self.source}: {len(self.copied)} variables copied; {tables}"


_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"


def attribute_paths(model, root: str = "model") -> dict[str, tf.Variable]:
    """Variables of ``model`` by object path (``model/linear/w``), the keys of its checkpoints.

    Object paths follow attribute names, so they do not depend on the layer-name
    counters Keras appends when several models live in one process.
    """
    out: dict[str, tf.Variable] = {}
    seen: set[int] = set()

    def walk(obj, path):
        if isinstance(obj, tf.Variable):
            out.setdefault(path, obj)
            return
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for name, child in obj._trackable_children(save_type="checkpoint").items():
            if name == "optimizer":  # slots are not warm-started: today's optimizer starts fresh
                continue
            walk(child, f"{path}/{name}")

    walk(model, root)
    return out


def _synthetic_batch(schema: Schema):
    """One example holding every field's rare id: enough to create a model's variables."""
    n = schema.num_fields
    idx = [[0, j] for j in range(n)]
    shape = [1, n]
    return {"ids": tf.SparseTensor(idx, tf.constant(schema.rare_ids, tf.int64), shape),
            "values": tf.SparseTensor(idx, tf.ones([n], tf.float32), shape),
            "fields": tf.SparseTensor(idx, tf.range(n, dtype=tf.int64), shape)}


def _read_source(source: str):
    """(variables {object path: array}, schema, vocabulary {hash: row}) of a run dir or export version dir."""
    if os.path.exists(os.path.join(source, "saved_model.pb")):
        from trainer import config as config_lib
        from trainer.models import build_model

        extra = os.path.join(source, "assets.extra")
        schema = load_schema(os.path.join(extra, SCHEMA_FILENAME))
        vocab_path = os.path.join(extra, VOCAB_FILENAME)
        cfg = config_lib.load(os.path.join(extra, "config.yaml"))
        # A SavedModel stores a Keras model's variables as model/variables/<i>, in the order of
        # model.variables; rebuild yesterday's model to name them.
        old = build_model(cfg.model, schema)
        old(_synthetic_batch(schema))
        by_id = {id(v): path for path, v in attribute_paths(old).items()}
        reader = tf.train.load_checkpoint(os.path.join(source, "variables", "variables"))
        variables = {by_id[id(v)]: reader.get_tensor(f"model/variables/{i}{_VALUE}")
                     for i, v in enumerate(old.variables) if id(v) in by_id}
    elif os.path.exists(os.path.join(source, run_files.CONFIG_FILE)):
        from trainer import config as config_lib

        cfg = config_lib.load(os.path.join(source, run_files.CONFIG_FILE))
        schema = load_schema(cfg.data.path)
        vocab_path = schema.vocabulary_file()
        reader = tf.train.load_checkpoint(run_files.weights_prefix(source))
        variables = {k[: -len(_VALUE)]: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                     if k.startswith("model/") and k.endswith(_VALUE) and "/optimizer/" not in k}
    else:
        raise FileNotFoundError(f"warm start source {source} is neither a run dir (config.yaml) "
                                f"nor a SavedModel version dir (saved_model.pb)")
    vocab = {e.hash: e.index for e in read_vocabulary(vocab_path)}
    return variables, schema, vocab


def row_mapping(old_schema: Schema, old_vocab: dict[int, int], new_schema: Schema,
                new_vocab: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(new rows, old rows) pairs of features and rare rows present in both vocabularies."""
    new_rows, old_rows = [], []
    for h, new_row in new_vocab.items():
        old_row = old_vocab.get(h)
        if old_row is not None:
            new_rows.append(new_row)
            old_rows.append(old_row)
    old_fields = {f.name: f for f in old_schema.fields}
    for f in new_schema.fields:
        if f.name in old_fields:
            new_rows.append(f.rare_id)
            old_rows.append(old_fields[f.name].rare_id)
    return np.asarray(new_rows, np.int64), np.asarray(old_rows, np.int64)


def warm_start(model, schema: Schema, source: str) -> WarmStartReport:
    """Initialises ``model`` (built for ``schema``) from the run or export at ``source``.

    Raises:
      ValueError: a variable is missing from the source or changed shape.
    """
    old_vars, old_schema, old_vocab = _read_source(source)
    new_vocab = {e.hash: e.index for e in read_vocabulary(schema.vocabulary_file())}
    new_rows, old_rows = row_mapping(old_schema, old_vocab, schema, new_vocab)
    report = WarmStartReport(source)
    for name, var in attribute_paths(model).items():
        if name not in old_vars:
            raise ValueError(f"warm start: variable {name} (shape {var.shape}) is not in {source}; "
                             f"the model changed (source has {sorted(old_vars)})")
        old = old_vars[name]
        shape = tuple(var.shape)
        is_table = (len(shape) >= 1 and shape[0] == schema.num_features and old.ndim == len(shape)
                    and old.shape[0] == old_schema.num_features)
        if is_table:
            if old.shape[1:] != shape[1:]:
                raise ValueError(f"warm start: table {name} changed shape beyond its rows: "
                                 f"{old.shape} -> {shape}")
            value = var.numpy()
            value[new_rows] = old[old_rows]
            var.assign(value)
            report.remapped[name] = (len(new_rows), shape[0] - len(new_rows))
        else:
            if old.shape != shape:
                raise ValueError(f"warm start: variable {name} changed shape {old.shape} -> {shape}")
            var.assign(old)
            report.copied.append(name)
    return report
