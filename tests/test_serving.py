"""The local TF-Serving-protocol server over real gRPC on 127.0.0.1, with the tensorflow-serving-api stubs.

The module server reads serving_configs/models.config as committed (model "fm", versions 1 and 2,
labels stable=1 and canary=2) with --base_path pointing at a copy of the session's exports: version
1 is an LR model, version 2 an FM model, so every answer shows which version produced it.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, model_management_pb2, predict_pb2, regression_pb2)

from export import exporter
from export import verify as verify_lib
from feature_schema import load_schema
from featurization import Featurizer
from serving import client as client_lib
from serving import manager as manager_lib
from serving import protocol, server, sync
from serving.examples import ExampleBuilder
from trainer import train as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "serving_configs")
N = 300
CAP = 4 << 20


@pytest.fixture(scope="module")
def env(served_export, tiny_etl, tiny_raw, tmp_path_factory):
    """Raw Examples of the first N eval lines (what clients send) with the in-process predictions; the
    ETL's first N eval records (the pre-hashed paths) with theirs."""
    schema = load_schema(tiny_etl)
    with open(os.path.join(tiny_raw[0], "eval.libffm"), "rb") as f:
        lines = f.read().splitlines()[:N]
    builder = ExampleBuilder(schema)
    examples = [builder.line_example(line)[1] for line in lines]
    records = exporter.eval_examples(schema, N)
    fz = Featurizer(schema, raw_examples=True)
    expected, expected_records = {}, {}
    for v, name in ((1, "lr"), (2, "fm")):
        _, _, model = trainer_lib.load_trained(served_export["runs"][name])
        expected[v] = verify_lib.in_process_predict_raw(model, fz, examples)["click"]
        expected_records[v] = exporter.in_process_predict(model, schema, records, N)["click"]
    base = str(tmp_path_factory.mktemp("serving"))
    for v, path in served_export["versions"].items():
        shutil.copytree(path, os.path.join(base, "fm", str(v)))
    config = server.read_config(os.path.join(CONFIGS, "models.config"))
    manager = server.ModelManager(config, base_path=base, session_config=server.session_config())
    # No admission limit: test_predict_ids_split_into_concurrent_subrequests sends 300 sub-requests at once.
    srv = server.Server(manager, port=0, max_message_bytes=CAP, max_concurrent_requests=0)
    srv.start()
    client = client_lib.ServingClient(srv.target, "fm", timeout_s=30)
    yield {"schema": schema, "examples": examples, "expected": expected, "server": srv, "client": client,
           "base": base, "export": served_export, "records": records, "expected_records": expected_records,
           "lines": lines}
    client.close()
    srv.stop()


def _close(got, want):
    return np.max(np.abs(np.asarray(got) - np.asarray(want))) <= 1e-5


def test_predict_serving_default_latest_pinned_and_by_label(env):
    c, ex, exp = env["client"], env["examples"], env["expected"]
    assert env["server"].target.startswith("127.0.0.1:")
    pred = c.score_examples(ex)
    assert pred.version == 2 and set(pred.outputs) == {"click"} and _close(pred.outputs["click"], exp[2])
    for label, version in (("stable", 1), ("canary", 2)):
        with client_lib.ServingClient(env["server"].target, "fm", version_label=label) as cl:
            pred = cl.score_examples(ex[:50])
        assert pred.version == version and _close(pred.outputs["click"], exp[version][:50])
    with client_lib.ServingClient(env["server"].target, "fm", version=1) as cl:
        assert _close(cl.score_examples(ex[:7]).outputs["click"], exp[1][:7])


@pytest.mark.parametrize("splits", [1, 2, 4, 1000])
def test_predict_ids_split_into_concurrent_subrequests(env, splits):
    rows = protocol.example_rows(env["records"], env["schema"])
    pred = env["client"].score_ids(*protocol.pad_ids(rows), splits=splits)
    assert pred.version == 2 and pred.outputs["click"].shape == (N,)
    assert _close(pred.outputs["click"], env["expected_records"][2])
    pred = env["client"].score_examples(env["examples"], splits=splits)
    assert _close(pred.outputs["click"], env["expected"][2])


