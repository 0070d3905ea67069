"""Warm-up requests: what TF Serving (and ``serving.server``) replay before a version takes traffic.

``assets.extra/tf_serving_warmup_requests`` is a TFRecord of ``PredictionLog``s, one per signature
and warm-up batch size. Hashed requests are held-out ETL records; raw requests are raw Examples
synthesized from the vocabulary (``synthetic_features``), so they exist even when the raw logs
are not reachable from the exporter, and they exercise the in-graph joins (no joined column is
sent), the bins, unseen keys and missing fields.
"""
from __future__ import annotations

import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, prediction_log_pb2, regression_pb2

from feature_schema import Schema
from serving import protocol
from serving.protocol import (CLASSIFY_SIGNATURE, CONTEXT_INPUT, DEFAULT_SIGNATURE, EXAMPLES_INPUT, FIELDS_INPUT,
                              HASHED_SIGNATURE, IDS_INPUT, IDS_SIGNATURE, RANK_SIGNATURE, REGRESS_SIGNATURE,
                              VALUES_INPUT)

# Warm-up batch sizes: the smallest request and a typical candidate list.
WARMUP_BATCH_SIZES = (1, 100)
UNSEEN_KEY = "__warmup_unseen__"


def synthetic_features(schema: Schema, vocabulary, n: int) -> list[list[tuple[str, str, float]]]:
    """``n`` examples of the log's fields (not the joined columns) as ``(field, key, value)`` lists.

    Keys cycle through each field's vocabulary (most frequent first); every 7th (example, field)
    is left out (a missing field) and every 5th key is unseen; binned and numeric fields take
    values spread over their training range. A sequence field gets ``0..max_length + 2`` keys of its
    ``vocabulary_of`` field (lengths cycling, so some requests are truncated by the graph), every 5th
    unseen, repeats included.
    """
    by_field: dict[str, list[str]] = {}
    for e in sorted(vocabulary, key=lambda e: (-e.count, e.index)):
        by_field.setdefault(e.field, []).append(e.key)
    log_fields = [f for f in schema.fields if not f.source.startswith("dict:")]
    out = []
    for i in range(n):
        feats = []
        for j, f in enumerate(log_fields):
            if (i + j) % 7 == 6:
                continue
            if f.sequence:
                keys = by_field.get(f.key_namespace, [])
                for p in range((i * 3 + j) % (f.max_length + 3)):
                    unseen = (i + p) % 5 == 4 or not keys
                    feats.append((f.name, UNSEEN_KEY if unseen else keys[(i + p * p) % len(keys)], 1.0))
            elif f.kind == "categorical":
                keys = by_field.get(f.name, [])
                key = UNSEEN_KEY if (i + j) % 5 == 4 or not keys else keys[(i * (j + 1)) % len(keys)]
                feats.append((f.name, key, 1.0))
            else:
                stats = f.value_stats or {"min": 0.0, "max": 1.0}
                feats.append((f.name, f.name, stats["min"] + (stats["max"] - stats["min"]) * ((i * 7 + j) % 11) / 10))
        out.append(feats)
    return out


def with_bids(features: list, bid_feature: str) -> list:
    """Each example of ``synthetic_features`` with a bid ``(bid_feature, bid_feature, value)`` appended:
    0.25, 0.5, ..., 2.5 cycling (the fusion output's input; a float feature like a numeric field's)."""
    return [feats + [(bid_feature, bid_feature, 0.25 * (1 + (i * 3) % 10))] for i, feats in enumerate(features)]


def context_fields(schema: Schema) -> frozenset:
    """Fields a ``rank`` request shares across candidates in the synthesized requests: all but the
    entity tables' key fields (the candidate, e.g. ``item``) and the linear-only fields (``position``)."""
    per_candidate = {t.key_field for t in schema.entity_tables} | {f.name for f in schema.fields if f.linear_only}
    if not per_candidate:
        per_candidate = {schema.fields[-1].name}
    return frozenset(f.name for f in schema.fields if f.name not in per_candidate)


