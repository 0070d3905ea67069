"""Exports a trained run as a TF Serving SavedModel and proves it loads the way TF Serving does.

    python -m export.exporter --run_dir runs/default [--export_base runs/export] [--model_name fm]

Layout: ``<export_base>/<model_name>/<version>/`` with an integer version. The
SavedModel is written to a hidden temporary directory beside the versions and
renamed into place, so a server polling the base path never sees a partial
version. ``assets.extra/`` holds the schema, the resolved config and the
vocabulary (the same files the ETL and trainer used).

The ``serving_default`` signature (method ``tensorflow/serving/predict``) takes
serialized ``tf.Example``s carrying the stable feature hashes, values and field
ids; the vocabulary lookup (hash -> row, unknown -> the field's rare id) runs
inside the graph, so clients never need the vocabulary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import tensorflow as tf

from feature_schema import SCHEMA_FILENAME, VOCAB_FILENAME, Schema, read_vocabulary
from trainer import data
from trainer import train as trainer_lib

SERVE_TAG = "serve"
PREDICT_METHOD = "tensorflow/serving/predict"
EXAMPLES_INPUT = "examples"


class ServingModule(tf.Module):
    """The serving graph: parse tf.Examples, look up vocabulary rows, run the model."""

    def __init__(self, model, schema: Schema):
        super().__init__()
        self.model = model
        self._keys = schema.example_keys
        vocab = read_vocabulary(schema.vocabulary_file())
        hashes = np.array([v.hash for v in vocab], dtype=np.int64)
        rows = np.array([v.index for v in vocab], dtype=np.int64)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(hashes, tf.int64), tf.constant(rows, tf.int64)),
            default_value=-1)
        self.rare_ids = tf.constant(schema.rare_ids, tf.int64)
        self.outputs = tuple(model.serving_outputs)

    def lookup(self, hashes: tf.Tensor, fields: tf.Tensor) -> tf.Tensor:
        """Vocabulary rows of stable hashes; unknown hashes map to their field's rare id."""
        rows = self.table.lookup(hashes)
        return tf.where(rows >= 0, rows, tf.gather(self.rare_ids, fields))

    def predict_sparse(self, hashes: tf.SparseTensor, values: tf.SparseTensor, fields: tf.SparseTensor):
        ids = tf.SparseTensor(hashes.indices, self.lookup(hashes.values, fields.values), hashes.dense_shape)
        out = self.model({"ids": ids, "values": values, "fields": fields}, training=False)
        return {t: out[t] for t in self.outputs}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(self, examples):
        k = self._keys
        parsed = tf.io.parse_example(examples, {
            k.hashes: tf.io.VarLenFeature(tf.int64),
            k.values: tf.io.VarLenFeature(tf.float32),
            k.fields: tf.io.VarLenFeature(tf.int64),
        })
        return self.predict_sparse(parsed[k.hashes], parsed[k.values], parsed[k.fields])


def next_version(model_dir: str) -> int:
    """A version above every existing one (time-based, so versions sort by export time)."""
    existing = [int(d) for d in os.listdir(model_dir) if d.isdigit()] if os.path.isdir(model_dir) else []
    return max([int(time.time()), *[v + 1 for v in existing]])


MAX_ABS_DIFF = 1e-5


def export(run_dir: str, export_base: str | None = None, model_name: str | None = None,
           verify_examples: int = 100_000) -> tuple[str, dict]:
    """Exports the run's model, verifies it, then publishes it.

    The SavedModel is checked through the TF Serving loader against the
    in-process model before the rename, so a version that fails the check
    never becomes visible.

    Returns:
      (final version directory, the ``verify`` result).
    """
    cfg, schema, model = trainer_lib.load_trained(run_dir)
    export_base = export_base or cfg.export_base
    model_dir = os.path.join(export_base, model_name or cfg.served_name)
    os.makedirs(model_dir, exist_ok=True)
    version = next_version(model_dir)
    tmp = os.path.join(model_dir, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    module = ServingModule(model, schema)
    tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve_examples})
    extra = os.path.join(tmp, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    shutil.copy(os.path.join(schema.base_dir, SCHEMA_FILENAME), os.path.join(extra, SCHEMA_FILENAME))
    shutil.copy(schema.vocabulary_file(), os.path.join(extra, VOCAB_FILENAME))
    shutil.copy(os.path.join(run_dir, "config.yaml"), os.path.join(extra, "config.yaml"))
    check = verify(tmp, run_dir, verify_examples)
    if check["max_abs_diff"] > MAX_ABS_DIFF:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"export: Session predictions differ from the in-process model by "
                           f"{check['max_abs_diff']:.3g} > {MAX_ABS_DIFF}; nothing published")
    final = os.path.join(model_dir, str(version))
    os.rename(tmp, final)  # atomic on one filesystem: the version appears complete or not at all
    return final, check