def test_classify_and_regress(env):
    c, ex, p = env["client"], env["examples"][:40], env["expected"][2][:40]
    labels, scores, version = c.classify(ex)
    assert version == 2 and labels == [["0", "1"]] * 40
    assert _close(scores[:, 1], p) and _close(scores[:, 0], 1 - p)
    values, version = c.regress(ex)
    assert version == 2 and _close(values, p)
    # Context features are merged into each example: an empty example with the whole example as
    # context scores like the example itself.
    req = regression_pb2.RegressionRequest()
    req.model_spec.name, req.model_spec.signature_name = "fm", "regression"
    req.input.example_list_with_context.context.ParseFromString(ex[3])
    req.input.example_list_with_context.examples.add()
    resp = c.stub.Regress(req, timeout=10)
    assert abs(resp.result.regressions[0].value - p[3]) <= 1e-5


def test_loader_imports_the_same_graph_in_short_steps(env):
    """``manager.load_saved_model``: the TF1 loader's signatures, functions and answers, with the function
    library added one function at a time and call ops marked to skip shape inference at import (the
    one long GIL hold of a version load; docs/SERVING.md, swap)."""
    path = env["export"]["versions"][2]
    lv = server.LoadedVersion("fm", 2, path, server.session_config())
    try:
        with tf.compat.v1.Session(graph=tf.Graph()) as ref:
            meta = tf.compat.v1.saved_model.loader.load(ref, ["serve"], path)
            assert lv.signature_defs == dict(meta.signature_def)
            want_fns = {f.signature.name for f in ref.graph.as_graph_def().library.function}
            got_fns = {f.signature.name for f in lv.graph.as_graph_def().library.function}
            assert got_fns == want_fns and len(want_fns) > 5
            calls = [op for op in lv.graph.get_operations() if op.type in manager_lib.CALL_OPS]
            assert calls and all(op.get_attr("_disable_call_shape_inference") for op in calls)
            sig = meta.signature_def["serving_default"]
            feed = {sig.inputs["examples"].name: np.array(env["examples"], dtype=object)}
            outs = sorted(sig.outputs)
            want = ref.run([sig.outputs[k].name for k in outs], feed)
        got = lv.session.run([sig.outputs[k].name for k in outs], feed)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g, w)
        assert _close(got[outs.index("click")], env["expected"][2])
    finally:
        lv.retire()


def test_model_metadata_is_the_savedmodel_signature_map(env):
    sigs, version = env["client"].metadata()
    assert version == 2
    sm = exporter.SessionModel(env["export"]["versions"][2])
    sm.close()
    assert sigs == sm.signatures
    assert sigs["classification"].method_name == "tensorflow/serving/classify"


def test_model_status_and_reload_config(env):
    c = env["client"]
    assert c.status() == [(1, "AVAILABLE", ""), (2, "AVAILABLE", "")]
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name, req.model_spec.version_label = "fm", "stable"
    resp = c.model_stub.GetModelStatus(req, timeout=10)
    assert [(s.version, s.state) for s in resp.model_version_status] == [(1, 30)]  # AVAILABLE
    # Promote the canary: stable -> 2 through HandleReloadConfigRequest, then back.
    config = server.read_config(os.path.join(CONFIGS, "models.config"))
    try:
        config.model_config_list.config[0].version_labels["stable"] = 2
        c.model_stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=30)
        with client_lib.ServingClient(env["server"].target, "fm", version_label="stable") as cl:
            assert cl.score_examples(env["examples"][:5]).version == 2
    finally:
        config.model_config_list.config[0].version_labels["stable"] = 1
        c.model_stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=30)
    assert c.status() == [(1, "AVAILABLE", ""), (2, "AVAILABLE", "")]


def _predict(name="fm", signature="", inputs=None, **spec):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.model_spec.signature_name = signature
    if "version" in spec:
        req.model_spec.version.value = spec.pop("version")
    for k, v in spec.items():
        setattr(req.model_spec, k, v)
    for k, t in (inputs or {}).items():
        req.inputs[k].CopyFrom(t)
    return req


