"""gRPC client of TF Serving's PredictionService (this project's server or ``tensorflow_model_server``).

    python -m serving.client score --server 127.0.0.1:8500 --model fm --schema runs/export/fm/1 \\
        [--splits 4] [--metrics] data/raw/eval.libffm
    python -m serving.client score ... --schema runs/export/fm/1 --context_fields user,query,hour,device FILE
    python -m serving.client score ... --format ids FILE     # lines of field_id:hash:value tokens
    python -m serving.client status --server 127.0.0.1:8500 --model fm

The client featurizes nothing. ``score`` parses libfm/libffm lines with the ETL's own parser
(``serving.examples``: every format the ETL accepts) and sends raw tf.Examples, one feature per
field named as the field; the served graph hashes, looks up, bins, scales, joins the entity tables
and fills missing fields (``featurization``). ``--schema`` is the export version directory: its
``assets.extra`` holds the schema (format, fields) and, for libfm, the field map. With
``--context_fields`` the lines become one ``rank`` request: the first line's context fields are
sent once, each line's other fields as a candidate. ``--metrics`` prints AUC and logloss against
the lines' labels (stderr).

``ServingClient.score_examples`` / ``score_ids`` score one request's candidate
ads by splitting them into ``splits`` sub-requests sent concurrently (gRPC
futures on one channel, the last one a blocking call in the caller's thread),
each with the remaining deadline; sub-requests failing with a transient status
(UNAVAILABLE, ABORTED, or DEADLINE_EXCEEDED of one attempt while the overall
deadline has time left) are retried with backoff.
If a version swap lands between sub-requests, the ones answered by the older
version are re-sent pinned to the newer one, so every ad of a call is scored by
one version. ``ServingClient.rank(context, candidates)`` sends one ``rank`` request.

``score`` prints, per input line, ``output=probability`` for every model
output, tab-separated, in input order.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import grpc
import numpy as np
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
                                     regression_pb2)

from feature_schema import SCHEMA_FILENAME, Schema, load_schema, metrics
from serving import examples as examples_lib
from serving import protocol
from serving.protocol import (CONTEXT_INPUT, DEFAULT_SIGNATURE, EXAMPLES_INPUT, FIELDS_INPUT, IDS_INPUT,
                              IDS_SIGNATURE, RANK_SIGNATURE, VALUES_INPUT)

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
FIELD_MAP_FILE = "field_map.tsv"  # export.exporter.FIELD_MAP_FILE
HTTP2_WINDOW_BYTES = 4 << 20
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
# What gRPC's server says when it sheds a request over its admission limit (serving.server's
# --max_concurrent_requests): retried with backoff like UNAVAILABLE, unlike a message over the size cap.
SHED_DETAILS = "Concurrent RPC limit exceeded"


def _transient(e: grpc.RpcError) -> bool:
    code = e.code()
    return code in RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and SHED_DETAILS in (e.details() or ""))


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Outputs of one scoring call: {output key: array [n]} and the version that produced all of them."""

    outputs: dict
    version: int