def eval_examples(schema: Schema, n: int) -> list[bytes]:
    """The first ``n`` serialized eval examples, in file order."""
    files = []
    for pattern in schema.split_files("eval"):
        files.extend(sorted(tf.io.gfile.glob(pattern)))
    ds = tf.data.TFRecordDataset(files, compression_type=schema.compression or None).take(n)
    return [r.numpy() for r in ds]


def in_process_predict(model, schema: Schema, examples: list[bytes], batch_size: int) -> dict:
    """The trained Keras model on the same serialized examples (vocabulary rows from the ETL)."""
    out = {t: [] for t in model.tasks}
    for start in range(0, len(examples), batch_size):
        features, _, _ = data.parse_batch(tf.constant(examples[start:start + batch_size]), schema)
        pred = model(features, training=False)
        for t in model.tasks:
            out[t].append(pred[t].numpy())
    return {t: np.concatenate(v) for t, v in out.items()}


def session_predict(export_dir: str, examples: list[bytes], signature: str = "serving_default") -> dict:
    """Runs a signature the way TF Serving does: TF1 loader into a Session, tensors by name."""
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, [SERVE_TAG], export_dir)
        sig = meta.signature_def[signature]
        if sig.method_name != PREDICT_METHOD:
            raise ValueError(f"{signature}: method {sig.method_name!r} != {PREDICT_METHOD!r}")
        fetches = {k: v.name for k, v in sig.outputs.items()}
        return sess.run(fetches, feed_dict={sig.inputs[EXAMPLES_INPUT].name: examples})


def verify(export_dir: str, run_dir: str, max_examples: int = 100_000) -> dict:
    """Compares Session-loaded predictions with the in-process model on the eval split.

    Returns:
      {"max_abs_diff": float, "examples": int, "session": {task: probs}}.
    """
    cfg, schema, model = trainer_lib.load_trained(run_dir)
    examples = eval_examples(schema, max_examples)
    preds = in_process_predict(model, schema, examples, cfg.data.eval_batch_size)
    served = session_predict(export_dir, examples)
    diff = max(float(np.max(np.abs(served[t] - preds[t]))) for t in model.tasks)
    return {"max_abs_diff": diff, "examples": len(examples), "session": served}


def _reference_metrics(path: str, schema: Schema) -> dict:
    """Per-task reference metrics: ``--reference``, else a generator's truth.json beside the input logs."""
    if not path:
        inputs = schema.sources.get("eval_input") or schema.sources.get("input") or ""
        path = os.path.join(os.path.dirname(inputs), "truth.json") if inputs and "*" not in inputs else ""
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        ref = json.load(f)
    return ref.get("bayes", {}).get("eval", ref)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Export a trained run for TF Serving and verify it.")
    p.add_argument("--run_dir", required=True)
    p.add_argument("--export_base", default=None)
    p.add_argument("--model_name", default=None)
    p.add_argument("--reference", default="", help="JSON with reference (e.g. Bayes-optimal) metrics per task")
    p.add_argument("--show", type=int, default=5, help="held-out examples to print")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    path, check = export(args.run_dir, args.export_base, args.model_name)
    print(f"export: TF Serving loader check on {check['examples']} eval examples: "
          f"max |session - in-process| = {check['max_abs_diff']:.2e} (<= {MAX_ABS_DIFF})")
    tasks = list(check["session"])
    print("export: held-out predictions (Session.run of serving_default):")
    for i in range(min(args.show, check["examples"])):
        print("  example %d: " % i + ", ".join(f"{t}={check['session'][t][i]:.4f}" for t in tasks))
    with open(os.path.join(args.run_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    ref = _reference_metrics(args.reference, trainer_lib.load_trained(args.run_dir)[1])
    print("\nheld-out metrics" + (" (reference: generator's Bayes-optimal, scoring with the planted probabilities)"
                                  if ref else ""))
    print(f"  {'task':12s} {'AUC':>8s} {'logloss':>8s}" + (f" {'Bayes AUC':>10s} {'Bayes LL':>9s}" if ref else ""))
    for t, m in metrics.items():
        row = f"  {t:12s} {m['auc']:8.4f} {m['logloss']:8.4f}"
        if t in ref:
            row += f" {ref[t]['auc']:10.4f} {ref[t]['logloss']:9.4f}"
        print(row)
    print(f"export: SavedModel at {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