def _bad_requests(good_examples):
    ex = protocol.strings_proto(good_examples[:2])
    as_float = protocol.from_ndarray(np.ones(2, np.float32))
    two_d = protocol.from_ndarray(np.array([[good_examples[0]], [good_examples[1]]], dtype=object))
    short = protocol.from_ndarray(np.ones(4, np.int64))
    short.tensor_content = short.tensor_content[:-1]
    ids = {"ids": protocol.from_ndarray(np.zeros((2, 3), np.int64)),
           "values": protocol.from_ndarray(np.zeros((2, 4), np.float32)),
           "fields": protocol.from_ndarray(np.zeros((2, 4), np.int64))}
    filtered = _predict(inputs={"examples": ex})
    filtered.output_filter.append("nope")
    no_name = _predict(name="", inputs={"examples": ex})
    classify_default = classification_pb2.ClassificationRequest()
    classify_default.model_spec.name = "fm"
    classify_default.input.example_list.examples.add().ParseFromString(good_examples[0])
    classify_empty = classification_pb2.ClassificationRequest()
    classify_empty.model_spec.name, classify_empty.model_spec.signature_name = "fm", "classification"
    regress_unknown = regression_pb2.RegressionRequest()
    regress_unknown.model_spec.name = "nope"
    meta_bad = get_model_metadata_pb2.GetModelMetadataRequest()
    meta_bad.model_spec.name = "fm"
    meta_bad.metadata_field.append("nope")
    status_unknown = get_model_status_pb2.GetModelStatusRequest()
    status_unknown.model_spec.name = "nope"
    status_version = get_model_status_pb2.GetModelStatusRequest()
    status_version.model_spec.name = "fm"
    status_version.model_spec.version.value = 99
    NF, IA = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("unknown model", "Predict", _predict(name="nope", inputs={"examples": ex}), NF),
        ("unknown version", "Predict", _predict(inputs={"examples": ex}, version=99), NF),
        ("unknown signature", "Predict", _predict(signature="nope", inputs={"examples": ex}), NF),
        ("unknown label", "Predict", _predict(inputs={"examples": ex}, version_label="nope"), IA),
        ("no model name", "Predict", no_name, IA),
        ("wrong input key", "Predict", _predict(inputs={"x": ex}), IA),
        ("missing input", "Predict", _predict(), IA),
        ("wrong dtype", "Predict", _predict(inputs={"examples": as_float}), IA),
        ("wrong rank", "Predict", _predict(inputs={"examples": two_d}), IA),
        ("not a tf.Example", "Predict",
         _predict(inputs={"examples": protocol.strings_proto([b"\xff\xfe not a proto"])}), IA),
        ("truncated tensor_content", "Predict", _predict(signature="predict_ids", inputs={
            "ids": short, "values": protocol.from_ndarray(np.ones(4, np.float32)), "fields": short}), IA),
        ("mismatched id shapes", "Predict", _predict(signature="predict_ids", inputs=ids), IA),
        ("unknown output_filter", "Predict", filtered, IA),
        ("Classify on a predict signature", "Classify", classify_default, IA),
        ("Classify without examples", "Classify", classify_empty, IA),
        ("Regress unknown model", "Regress", regress_unknown, NF),
        ("unknown metadata field", "GetModelMetadata", meta_bad, IA),
        ("status of unknown model", "GetModelStatus", status_unknown, NF),
        ("status of unknown version", "GetModelStatus", status_version, NF),
        ("MultiInference", "MultiInference", inference_pb2.MultiInferenceRequest(), grpc.StatusCode.UNIMPLEMENTED),
    ]


