"""Exports a trained run as a TF Serving SavedModel and proves it loads the way TF Serving does.

    python -m export.exporter --run_dir runs/default [--export_base runs/export] [--model_name fm] [--version N]

Layout: ``<export_base>/<model_name>/<version>/``, integer versions counting up
from 1 (``--version`` pins one). The SavedModel is written to a hidden
temporary directory beside the versions, verified, and renamed into place, so a
server polling the base path never sees a partial or unverified version.

``assets.extra/`` holds the schema, the resolved config and the vocabulary (the
files the ETL and trainer used), ``tf_serving_warmup_requests`` (a TFRecord of
``PredictionLog``s built from held-out examples, one per signature and warm-up
batch size, which TF Serving and ``serving.server`` replay before the version
takes traffic) and ``checksums.sha256`` (``serving.manifest``: every file's
SHA-256, written last).

Signatures (``serving/protocol.py`` documents inputs, outputs and the padding of
``predict_ids``): ``serving_default`` and ``predict_ids`` (Predict, every key of
``model.serving_outputs``), ``classification`` (Classify) and ``regression``
(Regress) on the primary output. The vocabulary lookup (hash -> row, unknown ->
the field's rare id) runs inside the graph, so clients never need the vocabulary.

Verification: the temporary SavedModel is loaded with
``tf.compat.v1.saved_model.loader.load`` into a Session, every signature is run
by its tensor names on the eval split and compared with the in-process Keras
model (max abs diff <= ``MAX_ABS_DIFF``), and every warm-up record is replayed.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import time

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, prediction_log_pb2, predict_pb2, regression_pb2

from feature_schema import SCHEMA_FILENAME, VOCAB_FILENAME, Schema
from feature_schema import paths
from featurization import Featurizer
from serving import manifest, protocol
from serving.protocol import (CLASSIFY_CLASSES, CLASSIFY_INPUTS, CLASSIFY_METHOD, CLASSIFY_SCORES,
                              CLASSIFY_SIGNATURE, DEFAULT_SIGNATURE, EXAMPLES_INPUT, FIELDS_INPUT, IDS_INPUT,
                              IDS_SIGNATURE, PREDICT_METHOD, REGRESS_INPUTS, REGRESS_METHOD, REGRESS_OUTPUTS,
                              REGRESS_SIGNATURE, SERVE_TAG, VALUES_INPUT)
from trainer import data
from trainer import train as trainer_lib

MAX_ABS_DIFF = 1e-5
# Warm-up batch sizes: the smallest request and a typical candidate list.
WARMUP_BATCH_SIZES = (1, 100)
_SIGNATURES = (DEFAULT_SIGNATURE, IDS_SIGNATURE, CLASSIFY_SIGNATURE, REGRESS_SIGNATURE)


class ServingModule(tf.Module):
    """The serving graph: parse tf.Examples or dense ids, featurize them (``featurization``), run the model.

    ``self.model`` must stay the first tracked attribute: ``trainer.warm_start``
    reads an export's variables as ``model/variables/<i>``.
    """

    def __init__(self, model, schema: Schema):
        super().__init__()
        self.model = model
        self._keys = schema.example_keys
        self.featurizer = Featurizer(schema)
        self.outputs = tuple(model.serving_outputs)

    def _run(self, features: dict) -> dict:
        out = self.model(features, training=False)
        return {t: out[t] for t in self.outputs}

    def predict_sparse(self, hashes: tf.SparseTensor, values: tf.SparseTensor, fields: tf.SparseTensor):
        """Outputs of hashed features whose fields are schema field ids."""
        return self._run(self.featurizer.from_field_ids(hashes, values, fields))

    def _parse(self, examples):
        k = self._keys
        parsed = tf.io.parse_example(examples, {
            k.hashes: tf.io.VarLenFeature(tf.int64),
            k.values: tf.io.VarLenFeature(tf.float32),
            k.field_hashes: tf.io.VarLenFeature(tf.int64),
        })
        return self.featurizer.from_records(parsed[k.hashes], parsed[k.values], parsed[k.field_hashes])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(self, examples):
        return self._run(self._parse(examples))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64, name=IDS_INPUT),
                                  tf.TensorSpec([None, None], tf.float32, name=VALUES_INPUT),
                                  tf.TensorSpec([None, None], tf.int64, name=FIELDS_INPUT)])
    def serve_ids(self, ids, values, fields):
        # Real slots (field >= 0) are packed to the left of each row, in their order, which is the
        # SparseTensor parse_example builds from an Example listing the same features.
        real = fields >= 0
        where = tf.where(real)
        col = tf.gather_nd(tf.cumsum(tf.cast(real, tf.int64), axis=1) - 1, where)
        idx = tf.stack([where[:, 0], col], axis=1)
        width = tf.reduce_max(tf.concat([tf.reduce_sum(tf.cast(real, tf.int64), axis=1), [0]], axis=0))
        shape = tf.stack([tf.shape(ids, out_type=tf.int64)[0], width])
        sparse = [tf.SparseTensor(idx, tf.gather_nd(t, where), shape) for t in (ids, values, fields)]
        return self.predict_sparse(*sparse)

    def _primary(self, examples):
        return self._run(self._parse(examples))[self.outputs[0]]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUTS)])
    def classify(self, inputs):
        p = self._primary(inputs)
        classes = tf.tile(tf.constant([list(protocol.CLASS_LABELS)]), [tf.shape(p)[0], 1])
        return {CLASSIFY_SCORES: tf.stack([1.0 - p, p], axis=1), CLASSIFY_CLASSES: classes}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=REGRESS_INPUTS)])
    def regress(self, inputs):
        return {REGRESS_OUTPUTS: self._primary(inputs)}

    def signatures(self) -> dict:
        return {DEFAULT_SIGNATURE: self.serve_examples, IDS_SIGNATURE: self.serve_ids,
                CLASSIFY_SIGNATURE: self.classify, REGRESS_SIGNATURE: self.regress}


def set_method_names(export_dir: str, methods: dict[str, str]) -> None:
    """Sets signatures' method names in saved_model.pb and rewrites the fingerprint.

    ``tf.saved_model.save`` marks every signature ``tensorflow/serving/predict``;
    TF Serving's Classify and Regress APIs only run signatures marked
    ``tensorflow/serving/classify`` / ``tensorflow/serving/regress``.
    """
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model import fingerprinting_utils

    path = os.path.join(export_dir, "saved_model.pb")
    sm = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        sm.ParseFromString(f.read())
    for meta in sm.meta_graphs:
        for name, method in methods.items():
            meta.signature_def[name].method_name = method
    with open(path, "wb") as f:
        f.write(sm.SerializeToString())
    # fingerprint.pb holds a checksum of saved_model.pb; recompute it the way tf.saved_model.save does.
    fingerprinting_utils.write_fingerprint(export_dir)


def versions(model_dir: str) -> list[int]:
    """Integer versions present in ``model_dir`` (hidden temporary directories are not versions)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(d) for d in os.listdir(model_dir) if d.isdigit())


