"""Serving soak: concurrent valid and malformed requests while two new versions are published.

Zero valid requests may fail, every malformed one must get a status code, and the
server process's memory must stay flat. The default run soaks 8 s; the slow
variant 60 s (`make test-all`). Figures: docs/RELIABILITY.md.
"""
from __future__ import annotations

import json
import os
import threading
import time

import grpc
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from export import exporter
from feature_schema import load_schema
from serving import client as client_lib
from serving import server, sync


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _malformed(stub, examples, k: int):
    """One of four malformed requests; returns the gRPC status code it got."""
    req = predict_pb2.PredictRequest()
    kind = k % 4
    req.model_spec.name = "ctr" if kind else "no_such_model"
    if kind == 2:
        req.model_spec.signature_name = "no_such_signature"
    if kind == 3:  # wrong dtype for the serialized-examples input
        req.inputs["examples"].dtype = 1  # DT_FLOAT
        req.inputs["examples"].float_val.extend([1.0, 2.0])
        req.inputs["examples"].tensor_shape.dim.add().size = 2
    if kind == 1:  # input missing
        pass
    try:
        stub.Predict(req, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def soak(served_export, tiny_etl, tmp_path, seconds: float) -> dict:
    schema = load_schema(tiny_etl)
    examples = exporter.eval_examples(schema, 100)
    dest = str(tmp_path / "ctr")
    sync.push(served_export["versions"][1], dest)
    manager = server.ModelManager(server.single_model_config("ctr", dest), session_config=server.session_config())
    srv = server.Server(manager, port=0, max_concurrent_requests=0)  # 5 requests at once by design
    srv.start()
    manager.start(poll_wait_s=0.1)
    ok, failed, bad_codes, stop = [0], [], [], threading.Event()
    lock = threading.Lock()

    def valid():
        with client_lib.ServingClient(srv.target, "ctr", timeout_s=30) as cl:
            while not stop.is_set():
                try:
                    cl.score_examples(examples, splits=2, signature="predict_hashed")
                    with lock:
                        ok[0] += 1
                except Exception as e:  # noqa: BLE001 (counted: must stay zero)
                    failed.append(repr(e))

    def malformed():
        channel = grpc.insecure_channel(srv.target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        k = 0
        while not stop.is_set():
            bad_codes.append(_malformed(stub, examples, k))
            k += 1
            time.sleep(0.01)
        channel.close()

    threads = [threading.Thread(target=valid) for _ in range(3)] + [threading.Thread(target=malformed)]
    published = []
    try:
        for t in threads:
            t.start()
        time.sleep(min(2.0, seconds / 4))
        rss_start = _rss_mb()
        start = time.monotonic()
        for frac, src in ((0.3, served_export["versions"][2]), (0.6, served_export["versions"][1])):
            time.sleep(max(0.0, start + frac * seconds - time.monotonic()))
            published.append(sync.push(src, dest).version)
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        # Traffic goes on until the last published version has loaded, warmed up and taken over.
        with client_lib.ServingClient(srv.target, "ctr") as status:
            deadline = time.monotonic() + 120
            while (3, "AVAILABLE") not in [tuple(s[:2]) for s in status.status()] and time.monotonic() < deadline:
                time.sleep(0.1)
            live = status.status()
        elapsed = time.monotonic() - start
        rss_end = _rss_mb()
    finally:
        stop.set()
        for t in threads:
            t.join()
        srv.stop()
    return {"seconds": round(elapsed, 1), "valid_ok": ok[0], "valid_failed": len(failed), "failures": failed[:3],
            "malformed": len(bad_codes), "malformed_codes": sorted({c.name for c in bad_codes}),
            "published_versions": published, "status_at_end": live,
            "rss_mb_start": round(rss_start, 1), "rss_mb_end": round(rss_end, 1)}


def _check(result):
    assert result["valid_failed"] == 0, result["failures"]
    assert result["valid_ok"] > 10 and result["malformed"] > 10
    assert set(result["malformed_codes"]) <= {"INVALID_ARGUMENT", "NOT_FOUND"}, result["malformed_codes"]
    assert result["published_versions"] == [2, 3]
    assert [s[:2] for s in result["status_at_end"]][-1] == (3, "AVAILABLE")
    assert result["rss_mb_end"] < 1.5 * result["rss_mb_start"], result


def test_short_soak(served_export, tiny_etl, tmp_path):
    _check(soak(served_export, tiny_etl, tmp_path, seconds=8))


@pytest.mark.slow
def test_soak_60s(served_export, tiny_etl, tmp_path):
    result = soak(served_export, tiny_etl, tmp_path, seconds=60)
    print("soak: " + json.dumps(result))
    with open(os.path.join(os.environ.get("SOAK_FIGURES_DIR", str(tmp_path)), "soak.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    _check(result)