def test_bad_requests_get_their_status_and_the_server_keeps_serving(env):
    c, ex = env["client"], env["examples"]
    for what, method, req, code in _bad_requests(ex):
        stub = c.model_stub if method == "GetModelStatus" else c.stub
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, method)(req, timeout=10)
        assert err.value.code() == code, (what, err.value.code(), err.value.details())
        assert _close(c.score_examples(ex[:3]).outputs["click"], env["expected"][2][:3]), what
    # Over the message cap: gRPC refuses it before the handler; the server stays up.
    huge = _predict(inputs={"examples": protocol.strings_proto([b"x" * (CAP + 1024)])})
    with pytest.raises(grpc.RpcError) as err:
        c.stub.Predict(huge, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _close(c.score_examples(ex).outputs["click"], env["expected"][2])


def test_overload_is_shed_at_once_and_the_server_keeps_serving(env):
    """With 2 requests admitted, a third arriving while both run gets RESOURCE_EXHAUSTED at once (not
    after them); the admitted ones finish, and the server serves the next request."""
    manager = server.ModelManager(server.single_model_config("fm", os.path.join(env["base"], "fm")),
                                  session_config=server.session_config())
    release, started = threading.Event(), threading.Semaphore(0)
    predict = manager.handlers.predict

    def held(req):  # a request holds its admission slot until released
        started.release()
        release.wait(30)
        return predict(req)
    manager.handlers.predict = held  # before the Server binds the handlers
    srv = server.Server(manager, port=0, max_concurrent_requests=2)
    srv.start()
    try:
        with client_lib.ServingClient(srv.target, "fm", timeout_s=30, retries=0) as c:
            pool = [threading.Thread(target=lambda: results.append(c.score_examples(env["examples"][:5])))
                    for _ in range(2)]
            results = []
            for t in pool:
                t.start()
            assert started.acquire(timeout=30) and started.acquire(timeout=30)
            t0 = time.monotonic()
            with pytest.raises(client_lib.ScoringError) as err:
                c.score_examples(env["examples"][:5])
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 1.0
            # A client that retries with backoff gets through once a slot frees.
            with client_lib.ServingClient(srv.target, "fm", timeout_s=30, retries=8, backoff_s=0.05) as patient:
                later = []
                waiter = threading.Thread(target=lambda: later.append(patient.score_examples(env["examples"][:5])))
                waiter.start()
                time.sleep(0.2)
                assert not later  # still shed and backing off while both slots are held
                release.set()
                waiter.join(30)
            assert len(later) == 1 and _close(later[0].outputs["click"], env["expected"][2][:5])
            for t in pool:
                t.join(30)
            assert len(results) == 2 and all(_close(r.outputs["click"], env["expected"][2][:5]) for r in results)
            assert _close(c.score_examples(env["examples"][:5]).outputs["click"], env["expected"][2][:5])
    finally:
        release.set()
        srv.stop()


def test_split_call_over_the_admission_limit_gets_through_a_few_sub_requests_at_a_time(env):
    """4 concurrent sub-requests against an admission limit of 1: each round some are answered and the
    rest shed; rounds that answered some cost no retry, so with retries=1 the call still succeeds
    (counting every round as a retry, it would fail in its third) and equals the unsplit answer."""
    manager = server.ModelManager(server.single_model_config("fm", os.path.join(env["base"], "fm")),
                                  session_config=server.session_config())
    predict, admitted = manager.handlers.predict, []

    def slow(req):  # holds the only slot long enough for the siblings to arrive and be shed
        admitted.append(1)
        time.sleep(0.05)
        return predict(req)
    manager.handlers.predict = slow
    srv = server.Server(manager, port=0, max_concurrent_requests=1)
    srv.start()
    try:
        with client_lib.ServingClient(srv.target, "fm", timeout_s=30, retries=1, backoff_s=0.01) as c:
            got = c.score_examples(env["examples"][:40], splits=4).outputs["click"]
        assert len(admitted) == 4 and _close(got, env["expected"][2][:40])
    finally:
        srv.stop()


def test_client_score_cli_on_raw_lines(env, capsys):
    """libffm lines become raw Examples (the graph joins the item table, bins the price, fills missing
    fields), as one flat request or one rank request; pre-hashed id lines go to predict_ids."""
    lines = env["lines"][:30]
    path = os.path.join(env["base"], "lines.libffm")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    common = ["score", "--server", env["server"].target, "--model", "fm", "--schema", env["export"]["versions"][2]]
    client_lib.main(common + ["--splits", "3", path])
    got = [float(line.split("=")[1]) for line in capsys.readouterr().out.splitlines()]
    assert len(got) == 30 and np.max(np.abs(np.array(got) - env["expected"][2][:30])) <= 2e-6  # 6 decimals
    # One rank request: the first line's user/query/hour/device are every candidate's context.
    client_lib.main(common + ["--context_fields", "user,query,hour,device", path])
    ranked = [float(line.split("=")[1]) for line in capsys.readouterr().out.splitlines()]
    builder = ExampleBuilder(env["schema"])
    feats = [builder.parse(line)[1] for line in lines]
    ctx = [f for f in feats[0] if f[0] in ("user", "query", "hour", "device")]
    flat = [builder.example([f for f in fs if f[0] not in ("user", "query", "hour", "device")] + ctx) for fs in feats]
    want = env["client"].score_examples(flat).outputs["click"]
    assert np.max(np.abs(np.array(ranked) - want)) <= 2e-6
    ids_path = os.path.join(env["base"], "lines.ids")
    with open(ids_path, "w") as f:
        for row in protocol.example_rows(env["records"][:30], env["schema"]):
            f.write(" ".join(f"{fid}:{h}:{v!r}" for h, v, fid in row) + "\n")
    client_lib.main(["score", "--server", env["server"].target, "--model", "fm", "--format", "ids", ids_path])
    got = [float(line.split("=")[1]) for line in capsys.readouterr().out.splitlines()]
    assert np.max(np.abs(np.array(got) - env["expected_records"][2][:30])) <= 2e-6


def _can_leave_sched_idle() -> bool:
    out = []

    def probe():
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            out.append(True)
        except PermissionError:
            out.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return out[0]


def test_starved_idle_load_moves_to_nice_10_and_back(caplog):
    """The poller's loads run under SCHED_IDLE; the watchdog (started here, at this thread's
    priority, not the poller's) moves one that outlasts the grace period to SCHED_OTHER at nice +10
    (where the process may raise a thread's priority; else it stays idle and the log says so), and
    the thread is back on SCHED_IDLE once the load ends. A load shorter than the grace is left alone."""
    watchdog = manager_lib._LoadWatchdog(grace_s=0.1)
    seen = {}

    def poller():
        manager_lib._idle_cpu_only()
        seen["before"] = os.sched_getscheduler(0)
        with watchdog.watch("model m version 6"):
            time.sleep(0.02)  # a short load
        with watchdog.watch("model m version 7"):
            time.sleep(0.6)  # a starved one
            seen["during"] = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        seen["after"] = os.sched_getscheduler(0)

    base_nice = os.getpriority(os.PRIO_PROCESS, os.getpid())
    try:
        assert os.sched_getscheduler(watchdog._thread.native_id) == os.SCHED_OTHER
        t = threading.Thread(target=poller)
        t.start()
        t.join()
    finally:
        watchdog.close()
    assert seen["before"] == seen["after"] == os.SCHED_IDLE and "version 6" not in caplog.text
    if _can_leave_sched_idle():
        assert watchdog.promoted == 1 and seen["during"] == (os.SCHED_OTHER, min(19, base_nice + 10))
        assert "model m version 7: still loading after 0 s on idle CPU" in caplog.text
    else:
        assert watchdog.promoted == 0 and seen["during"][0] == os.SCHED_IDLE
        assert "not permitted to raise its priority" in caplog.text


def test_version_swap_and_rollback_under_concurrent_load_fail_no_request(env, tmp_path):
    """Sync publishes version 2 while 3 threads score 100 ads each (2 sub-requests); the poller loads,
    warms up, switches, unloads version 1; then a rollback swaps back. Zero requests fail, and every
    answer is exactly its version's prediction."""
    ex, exp = env["examples"][:100], {v: e[:100] for v, e in env["expected"].items()}
    dest = str(tmp_path / "ctr")
    sync.push(env["export"]["versions"][1], dest)
    manager = server.ModelManager(server.single_model_config("ctr", dest), session_config=server.session_config())
    srv = server.Server(manager, port=0, max_concurrent_requests=0)  # 3 clients x 2 sub-requests at once
    srv.start()
    manager.start(poll_wait_s=0.05)
    assert os.sched_getscheduler(manager._thread.native_id) == os.SCHED_IDLE  # loads use idle CPU only
    results, errors, stop = [], [], threading.Event()

    def loop(k):
        with client_lib.ServingClient(srv.target, "ctr", timeout_s=30) as cl:
            while not stop.is_set():
                try:
                    pred = cl.score_examples(ex, splits=2)
                    results.append((k, time.monotonic(), pred.version, pred.outputs["click"]))
                except Exception as e:  # noqa: BLE001 (counted, must stay zero)
                    errors.append(repr(e))

    def wait_for(cond, what):
        deadline = time.monotonic() + 90
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(3)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(results) >= 10, "first requests")
        assert sync.push(env["export"]["versions"][2], dest).version == 2
        status = client_lib.ServingClient(srv.target, "ctr")
        wait_for(lambda: status.status() == [(1, "END", ""), (2, "AVAILABLE", "")], "swap to version 2")
        swapped = len(results)
        wait_for(lambda: len(results) >= swapped + 10, "requests after the swap")
        assert sync.rollback(dest) == 1
        wait_for(lambda: [s[:2] for s in status.status()] == [(1, "AVAILABLE"), (2, "END")], "rollback")
        rolled = len(results)
        wait_for(lambda: len(results) >= rolled + 10, "requests after the rollback")
        status.close()
    finally:
        stop.set()
        for t in threads:
            t.join()
        srv.stop()
    assert errors == []
    for _, _, version, probs in results:
        assert _close(probs, exp[version])
    versions = [v for _, _, v, _ in sorted(results, key=lambda r: r[1])]
    assert versions[0] == 1 and versions[-1] == 1 and 2 in versions
    for k in range(3):  # per thread: 1...1 2...2 1...1 (never back to an unloaded version)
        seq = [v for kk, _, v, _ in results if kk == k]
        changes = [b for a, b in zip(seq, seq[1:]) if a != b]
        assert changes in ([2, 1], [1], [2], []), seq
    assert 2 in manager.models["ctr"].statuses and manager.models["ctr"].statuses[2][0] == 50  # END