def _rank_parts(schema: Schema, features: list, bid_feature: str = "") -> tuple[list, list[list]]:
    """(context features, candidates' features) of a synthesized ``rank`` request.

    With ``bid_feature`` the context holds the first example's bid and every third candidate
    (1, 4, 7, ...) sends none, so both of ``rank``'s bid sources are exercised.
    """
    ctx_fields = context_fields(schema)
    ctx = [f for f in features[0] if f[0] in ctx_fields]
    cands = [[f for f in feats if f[0] not in ctx_fields] for feats in features]
    if bid_feature:
        ctx += [f for f in features[0] if f[0] == bid_feature]
        cands = [[f for f in c if not (f[0] == bid_feature and i % 3 == 1)] for i, c in enumerate(cands)]
    return ctx, cands


def rank_request(schema: Schema, features: list, bid_feature: str = "") -> tuple[bytes, list[bytes]]:
    """(context, candidates) raw Examples: the first example's context fields, each example's others
    (``_rank_parts``; ``bid_feature``: the fusion output's bid, a float feature)."""
    value_fields = {f.name for f in schema.fields if f.kind != "categorical"} | ({bid_feature} - {""})
    ctx, cands = _rank_parts(schema, features, bid_feature)
    return protocol.raw_example(ctx, value_fields), [protocol.raw_example(c, value_fields) for c in cands]


def merged_features(schema: Schema, features: list, bid_feature: str = "") -> list[list]:
    """The flat equivalent of ``rank_request``: each candidate with the context's features it lacks."""
    ctx, cands = _rank_parts(schema, features, bid_feature)
    return [c + [f for f in ctx if f[0] not in {g[0] for g in c}] for c in cands]


def warmup_logs(model_name: str, records: list[bytes], raw: list[bytes], rank: tuple[bytes, list[bytes]],
                schema: Schema, batch_sizes=WARMUP_BATCH_SIZES) -> list[prediction_log_pb2.PredictionLog]:
    """One PredictionLog per signature and batch size.

    Args:
      model_name: the served name.
      records: held-out hashed records (``predict_hashed``, ``predict_ids``).
      raw: raw Examples (``serving_default``, Classify, Regress).
      rank: (context, candidates) of one ``rank`` request.
      schema: the model's schema.
      batch_sizes: examples per request.
    """
    logs = []

    def predict(signature, inputs):
        log = prediction_log_pb2.PredictionLog()
        req = log.predict_log.request
        req.model_spec.name, req.model_spec.signature_name = model_name, signature
        for key, fill in inputs.items():
            fill(req.inputs[key])
        logs.append(log)

    for b in sorted(set(batch_sizes)):
        if records:
            batch = records[:b]
            predict(HASHED_SIGNATURE, {EXAMPLES_INPUT: lambda t, batch=batch: protocol.strings_proto(batch, t)})
            arrays = protocol.pad_ids(protocol.example_rows(batch, schema))
            predict(IDS_SIGNATURE, {k: (lambda t, a=a: protocol.from_ndarray(a, t))
                                    for k, a in zip((IDS_INPUT, VALUES_INPUT, FIELDS_INPUT), arrays)})
        if raw:
            batch = raw[:b]
            predict(DEFAULT_SIGNATURE, {EXAMPLES_INPUT: lambda t, batch=batch: protocol.strings_proto(batch, t)})
            for sig, field, request_cls in ((CLASSIFY_SIGNATURE, "classify_log",
                                             classification_pb2.ClassificationRequest),
                                            (REGRESS_SIGNATURE, "regress_log", regression_pb2.RegressionRequest)):
                log = prediction_log_pb2.PredictionLog()
                req = request_cls()
                req.model_spec.name, req.model_spec.signature_name = model_name, sig
                for s in batch:
                    req.input.example_list.examples.add().ParseFromString(s)
                getattr(log, field).request.CopyFrom(req)
                logs.append(log)
        if rank:
            context, cands = rank[0], rank[1][:b]
            predict(RANK_SIGNATURE, {CONTEXT_INPUT: lambda t: protocol.strings_proto([context], t, scalar=True),
                                     EXAMPLES_INPUT: lambda t, c=cands: protocol.strings_proto(c, t)})
    return logs


def write_warmup(path: str, logs) -> None:
    with tf.io.TFRecordWriter(path) as w:
        for log in logs:
            w.write(log.SerializeToString())


def read_warmup(path: str) -> list[prediction_log_pb2.PredictionLog]:
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