class ScoringError(RuntimeError):
    """A scoring call failed after its retries; ``code`` is the last gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code


class ServingClient:
    """Client of one served model.

    Args:
      target: ``host:port`` of the server.
      model_name: the served model.
      version: pin a version (default: the server's latest, or ``version_label``).
      version_label: a label of models.config (``stable``, ``canary``).
      timeout_s: deadline of one scoring call, retries included.
      attempt_timeout_s: deadline of one attempt (default: whatever is left of ``timeout_s``).
      retries: extra rounds for the sub-requests that failed transiently; a round in which some
        sub-request was answered does not count (the server admits them a few at a time).
      backoff_s: wait before the first retry, doubled for each next one.
      max_message_bytes: cap on request and response size.
    """

    def __init__(self, target: str, model_name: str, version: int | None = None, version_label: str = "",
                 timeout_s: float = 5.0, attempt_timeout_s: float | None = None, retries: int = 2,
                 backoff_s: float = 0.02, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.model_name = model_name
        self.version = version
        self.version_label = version_label
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.http2.lookahead_bytes", HTTP2_WINDOW_BYTES)])  # large responses in one window
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)

    def _spec(self, spec, signature: str, version: int | None = None) -> None:
        spec.name = self.model_name
        spec.signature_name = signature
        version = version if version is not None else self.version
        if version is not None:
            spec.version.value = version
        elif self.version_label:
            spec.version_label = self.version_label

    # ---- Predict, split into concurrent sub-requests

    def score_examples(self, examples, splits: int = 1, signature: str = DEFAULT_SIGNATURE,
                       output_filter=()) -> Prediction:
        """Scores serialized tf.Examples (one candidate ad each) with a Predict signature on ``examples``."""
        def build(lo, hi, version):
            req = predict_pb2.PredictRequest()
            self._spec(req.model_spec, signature, version)
            protocol.strings_proto(examples[lo:hi], req.inputs[EXAMPLES_INPUT])
            req.output_filter.extend(output_filter)
            return req
        return self._scatter(len(examples), splits, build)

    def rank(self, context: bytes, candidates, signature: str = RANK_SIGNATURE, output_filter=()) -> Prediction:
        """Scores candidates that share one context (raw Examples; a candidate's field overrides the
        context's) with one ``rank`` request: the shared fields travel once."""
        def build(lo, hi, version):
            req = predict_pb2.PredictRequest()
            self._spec(req.model_spec, signature, version)
            protocol.strings_proto([context], req.inputs[CONTEXT_INPUT], scalar=True)
            protocol.strings_proto(candidates, req.inputs[EXAMPLES_INPUT])
            req.output_filter.extend(output_filter)
            return req
        return self._scatter(1, 1, build)

    def score_ids(self, ids, values, fields, splits: int = 1, signature: str = IDS_SIGNATURE,
                  output_filter=()) -> Prediction:
        """Scores dense padded ``predict_ids`` inputs (see ``serving.protocol``: field -1 pads)."""
        arrays = (np.asarray(ids, np.int64), np.asarray(values, np.float32), np.asarray(fields, np.int64))

        def build(lo, hi, version):
            req = predict_pb2.PredictRequest()
            self._spec(req.model_spec, signature, version)
            for key, arr in zip((IDS_INPUT, VALUES_INPUT, FIELDS_INPUT), arrays):
                protocol.from_ndarray(arr[lo:hi], req.inputs[key])
            req.output_filter.extend(output_filter)
            return req
        return self._scatter(len(arrays[0]), splits, build)

    def predict(self, inputs: dict, signature: str = DEFAULT_SIGNATURE, output_filter=()) -> Prediction:
        """One Predict request of {input key: array} (no splitting)."""
        def build(lo, hi, version):
            req = predict_pb2.PredictRequest()
            self._spec(req.model_spec, signature, version)
            for key, arr in inputs.items():
                protocol.from_ndarray(arr, req.inputs[key])
            req.output_filter.extend(output_filter)
            return req
        return self._scatter(1, 1, build)

    def _scatter(self, n: int, splits: int, build) -> Prediction:
        k = max(1, min(splits, n))
        bounds = [(n * i // k, n * (i + 1) // k) for i in range(k)]
        deadline = time.monotonic() + self.timeout_s
        for _ in range(self.retries + 2):
            responses = self._gather({i: build(lo, hi, None) for i, (lo, hi) in enumerate(bounds)}, deadline)
            versions = {r.model_spec.version.value for r in responses.values()}
            if len(versions) == 1:
                break
            # A swap landed between sub-requests: rescore the others on the newest version; if that one
            # is already gone (a rollback), score the whole call again.
            newest = max(versions)
            redo = {i: build(*bounds[i], newest) for i, r in responses.items() if r.model_spec.version.value != newest}
            try:
                responses.update(self._gather(redo, deadline))
                break
            except ScoringError as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    raise
        else:
            raise ScoringError(grpc.StatusCode.UNAVAILABLE, "versions kept changing between sub-requests")
        newest = max(r.model_spec.version.value for r in responses.values())
        keys = list(responses[0].outputs)
        outputs = {}
        for key in keys:
            parts = [protocol.to_ndarray(responses[i].outputs[key]) for i in range(k)]
            outputs[key] = parts[0] if k == 1 else np.concatenate(parts)
        return Prediction(outputs, newest)

    def _gather(self, requests: dict, deadline: float) -> dict:
        """Sends requests concurrently, retrying transient failures until ``deadline``; returns the responses."""
        results, pending, attempt = {}, dict(requests), 0
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScoringError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{len(pending)} sub-requests left at deadline")
            per_attempt = min(remaining, self.attempt_timeout_s or remaining)
            # The last sub-request is a blocking call, which polls in this thread (no hand-off to gRPC's
            # poller thread); the others are futures already in flight, so they run concurrently with it.
            *others, (last, last_req) = pending.items()
            futures = {i: self.stub.Predict.future(req, timeout=per_attempt) for i, req in others}
            futures[last] = _Done(self.stub.Predict, last_req, per_attempt)
            failed, progress = {}, False
            for i, fut in futures.items():
                try:
                    results[i] = fut.result()
                    progress = True
                except grpc.RpcError as e:
                    code = e.code()
                    transient = _transient(e) or (code == grpc.StatusCode.DEADLINE_EXCEEDED
                                                      and deadline - time.monotonic() > 0)
                    if not transient or attempt >= self.retries:
                        for f in futures.values():
                            f.cancel()
                        raise ScoringError(code, e.details() or "") from None
                    failed[i] = pending[i]
            pending = failed
            if pending:
                time.sleep(min(self.backoff_s * (2 ** attempt), max(0.0, deadline - time.monotonic())))
                # A round in which some sub-requests were answered costs no retry: the server admits
                # this call's sub-requests a few at a time (more of them than its admission limit).
                attempt += not progress
        return results

    # ---- Classify, Regress, metadata, status

    def classify(self, examples, signature: str = protocol.CLASSIFY_SIGNATURE) -> tuple[list, np.ndarray, int]:
        """(class labels per example, scores [n, classes], version) of serialized tf.Examples."""
        req = classification_pb2.ClassificationRequest()
        self._spec(req.model_spec, signature)
        for s in examples:
            req.input.example_list.examples.add().ParseFromString(s)
        resp = self._call(self.stub.Classify, req)
        labels = [[c.label for c in cl.classes] for cl in resp.result.classifications]
        scores = np.array([[c.score for c in cl.classes] for cl in resp.result.classifications], np.float32)
        return labels, scores, resp.model_spec.version.value

    def regress(self, examples, signature: str = protocol.REGRESS_SIGNATURE) -> tuple[np.ndarray, int]:
        """(values [n], version) of serialized tf.Examples."""
        req = regression_pb2.RegressionRequest()
        self._spec(req.model_spec, signature)
        for s in examples:
            req.input.example_list.examples.add().ParseFromString(s)
        resp = self._call(self.stub.Regress, req)
        return np.array([r.value for r in resp.result.regressions], np.float32), resp.model_spec.version.value

    def metadata(self) -> tuple[dict, int]:
        """({signature name: SignatureDef}, version) of the served version."""
        req = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(req.model_spec, "")
        req.metadata_field.append("signature_def")
        resp = self._call(self.stub.GetModelMetadata, req)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        resp.metadata["signature_def"].Unpack(sig_map)
        return dict(sig_map.signature_def), resp.model_spec.version.value

    def status(self) -> list[tuple[int, str, str]]:
        """[(version, state name, error message)] of the model's versions (or the pinned one)."""
        req = get_model_status_pb2.GetModelStatusRequest()
        self._spec(req.model_spec, "")
        req.model_spec.ClearField("signature_name")
        resp = self._call(self.model_stub.GetModelStatus, req)
        state = get_model_status_pb2.ModelVersionStatus.State
        return [(s.version, state.Name(s.state), s.status.error_message) for s in resp.model_version_status]

    def _call(self, method, req):
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(self.retries + 1):
            try:
                return method(req, timeout=max(1e-3, deadline - time.monotonic()))
            except grpc.RpcError as e:
                if not _transient(e) or attempt == self.retries or time.monotonic() >= deadline:
                    raise ScoringError(e.code(), e.details() or "") from None
                time.sleep(self.backoff_s * (2 ** attempt))
        raise AssertionError("unreachable")


class _Done:
    """A blocking call shaped like a gRPC future (``result``, ``cancel``)."""

    def __init__(self, method, req, timeout):
        try:
            self._value, self._error = method(req, timeout=timeout), None
        except grpc.RpcError as e:
            self._value, self._error = None, e

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self):
        return False


# ---------------------------------------------------------------------------------------------
# Lines -> requests (raw Examples: the client featurizes nothing)


def parse_id_line(line: str) -> list[tuple[int, float, int]]:
    """``(hash, value, field id)`` of a pre-hashed line of ``field_id:hash:value`` tokens (``predict_ids``)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    out = []
    for tok in line.split():
        parts = tok.split(":")
        if len(parts) != 3:
            raise ValueError(f"token {tok!r} is not field_id:hash:value")
        out.append((int(parts[1]), float(parts[2]), int(parts[0])))
    return out


def _load_schema(path: str) -> Schema:
    """A schema from schema.json, an ETL output dir, or an export version dir (assets.extra/schema.json)."""
    extra = os.path.join(path, protocol.ASSETS_EXTRA, SCHEMA_FILENAME)
    return load_schema(extra if os.path.exists(extra) else path)


def _field_map(schema_path: str, field_map: str) -> dict | None:
    """The field map: ``--field_map``, else the export's ``assets.extra/field_map.tsv`` if there."""
    if not field_map and schema_path:
        candidate = os.path.join(schema_path, protocol.ASSETS_EXTRA, FIELD_MAP_FILE)
        field_map = candidate if os.path.exists(candidate) else ""
    return examples_lib.read_field_map(field_map) if field_map else None


def parse_lines(builder: examples_lib.ExampleBuilder, lines) -> tuple[list, list]:
    """(labels or None per line, (field, key, value) features per line); errors name the line."""
    labels, feats = [], []
    for lineno, line in enumerate(lines, start=1):
        try:
            y, f = builder.parse(line)
        except ValueError as e:  # parsing.ParseError included
            raise ValueError(f"line {lineno}: {e}") from None
        labels.append(y)
        feats.append(f)
    return labels, feats


def score_lines(client: ServingClient, lines, fmt: str, schema: Schema | None = None, field_map=None,
                signature: str = "", splits: int = 1, context_fields=(), outputs=(),
                extra=()) -> tuple[Prediction, list]:
    """Scores text lines as one request's candidates; returns (prediction, labels per line or None).

    ``fmt`` ``ids``: pre-hashed lines to ``predict_ids``. Otherwise libfm/libffm lines become raw
    Examples (``serving.examples``) sent to ``serving_default``, or with ``context_fields`` one
    ``rank`` request: the first line's context fields are the shared context, every line's other
    fields a candidate. ``outputs`` limits the outputs (Predict's ``output_filter``); ``extra``
    features go into every Example (e.g. ``("bid", "bid", 1.0)``: a fusion export needs a bid, which
    log lines lack).
    """
    lines = [line for line in lines if line.strip()]
    if fmt == "ids":
        rows = [parse_id_line(line) for line in lines]
        return client.score_ids(*protocol.pad_ids(rows), splits=splits, signature=signature or IDS_SIGNATURE), []
    if schema is None:
        raise ValueError(f"{fmt} lines need --schema (the export version dir or its assets.extra/schema.json)")
    if fmt != schema.format:
        raise ValueError(f"the model was trained on {schema.format} lines, got --format {fmt}")
    builder = examples_lib.ExampleBuilder(schema, field_map)
    labels, feats = parse_lines(builder, lines)
    feats = [f + list(extra) for f in feats]
    builder.value_fields = builder.value_fields | {e[0] for e in extra}  # extra features carry numbers
    if context_fields:
        context = builder.example(builder.split(feats[0], context_fields)[0])
        cands = [builder.example(builder.split(f, context_fields)[1]) for f in feats]
        return client.rank(context, cands, output_filter=outputs), labels
    examples = [builder.example(f) for f in feats]
    return client.score_examples(examples, splits=splits, signature=signature or DEFAULT_SIGNATURE,
                                 output_filter=outputs), labels


def report(pred: Prediction, labels: list, schema: Schema) -> list[str]:
    """AUC and logloss of every output named as a label, against the lines' labels."""
    if not labels or any(y is None for y in labels):
        return []
    rows = []
    for i, name in enumerate(schema.label_names):
        if name in pred.outputs:
            y = np.array([lab[i] for lab in labels], np.float64)
            r = metrics.binary_report(y, pred.outputs[name])
            rows.append(f"{name}: AUC {r['auc']:.4f} logloss {r['logloss']:.4f} ({r['examples']} lines)")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Client of a TF-Serving-protocol server.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("score", "status"):
        s = sub.add_parser(name)
        s.add_argument("--server", default="127.0.0.1:8500")
        s.add_argument("--model", required=True)
        s.add_argument("--version", type=int, default=None)
        s.add_argument("--version_label", default="")
        s.add_argument("--timeout", type=float, default=10.0, help="deadline of the call, retries included (s)")
        s.add_argument("--retries", type=int, default=2)
    s = sub.choices["score"]
    s.add_argument("--format", choices=("libffm", "libfm", "ids"), default="",
                   help="line format (default: the schema's)")
    s.add_argument("--schema", default="", help="export version dir (or schema.json / ETL dir): fields, format")
    s.add_argument("--field_map", default="", help="feature<TAB>field TSV (libfm; default: the export's copy)")
    s.add_argument("--signature", default="", help="serving_default (default), predict_ids (--format ids)")
    s.add_argument("--splits", type=int, default=1, help="concurrent sub-requests")
    s.add_argument("--context_fields", default="",
                   help="comma-separated fields shared by all lines: one rank request (first line's context)")
    s.add_argument("--metrics", action="store_true", help="print AUC and logloss against the lines' labels")
    s.add_argument("--outputs", default="", help="comma-separated outputs to return (default: all)")
    s.add_argument("--bid", type=float, default=None,
                   help="add this bid to every Example (the float feature 'bid'): a fusion export needs one")
    s.add_argument("inputs", nargs="*", default=["-"], help="files of lines (- : stdin)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with ServingClient(args.server, args.model, args.version, args.version_label, timeout_s=args.timeout,
                       retries=args.retries) as client:
        if args.command == "status":
            for version, state, error in client.status():
                print(f"{args.model}\t{version}\t{state}\t{error}")
            return
        lines = []
        for path in args.inputs:
            if path == "-":
                lines.extend(sys.stdin.buffer.read().splitlines())
            else:
                with open(path, "rb") as f:
                    lines.extend(f.read().splitlines())
        schema = _load_schema(args.schema) if args.schema else None
        fmt = args.format or (schema.format if schema else "ids")
        field_map = _field_map(args.schema, args.field_map) if fmt == "libfm" else None
        ctx = frozenset(f for f in args.context_fields.split(",") if f)
        outputs = tuple(o for o in args.outputs.split(",") if o)
        extra = (("bid", "bid", args.bid),) if args.bid is not None else ()
        pred, labels = score_lines(client, lines, fmt, schema, field_map, args.signature, args.splits, ctx, outputs,
                                   extra)
    keys = sorted(pred.outputs)
    for i in range(len(pred.outputs[keys[0]]) if keys else 0):
        print("\t".join(f"{k}={pred.outputs[k][i]:.6f}" for k in keys))
    if args.metrics:
        for row in report(pred, labels, schema):
            print(f"metrics: {row}", file=sys.stderr)


if __name__ == "__main__":
    main()