def test_a_broken_version_never_replaces_the_serving_one(env, tmp_path):
    dest = str(tmp_path / "m")
    shutil.copytree(env["export"]["versions"][1], os.path.join(dest, "1"))
    manager = server.ModelManager(server.single_model_config("m", dest), max_load_retries=1)
    try:
        assert sorted(manager.models["m"].versions) == [1]
        os.makedirs(os.path.join(dest, "2"))
        with open(os.path.join(dest, "2", "saved_model.pb"), "wb") as f:
            f.write(b"not a SavedModel")
        for _ in range(4):  # the first load and one retry fail; later polls leave version 2 alone
            manager.poll()
        assert manager.models["m"].failures[2] == 2
        assert sorted(manager.models["m"].versions) == [1]
        state, code, message = manager.models["m"].statuses[2]
        assert state == 50 and code != 0 and "load failed" in message
        spec = predict_pb2.PredictRequest().model_spec
        spec.name = "m"
        lv = manager.acquire(spec)
        assert lv.version == 1 and lv.warmup_requests == 12
        lv.release()
    finally:
        manager.stop()


def _serve(args):
    return subprocess.Popen([sys.executable, "-m", "serving.server", "--port", "0", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("how", ["export_base", "model_config_file"])
def test_make_serve_command_starts_the_server_on_loopback(env, how):
    """The Makefile's command lines, in a child process: every model under EXPORT_BASE (what `make train`
    exported), or a TF Serving config file; loads, serves, stops cleanly on SIGTERM."""
    args = (["--export_base", env["base"]] if how == "export_base" else
            ["--model_config_file", os.path.join(CONFIGS, "models.config"), "--base_path", env["base"]])
    proc = _serve(args)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving: listening on 127.0.0.1:"), line
        target = line.split()[3].rstrip(";")
        with client_lib.ServingClient(target, "fm", timeout_s=30) as c:
            # The config file asks for versions 1 and 2 (labels); a plain export base serves the latest.
            want = [(1, "AVAILABLE", ""), (2, "AVAILABLE", "")] if how != "export_base" else [(2, "AVAILABLE", "")]
            assert c.status() == want
            assert _close(c.score_examples(env["examples"][:20]).outputs["click"], env["expected"][2][:20])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_make_serve_with_nothing_to_serve_says_so(env, tmp_path):
    for args, want in ((["--export_base", str(tmp_path / "empty")], "no exported model under"),
                       (["--export_base", env["base"], "--model_name", "deepfm"],
                        "no exported model 'deepfm' under .* \\(models there: \\['fm'\\]\\)")):
        proc = _serve(args)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and not out
        assert re.search("serving: " + want, err), err


def test_committed_serving_configs_parse_as_tf_serving_protos():
    config = server.read_config(os.path.join(CONFIGS, "models.config"))
    (mc,) = config.model_config_list.config
    assert mc.name == "fm" and mc.base_path == "/models/fm" and mc.model_platform == "tensorflow"
    assert dict(mc.version_labels) == {"stable": 1, "canary": 2}
    assert set(mc.version_labels.values()) <= set(mc.model_version_policy.specific.versions)
    # BatchingParameters and MonitoringConfig are not in the tensorflow-serving-api wheel: build their
    # descriptors from TF Serving's .proto definitions and parse the files strictly.
    batching = _message("BatchingParameters", [
        ("max_batch_size", 1, "Int64Value"), ("batch_timeout_micros", 2, "Int64Value"),
        ("max_enqueued_batches", 3, "Int64Value"), ("num_batch_threads", 4, "Int64Value"),
        ("thread_pool_name", 5, "StringValue"), ("allowed_batch_sizes", 6, "repeated int64"),
        ("pad_variable_length_inputs", 7, "bool")])
    with open(os.path.join(CONFIGS, "batching_parameters.txt")) as f:
        b = text_format.Parse(f.read(), batching())
    assert list(b.allowed_batch_sizes) == sorted(b.allowed_batch_sizes)
    assert b.allowed_batch_sizes[-1] == b.max_batch_size.value  # TF Serving rejects anything else
    assert not b.pad_variable_length_inputs
    prometheus = _message("PrometheusConfig", [("enable", 1, "bool"), ("path", 2, "string")])
    monitoring = _message("MonitoringConfig", [("prometheus_config", 1, ".t.PrometheusConfig")],
                          pool=prometheus.DESCRIPTOR.file.pool)
    with open(os.path.join(CONFIGS, "monitoring.config")) as f:
        m = text_format.Parse(f.read(), monitoring())
    assert m.prometheus_config.enable and m.prometheus_config.path.startswith("/")


def _message(name, fields, pool=None):
    F = descriptor_pb2.FieldDescriptorProto
    if pool is None:
        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    fdp = descriptor_pb2.FileDescriptorProto(name=f"{name}.proto", package="t", syntax="proto3",
                                             dependency=["google/protobuf/wrappers.proto"])
    msg = fdp.message_type.add(name=name)
    for fname, number, typ in fields:
        f = msg.field.add(name=fname, number=number, label=F.LABEL_OPTIONAL)
        if typ.startswith("repeated "):
            f.label, typ = F.LABEL_REPEATED, typ.split()[1]
        scalar = {"int64": F.TYPE_INT64, "bool": F.TYPE_BOOL, "string": F.TYPE_STRING}
        if typ in scalar:
            f.type = scalar[typ]
        else:
            f.type = F.TYPE_MESSAGE
            f.type_name = typ if typ.startswith(".") else f".google.protobuf.{typ}"
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"t.{name}"))