def next_version(model_dir: str) -> int:
    """One above the highest existing version (1 for a new model)."""
    return max(versions(model_dir), default=0) + 1


def publish(tmp: str, model_dir: str, version: int | None = None) -> str:
    """Renames a finished temporary version directory to ``<model_dir>/<version>``.

    Without ``version`` the next free version is taken, retrying if a concurrent
    export claims it first. The rename is atomic on one filesystem: pollers see
    the version complete or not at all.
    """
    for _ in range(100):
        v = version if version is not None else next_version(model_dir)
        final = os.path.join(model_dir, str(v))
        if not os.path.exists(final):
            try:
                os.rename(tmp, final)
                return final
            except OSError as e:  # created between the check and the rename
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        if version is not None:
            raise FileExistsError(f"version {version} already exists in {model_dir}")
    raise RuntimeError(f"could not claim a version in {model_dir}")


def export(run_dir: str, export_base: str | None = None, model_name: str | None = None,
           verify_examples: int = 100_000, version: int | None = None) -> tuple[str, dict]:
    """Exports the run's model, verifies it, then publishes it.

    The SavedModel is checked through the TF Serving loader against the
    in-process model before the rename, so a version that fails the check
    never becomes visible.

    Returns:
      (final version directory, the ``verify`` result).
    """
    cfg, schema, model = trainer_lib.load_trained(run_dir)
    export_base = export_base or cfg.export_base
    # The served name becomes a directory under export_base: one plain component, never ../x.
    name = paths.plain_name(model_name or cfg.served_name, "served model name")
    model_dir = os.path.join(export_base, name)
    os.makedirs(model_dir, exist_ok=True)
    tmp = os.path.join(model_dir, f".tmp-export-{os.getpid()}-{time.time_ns()}")
    try:
        module = ServingModule(model, schema)
        tf.saved_model.save(module, tmp, signatures=module.signatures())
        set_method_names(tmp, {CLASSIFY_SIGNATURE: CLASSIFY_METHOD, REGRESS_SIGNATURE: REGRESS_METHOD})
        extra = os.path.join(tmp, protocol.ASSETS_EXTRA)
        os.makedirs(extra, exist_ok=True)
        shutil.copy(os.path.join(schema.base_dir, SCHEMA_FILENAME), os.path.join(extra, SCHEMA_FILENAME))
        shutil.copy(schema.vocabulary_file(), os.path.join(extra, VOCAB_FILENAME))
        shutil.copy(os.path.join(run_dir, protocol.CONFIG_FILE), os.path.join(extra, protocol.CONFIG_FILE))
        held_out = eval_examples(schema, max(WARMUP_BATCH_SIZES))
        write_warmup(os.path.join(extra, protocol.WARMUP_FILE),
                     warmup_logs(name, held_out, schema, WARMUP_BATCH_SIZES))
        check = verify(tmp, run_dir, verify_examples, loaded=(cfg, schema, model))
        if check["max_abs_diff"] > MAX_ABS_DIFF:
            raise RuntimeError(f"export: Session predictions differ from the in-process model by "
                               f"{check['max_abs_diff']:.3g} > {MAX_ABS_DIFF} ({check['per_signature']}); "
                               f"nothing published")
        manifest.write(tmp)  # last: it covers every other file
        final = publish(tmp, model_dir, version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, check


def eval_examples(schema: Schema, n: int) -> list[bytes]:
    """The first ``n`` serialized eval examples, in file order."""
    files = []
    for pattern in schema.split_files("eval"):
        files.extend(sorted(tf.io.gfile.glob(pattern)))
    ds = tf.data.TFRecordDataset(files, compression_type=schema.compression or None).take(n)
    return [r.numpy() for r in ds]


def in_process_predict(model, schema: Schema, examples: list[bytes], batch_size: int) -> dict:
    """The trained Keras model on the same serialized examples (vocabulary rows from the ETL).

    Returns:
      {serving output key: probabilities [len(examples)]}.
    """
    keys = tuple(model.serving_outputs)
    out = {t: [] for t in keys}
    for start in range(0, len(examples), batch_size):
        features, _, _ = data.parse_batch(tf.constant(examples[start:start + batch_size]), schema)
        pred = model(features, training=False)
        for t in keys:
            out[t].append(pred[t].numpy())
    return {t: np.concatenate(v) if v else np.zeros([0], np.float32) for t, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Warm-up requests


def warmup_logs(model_name: str, examples: list[bytes], schema: Schema,
                batch_sizes=WARMUP_BATCH_SIZES) -> list[prediction_log_pb2.PredictionLog]:
    """One PredictionLog per signature and batch size, built from held-out examples."""
    logs = []
    for n in sorted({min(b, len(examples)) for b in batch_sizes if examples}):
        batch = examples[:n]
        log = prediction_log_pb2.PredictionLog()
        req = log.predict_log.request
        req.model_spec.name, req.model_spec.signature_name = model_name, DEFAULT_SIGNATURE
        protocol.strings_proto(batch, req.inputs[EXAMPLES_INPUT])
        logs.append(log)

        log = prediction_log_pb2.PredictionLog()
        req = log.predict_log.request
        req.model_spec.name, req.model_spec.signature_name = model_name, IDS_SIGNATURE
        for key, arr in zip((IDS_INPUT, VALUES_INPUT, FIELDS_INPUT),
                            protocol.pad_ids(protocol.example_rows(batch, schema))):
            protocol.from_ndarray(arr, req.inputs[key])
        logs.append(log)

        for sig, field, request_cls in ((CLASSIFY_SIGNATURE, "classify_log", classification_pb2.ClassificationRequest),
                                        (REGRESS_SIGNATURE, "regress_log", regression_pb2.RegressionRequest)):
            log = prediction_log_pb2.PredictionLog()
            req = request_cls()
            req.model_spec.name, req.model_spec.signature_name = model_name, sig
            for s in batch:
                req.input.example_list.examples.add().ParseFromString(s)
            getattr(log, field).request.CopyFrom(req)
            logs.append(log)
    return logs


def write_warmup(path: str, logs) -> None:
    with tf.io.TFRecordWriter(path) as w:
        for log in logs:
            w.write(log.SerializeToString())


def read_warmup(path: str) -> list[prediction_log_pb2.PredictionLog]:
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


# ---------------------------------------------------------------------------------------------
# Verification through the TF1 Session loader


class SessionModel:
    """A SavedModel loaded the way TF Serving does: TF1 loader into a Session, signatures run by tensor names."""

    def __init__(self, export_dir: str):
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(self.session, [SERVE_TAG], export_dir)
        self.signatures = dict(meta.signature_def)

    def close(self) -> None:
        self.session.close()

    def run(self, signature: str, feeds: dict, batch_size: int = 4096) -> dict:
        """Runs ``signature`` on {input key: array}, in chunks of ``batch_size`` rows."""
        sig = self.signatures[signature]
        if set(feeds) != set(sig.inputs):
            raise ValueError(f"{signature}: inputs {sorted(feeds)} != signature inputs {sorted(sig.inputs)}")
        fetches = {k: v.name for k, v in sig.outputs.items()}
        n = len(next(iter(feeds.values())))
        parts = []
        for start in range(0, max(n, 1), batch_size):
            feed = {sig.inputs[k].name: v[start:start + batch_size] for k, v in feeds.items()}
            parts.append(self.session.run(fetches, feed_dict=feed))
        return {k: np.concatenate([p[k] for p in parts]) for k in fetches}

    def run_examples(self, signature: str, examples: list[bytes], schema=None) -> dict:
        """Runs any of the four signatures on serialized examples (``predict_ids`` gets their padded ids)."""
        sig = self.signatures[signature]
        if sig.method_name == PREDICT_METHOD and EXAMPLES_INPUT in sig.inputs:
            return self.run(signature, {EXAMPLES_INPUT: np.array(examples, dtype=object)})
        if sig.method_name == PREDICT_METHOD:
            if schema is None:
                raise ValueError(f"{signature} takes ids: pass the schema")
            ids, vals, fields = protocol.pad_ids(protocol.example_rows(examples, schema))
            return self.run(signature, {IDS_INPUT: ids, VALUES_INPUT: vals, FIELDS_INPUT: fields})
        if sig.method_name in (CLASSIFY_METHOD, REGRESS_METHOD):
            return self.run(signature, {CLASSIFY_INPUTS: np.array(examples, dtype=object)})
        raise ValueError(f"{signature}: unknown method {sig.method_name!r}")

    def replay(self, log: prediction_log_pb2.PredictionLog) -> dict:
        """Runs one warm-up record; returns its outputs."""
        kind = log.WhichOneof("log_type")
        if kind == "predict_log":
            req = log.predict_log.request
            feeds = {k: protocol.to_ndarray(t) for k, t in req.inputs.items()}
        elif kind in ("classify_log", "regress_log"):
            req = getattr(log, kind).request
            feeds = {CLASSIFY_INPUTS: np.array([e.SerializeToString() for e in req.input.example_list.examples],
                                               dtype=object)}
        else:
            raise ValueError(f"unsupported warm-up record {kind!r}")
        return self.run(req.model_spec.signature_name or DEFAULT_SIGNATURE, feeds)


def session_predict(export_dir: str, examples: list[bytes], signature: str = DEFAULT_SIGNATURE) -> dict:
    """Runs a signature the way TF Serving does: TF1 loader into a Session, tensors by name.

    ``predict_ids`` is fed the examples' padded ids (schema keys from the export's assets.extra).
    """
    from feature_schema import load_schema

    sm = SessionModel(export_dir)
    try:
        schema = None
        if signature == IDS_SIGNATURE:
            schema = load_schema(os.path.join(export_dir, protocol.ASSETS_EXTRA, SCHEMA_FILENAME))
        return sm.run_examples(signature, examples, schema)
    finally:
        sm.close()


def verify(export_dir: str, run_dir: str, max_examples: int = 100_000, loaded=None) -> dict:
    """Compares every signature, Session-loaded, with the in-process model on the eval split.

    Args:
      export_dir: the SavedModel (version directory).
      run_dir: the run it was exported from.
      max_examples: eval examples compared (the first ones, in file order).
      loaded: ``trainer.train.load_trained(run_dir)`` if the caller has it already.

    Returns:
      {"max_abs_diff": float (over all signatures), "per_signature": {signature: max abs diff},
       "examples": int, "warmup_records": int, "session": {output: probs of serving_default}}.
    """
    cfg, schema, model = loaded or trainer_lib.load_trained(run_dir)
    examples = eval_examples(schema, max_examples)
    preds = in_process_predict(model, schema, examples, cfg.data.eval_batch_size)
    primary = preds[model.serving_outputs[0]]
    sm = SessionModel(export_dir)
    try:
        missing = [s for s in _SIGNATURES if s not in sm.signatures]
        if missing:
            raise RuntimeError(f"export: signatures {missing} missing from {export_dir}")
        diffs = {}
        served = sm.run_examples(DEFAULT_SIGNATURE, examples)
        diffs[DEFAULT_SIGNATURE] = _max_diff(served, preds)
        diffs[IDS_SIGNATURE] = _max_diff(sm.run_examples(IDS_SIGNATURE, examples, schema), preds)
        cls = sm.run_examples(CLASSIFY_SIGNATURE, examples)
        if cls[CLASSIFY_CLASSES].shape != (len(examples), 2) or not np.all(
                cls[CLASSIFY_CLASSES] == np.array(protocol.CLASS_LABELS, dtype=object)):
            raise RuntimeError(f"export: {CLASSIFY_SIGNATURE} classes are not {protocol.CLASS_LABELS} per row")
        diffs[CLASSIFY_SIGNATURE] = _max_diff({"p": cls[CLASSIFY_SCORES][:, 1], "q": cls[CLASSIFY_SCORES][:, 0]},
                                              {"p": primary, "q": 1.0 - primary})
        diffs[REGRESS_SIGNATURE] = _max_diff(sm.run_examples(REGRESS_SIGNATURE, examples),
                                             {REGRESS_OUTPUTS: primary})
        logs = read_warmup(os.path.join(export_dir, protocol.ASSETS_EXTRA, protocol.WARMUP_FILE))
        for log in logs:
            for v in sm.replay(log).values():
                if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                    raise RuntimeError("export: a warm-up request produced non-finite outputs")
    finally:
        sm.close()
    return {"max_abs_diff": max(diffs.values()), "per_signature": diffs, "examples": len(examples),
            "warmup_records": len(logs), "session": served}


def _max_diff(served: dict, expected: dict) -> float:
    if set(served) != set(expected):
        raise RuntimeError(f"export: outputs {sorted(served)} != expected {sorted(expected)}")
    return max((float(np.max(np.abs(served[k] - expected[k]), initial=0.0)) for k in expected), default=0.0)


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
    p.add_argument("--version", type=int, default=None, help="explicit version (default: highest + 1)")
    p.add_argument("--reference", default="", help="JSON with reference (e.g. Bayes-optimal) metrics per task")
    p.add_argument("--show", type=int, default=5, help="held-out examples to print")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    path, check = export(args.run_dir, args.export_base, args.model_name, version=args.version)
    print(f"export: TF Serving loader check on {check['examples']} eval examples: "
          f"max |session - in-process| = {check['max_abs_diff']:.2e} (<= {MAX_ABS_DIFF}); per signature: "
          + ", ".join(f"{s} {d:.1e}" for s, d in check["per_signature"].items())
          + f"; {check['warmup_records']} warm-up records replayed")
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
