"""Proving an export the way TF Serving loads it: the TF1 loader into a Session, signatures run by tensor names.

``verify`` compares every signature with the in-process Keras model (max abs diff <=
``MAX_ABS_DIFF``): the hashed signatures on the ETL's eval records, the raw signatures on raw
Examples, ``rank`` against the flat raw path on the same candidates, and replays every warm-up
record. With a fusion config, the ``fusion`` output of ``serving_default`` and ``rank`` must equal
``ctr^a * cvr^b * bid`` of the served ctr and cvr and the bids the Examples carry (relative to
``max(1, |fusion|)``).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from feature_schema import Schema
from featurization import Featurizer
from serving import protocol
from serving.protocol import (CLASSIFY_CLASSES, CLASSIFY_INPUTS, CLASSIFY_METHOD, CLASSIFY_SCORES,
                              CLASSIFY_SIGNATURE, CONTEXT_INPUT, DEFAULT_SIGNATURE, EXAMPLES_INPUT, FIELDS_INPUT,
                              HASHED_SIGNATURE, IDS_INPUT, IDS_SIGNATURE, PREDICT_METHOD, RANK_SIGNATURE,
                              REGRESS_METHOD, REGRESS_OUTPUTS, REGRESS_SIGNATURE, SERVE_TAG, VALUES_INPUT)
from export.signatures import FUSION_OUTPUT
from trainer import data

MAX_ABS_DIFF = 1e-5


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
        """Runs ``signature`` on {input key: array}, in chunks of ``batch_size`` rows of the batched inputs."""
        sig = self.signatures[signature]
        if set(feeds) != set(sig.inputs):
            raise ValueError(f"{signature}: inputs {sorted(feeds)} != signature inputs {sorted(sig.inputs)}")
        fetches = {k: v.name for k, v in sig.outputs.items()}
        batched = {k for k, v in feeds.items() if np.ndim(v) > 0}
        n = len(feeds[next(iter(batched))]) if batched else 1
        parts = []
        for start in range(0, max(n, 1), batch_size):
            feed = {sig.inputs[k].name: (v[start:start + batch_size] if k in batched else v) for k, v in feeds.items()}
            parts.append(self.session.run(fetches, feed_dict=feed))
        return {k: np.concatenate([p[k] for p in parts]) for k in fetches}

    def run_examples(self, signature: str, examples: list[bytes], schema: Schema | None = None) -> dict:
        """Runs an Examples signature (``predict_ids`` gets the records' padded ids: pass the schema)."""
        sig = self.signatures[signature]
        if sig.method_name in (CLASSIFY_METHOD, REGRESS_METHOD):
            return self.run(signature, {CLASSIFY_INPUTS: _strings(examples)})
        if EXAMPLES_INPUT in sig.inputs and len(sig.inputs) == 1:
            return self.run(signature, {EXAMPLES_INPUT: _strings(examples)})
        if IDS_INPUT in sig.inputs:
            if schema is None:
                raise ValueError(f"{signature} takes ids: pass the schema")
            ids, vals, fields = protocol.pad_ids(protocol.example_rows(examples, schema))
            return self.run(signature, {IDS_INPUT: ids, VALUES_INPUT: vals, FIELDS_INPUT: fields})
        raise ValueError(f"{signature}: not an Examples signature (inputs {sorted(sig.inputs)})")

    def rank(self, context: bytes, examples: list[bytes]) -> dict:
        return self.run(RANK_SIGNATURE, {CONTEXT_INPUT: np.array(context, dtype=object),
                                         EXAMPLES_INPUT: _strings(examples)})

    def replay(self, log: prediction_log_pb2.PredictionLog) -> dict:
        """Runs one warm-up record; returns its outputs."""
        kind = log.WhichOneof("log_type")
        if kind == "predict_log":
            req = log.predict_log.request
            feeds = {k: protocol.to_ndarray(t) for k, t in req.inputs.items()}
        elif kind in ("classify_log", "regress_log"):
            req = getattr(log, kind).request
            feeds = {CLASSIFY_INPUTS: _strings([e.SerializeToString() for e in req.input.example_list.examples])}
        else:
            raise ValueError(f"unsupported warm-up record {kind!r}")
        return self.run(req.model_spec.signature_name or DEFAULT_SIGNATURE, feeds)


def _strings(values) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def in_process_predict(model, schema: Schema, examples: list[bytes], batch_size: int) -> dict:
    """The trained Keras model on the ETL's hashed records (the trainer's own input path).

    Returns:
      {serving output key: probabilities [len(examples)]}.
    """
    featurizer = Featurizer(schema)
    return _predict_batches(model, examples, batch_size,
                            lambda b: data.parse_batch(tf.constant(b), schema, featurizer)[0])


def in_process_predict_raw(model, featurizer, examples: list[bytes], batch_size: int = 4096) -> dict:
    """The trained Keras model on raw Examples featurized in-process by ``featurizer``."""
    return _predict_batches(model, examples, batch_size, lambda b: featurizer.from_examples(tf.constant(b)))


def _predict_batches(model, examples, batch_size, featurize) -> dict:
    keys = tuple(model.serving_outputs)
    out = {t: [] for t in keys}
    for start in range(0, len(examples), batch_size):
        pred = model(featurize(examples[start:start + batch_size]), training=False)
        for t in keys:
            out[t].append(pred[t].numpy())
    return {t: np.concatenate(v) if v else np.zeros([0], np.float32) for t, v in out.items()}


def max_diff(served: dict, expected: dict) -> float:
    if set(served) != set(expected):
        raise RuntimeError(f"export: outputs {sorted(served)} != expected {sorted(expected)}")
    return max((float(np.max(np.abs(served[k] - expected[k]), initial=0.0)) for k in expected), default=0.0)


def example_bids(examples: list[bytes], name: str) -> np.ndarray:
    """The float feature ``name`` of each serialized Example (NaN where it is absent), read with protobuf."""
    from tensorflow.core.example import example_pb2

    out = np.full(len(examples), np.nan)
    for i, s in enumerate(examples):
        values = example_pb2.Example.FromString(s).features.feature[name].float_list.value
        if len(values) == 1:
            out[i] = values[0]
    return out


def fusion_diff(served: dict, bids: np.ndarray, fusion) -> float:
    """Max of ``|fusion - ctr^a cvr^b bid| / max(1, |ctr^a cvr^b bid|)`` (float64 reference) over a response."""
    if np.isnan(bids).any():
        raise RuntimeError(f"export: {int(np.isnan(bids).sum())} verification Examples carry no bid")
    want = (served[fusion.ctr_output].astype(np.float64) ** fusion.a
            * served[fusion.cvr_output].astype(np.float64) ** fusion.b * bids)
    return float(np.max(np.abs(served[FUSION_OUTPUT] - want) / np.maximum(1.0, np.abs(want)), initial=0.0))


def _split_fusion(served: dict, bids: np.ndarray, fusion, diffs: dict, signature: str) -> dict:
    """Records the fusion check of ``signature`` in ``diffs``; returns the other outputs."""
    if fusion is None:
        return served
    if FUSION_OUTPUT not in served:
        raise RuntimeError(f"export: {signature} has no {FUSION_OUTPUT!r} output")
    diffs[f"{signature}.{FUSION_OUTPUT}"] = fusion_diff(served, bids, fusion)
    return {k: v for k, v in served.items() if k != FUSION_OUTPUT}


def verify(export_dir: str, model, schema: Schema, records: list[bytes], raw: list[bytes],
           rank: tuple[bytes, list[bytes]], rank_flat: list[bytes], logs, batch_size: int = 4096,
           featurizer=None, fusion=None) -> dict:
    """Compares every signature, Session-loaded, with the in-process model.

    Args:
      export_dir: the SavedModel (version directory).
      model: the trained Keras model.
      schema: its schema.
      records: held-out ETL records (hashed signatures).
      raw: raw Examples (raw signatures).
      rank: (context, candidates) raw Examples; ``rank_flat``: the same candidates as flat Examples.
      logs: the warm-up records written into the export.
      featurizer: the in-process raw featurizer (default: a new one built from ``schema``).
      fusion: the export's ``FusionConfig`` (``raw`` and the rank candidates or context carry bids), or None.

    Returns:
      {"max_abs_diff", "per_signature": {signature: max abs diff}, "examples", "warmup_records",
       "session": {output: probs of predict_hashed on ``records``}}.
    """
    featurizer = featurizer or Featurizer(schema, raw_examples=True)
    expected = in_process_predict(model, schema, records, batch_size)
    expected_raw = in_process_predict_raw(model, featurizer, raw, batch_size)
    primary = model.serving_outputs[0]
    sm = SessionModel(export_dir)
    try:
        from export.signatures import SIGNATURES

        missing = [s for s in SIGNATURES if s not in sm.signatures]
        if missing:
            raise RuntimeError(f"export: signatures {missing} missing from {export_dir}")
        diffs = {}
        served = sm.run_examples(HASHED_SIGNATURE, records)
        diffs[HASHED_SIGNATURE] = max_diff(served, expected)
        diffs[IDS_SIGNATURE] = max_diff(sm.run_examples(IDS_SIGNATURE, records, schema), expected)
        bid = fusion.bid_feature if fusion else ""
        served_raw = _split_fusion(sm.run_examples(DEFAULT_SIGNATURE, raw), example_bids(raw, bid) if bid else None,
                                   fusion, diffs, DEFAULT_SIGNATURE)
        diffs[DEFAULT_SIGNATURE] = max_diff(served_raw, expected_raw)
        cls = sm.run_examples(CLASSIFY_SIGNATURE, raw)
        if cls[CLASSIFY_CLASSES].shape != (len(raw), 2) or not np.all(
                cls[CLASSIFY_CLASSES] == np.array(protocol.CLASS_LABELS, dtype=object)):
            raise RuntimeError(f"export: {CLASSIFY_SIGNATURE} classes are not {protocol.CLASS_LABELS} per row")
        p = expected_raw[primary]
        diffs[CLASSIFY_SIGNATURE] = max_diff({"p": cls[CLASSIFY_SCORES][:, 1], "q": cls[CLASSIFY_SCORES][:, 0]},
                                             {"p": p, "q": 1.0 - p})
        diffs[REGRESS_SIGNATURE] = max_diff(sm.run_examples(REGRESS_SIGNATURE, raw), {REGRESS_OUTPUTS: p})
        flat = in_process_predict_raw(model, featurizer, rank_flat, batch_size)
        rank_bids = None
        if bid:  # a candidate's own bid, else the context's
            own, ctx = example_bids(rank[1], bid), example_bids([rank[0]], bid)[0]
            rank_bids = np.where(np.isnan(own), ctx, own)
        diffs[RANK_SIGNATURE] = max_diff(_split_fusion(sm.rank(*rank), rank_bids, fusion, diffs, RANK_SIGNATURE), flat)
        for log in logs:
            for v in sm.replay(log).values():
                if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
                    raise RuntimeError("export: a warm-up request produced non-finite outputs")
    finally:
        sm.close()
    return {"max_abs_diff": max(diffs.values()), "per_signature": diffs, "examples": len(records),
            "raw_examples": len(raw), "warmup_records": len(logs), "session": served}


def check_summary(check: dict) -> str:
    """One line of ``verify``'s result: what was checked, the largest difference and the warm-up records."""
    return (f"{check['examples']} eval records and {check['raw_examples']} raw Examples: "
            f"max |session - in-process| = {check['max_abs_diff']:.2e} (<= {MAX_ABS_DIFF}); per signature: "
            + ", ".join(f"{s} {d:.1e}" for s, d in check["per_signature"].items())
            + f"; {check['warmup_records']} warm-up records replayed")


def session_predict(export_dir: str, examples: list[bytes], signature: str = HASHED_SIGNATURE) -> dict:
    """Runs an Examples signature the way TF Serving does (``predict_ids``: the records' padded ids,
    schema read from the export's assets.extra)."""
    import os

    from feature_schema import SCHEMA_FILENAME, load_schema

    sm = SessionModel(export_dir)
    try:
        schema = None
        if signature == IDS_SIGNATURE:
            schema = load_schema(os.path.join(export_dir, protocol.ASSETS_EXTRA, SCHEMA_FILENAME))
        return sm.run_examples(signature, examples, schema)
    finally:
        sm.close()


__all__ = ["MAX_ABS_DIFF", "SessionModel", "in_process_predict", "in_process_predict_raw", "max_diff", "verify",
           "example_bids", "fusion_diff",
           "session_predict", "PREDICT_METHOD"]