def test_serving_imports_no_training_code():
    """serving/ may import TF, gRPC, protos, numpy, feature_schema, itself and the ETL's Beam-free line
    parser (one parser for the ETL and the client): nothing of the training code, nor Beam."""
    allowed = {"grpc", "numpy", "tensorflow", "tensorflow_serving", "google", "feature_schema", "serving",
               "etl.parsing"}
    stdlib = set(sys.stdlib_module_names)
    for name in sorted(os.listdir(os.path.join(ROOT, "serving"))):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ROOT, "serving", name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for mod in mods:
                top = mod.split(".")[0]
                if mod == "etl" and isinstance(node, ast.ImportFrom):
                    mod = top = "etl." + ",".join(a.name for a in node.names)
                assert top in allowed or mod in allowed or top in stdlib or top == "__future__", \
                    f"serving/{name} imports {mod}"
    # The parser imports neither Beam nor TF.
    out = subprocess.run([sys.executable, "-c", "import sys, etl.parsing; print(sorted(m for m in sys.modules "
                          "if m.split('.')[0] in ('apache_beam', 'tensorflow', 'trainer')))"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_proto_tensor_conversions_round_trip():
    for arr in (np.arange(6, dtype=np.int64).reshape(2, 3), np.linspace(0, 1, 5, dtype=np.float32),
                np.array([b"a", b"", b"\x00b"], dtype=object), np.array([True, False]), np.zeros((0, 4), np.int32)):
        back = protocol.to_ndarray(protocol.from_ndarray(arr))
        assert back.dtype == arr.dtype and back.shape == arr.shape and np.array_equal(back, arr)
        ref = tf.make_ndarray(protocol.from_ndarray(arr))
        assert np.array_equal(ref, arr)
    # Typed value fields, with TF's rule that fewer values than elements repeat the last one.
    t = tf.make_tensor_proto([1.5, 2.5, 2.5, 2.5], dtype=tf.float32)
    t.ClearField("tensor_content")
    t.float_val.extend([1.5, 2.5])
    assert np.array_equal(protocol.to_ndarray(t), tf.make_ndarray(t))
    t = tf.make_tensor_proto(7, dtype=tf.int64, shape=[2, 2])
    assert np.array_equal(protocol.to_ndarray(t), np.full((2, 2), 7, np.int64))


def test_tensor_decode_fast_paths_match_tf(env):
    """The request/response decode paths (tensor_content as a zero-copy view, string_val as one object
    array) give exactly TF's own ``make_ndarray`` of protos TF's ``make_tensor_proto`` built."""
    ex = env["examples"][:37]
    for arr in (np.array(ex, dtype=object), np.array(ex[:36], dtype=object).reshape(12, 3)):
        t = tf.make_tensor_proto(arr)
        got = protocol.to_ndarray(t)
        assert got.dtype == object and got.shape == arr.shape and np.array_equal(got, tf.make_ndarray(t))
        assert got.ravel().tolist() == arr.ravel().tolist()  # bytes for bytes, in order
    probs = env["expected"][2][:37].astype(np.float32)  # real model outputs, as a response carries them
    for arr in (probs, probs[:36].reshape(6, 6), np.arange(-5, 7, dtype=np.int64).reshape(3, 4) * (1 << 40)):
        t = tf.make_tensor_proto(arr)
        assert t.tensor_content  # TF packs numbers as raw little-endian bytes
        got = protocol.to_ndarray(t)
        assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, tf.make_ndarray(t))
        assert not got.flags.writeable and not got.flags.owndata  # a view of the proto's bytes, not a copy
        # The server's encode of the same array is the same bytes TF writes.
        assert protocol.from_ndarray(arr).tensor_content == t.tensor_content
    t = tf.make_tensor_proto(probs)
    t.tensor_shape.dim[0].size = 36  # content of 37 floats for a shape of 36
    with pytest.raises(protocol.TensorError, match="148 bytes"):
        protocol.to_ndarray(t)
    t.tensor_shape.dim[0].size = -1
    with pytest.raises(protocol.TensorError, match="negative"):
        protocol.to_ndarray(t)
