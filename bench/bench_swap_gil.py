"""Where a version swap holds the GIL: one process, the server's own load, warm-up and retire steps.

    python -m bench.bench_swap_gil [--workdir runs/bench/serving] [--model deepfm] [--reps 3]
        [--contention_seconds 5] [--out runs/bench/swap_gil.json]

Serves the SavedModel that ``bench.bench_serving`` built in ``--workdir`` (run it once first, or
with ``--only swap``). Each rep is a swap as the server's poller runs it: ``LoadedVersion`` (load),
``ModelManager.warmup`` (the version's warm-up records), then ``retire`` of the previous version,
under ``sys.setprofile``. Every C call is timed in thread CPU; calls known to release the GIL
(Session runs, ExtendSession, session close and delete) are summed apart, and the rest of the
thread's CPU is time during which the loading thread held the GIL (Python and GIL-holding C).
The figure that matters for a request thread is the longest single GIL-holding C call: a request
that needs the GIL then waits for all of it (the GIL switch interval cannot interrupt a C call).

Two loaders: ``tf1`` (``tf.compat.v1.saved_model.loader.load`` as is: the whole GraphDef in one
import call) and ``server`` (``serving.manager.load_saved_model``). Then the CPU of a full cyclic
garbage collection with two versions loaded, before and after ``gc.freeze()`` of the objects alive
at start (``serving.server.freeze_startup_objects``). CPU times, so a loaded machine changes them
little (they still vary with cache contention).

Last, contention without gRPC: a thread calls the server's Predict handler on the version in a loop
(the first 100 raw requests of the bench, as the swap probe sends), alone and next to a thread at
nice +10 (as the poller) that loads and warms up versions back to back, ``--contention_seconds``
each, twice, alternating: p50 and p99 of the handler call.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402

import numpy as np  # noqa: E402
from tensorflow_serving.apis import predict_pb2  # noqa: E402

from serving import manager, protocol, server  # noqa: E402
from serving.handlers import Handlers  # noqa: E402
from serving.protocol import SERVE_TAG  # noqa: E402

# C functions that release the GIL while they run (TF's pybind wrappers; time.sleep, lock waits).
GIL_FREE = frozenset({"TF_SessionRun_wrapper", "TF_SessionRunCallable", "ExtendSession", "TF_CloseSession",
                      "TF_DeleteSession", "sleep", "acquire", "wait"})


class CCallTimer:
    """A ``sys.setprofile`` hook: thread CPU in GIL-free C calls, and the longest other C call."""

    def __init__(self):
        self._stack = []
        self.gil_free_s = 0.0
        self.longest = (0.0, "")

    def __call__(self, frame, event, arg):
        if event == "c_call":
            self._stack.append((arg, time.thread_time()))
        elif event in ("c_return", "c_exception") and self._stack:
            fn, t0 = self._stack.pop()
            d = time.thread_time() - t0
            name = getattr(fn, "__name__", str(fn))
            if name in GIL_FREE:
                self.gil_free_s += d
            elif d > self.longest[0]:
                self.longest = (d, name)


def tf1_load(session, path: str):
    """The plain TF1 loader (the server's loader before this bench's finding)."""
    with session.graph.as_default():
        return tf.compat.v1.saved_model.loader.load(session, [SERVE_TAG], path)


def swaps(path: str, model: str, reps: int) -> list[dict]:
    """``reps`` swaps (load + warm-up of a new version, retire of the previous one), each timed."""
    host = type("Host", (), {"handlers": Handlers(None)})()  # warmup() only needs .handlers
    old = manager.LoadedVersion(model, 1, path, server.session_config())
    rows = []
    for rep in range(reps):
        timer = CCallTimer()
        t0 = time.thread_time()
        sys.setprofile(timer)
        try:
            lv = manager.LoadedVersion(model, rep + 2, path, server.session_config())
            n = manager.ModelManager.warmup(host, lv)
            old.retire()
        finally:
            sys.setprofile(None)
        cpu = time.thread_time() - t0
        old = lv
        rows.append({"cpu_ms": cpu * 1e3, "gil_free_c_ms": timer.gil_free_s * 1e3,
                     "gil_held_ms": (cpu - timer.gil_free_s) * 1e3, "longest_gil_c_call_ms": timer.longest[0] * 1e3,
                     "longest_gil_c_call": timer.longest[1], "warmup_records": n})
    old.retire()
    return rows


def full_gc_ms(path: str, model: str) -> dict:
    """CPU of a full collection with two versions loaded, with the objects alive before the loads frozen
    (as ``serving.server.freeze_startup_objects`` does at start) and without."""
    def collect():
        t0 = time.thread_time()
        gc.collect()
        return (time.thread_time() - t0) * 1e3

    server.freeze_startup_objects()
    lvs = [manager.LoadedVersion(model, v, path, server.session_config()) for v in (1, 2)]
    out = {"objects_frozen": gc.get_freeze_count(), "frozen_ms": min(collect() for _ in range(3))}
    gc.unfreeze()
    out["objects_tracked"] = len(gc.get_objects())
    out["unfrozen_ms"] = min(collect() for _ in range(3))
    for lv in lvs:
        lv.retire()
    return out


def contention(path: str, model: str, examples: list, seconds: float) -> dict:
    """p50/p99 ms of the in-process Predict handler alone and next to back-to-back warm-ups at nice +10."""
    import threading

    host = type("Host", (), {"handlers": Handlers(None)})()
    lv = manager.LoadedVersion(model, 1, path, server.session_config())
    manager.ModelManager.warmup(host, lv)
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    protocol.strings_proto(examples, req.inputs["examples"])
    state = {"mode": "alone", "stop": False}

    def loader():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while not state["stop"]:
            if state["mode"] == "alone":
                time.sleep(0.01)
                continue
            x = manager.LoadedVersion(model, 2, path, server.session_config())
            manager.ModelManager.warmup(host, x)
            x.retire()

    t = threading.Thread(target=loader, daemon=True)
    t.start()
    times = {"alone": [], "next to warm-ups": []}
    for _ in range(2):
        for mode in times:
            state["mode"] = mode
            time.sleep(0.3)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                host.handlers.predict_on(lv, req)
                times[mode].append((time.perf_counter() - t0) * 1e3)
    state["stop"] = True
    t.join()
    lv.retire()
    return {m: {"calls": len(v), "p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99))}
            for m, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/bench/serving", help="where bench.bench_serving built the models")
    p.add_argument("--model", default="deepfm")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--contention_seconds", type=float, default=5.0, help="each phase of the contention probe (0: skip)")
    p.add_argument("--out", default="runs/bench/swap_gil.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with open(os.path.join(args.workdir, "models.json")) as f:
        entry = json.load(f)[args.model]
    path = entry["path"]
    results = {"model": args.model, "path": path, "loadavg_start": os.getloadavg(), "loaders": {}}
    original = manager.load_saved_model
    for name, loader in (("tf1", tf1_load), ("server", original)):
        manager.load_saved_model = loader
        try:
            results["loaders"][name] = swaps(path, args.model, args.reps)
        finally:
            manager.load_saved_model = original
    results["full_gc_cpu_ms"] = full_gc_ms(path, args.model)
    if args.contention_seconds > 0:
        kind = "raw" if "raw" in entry["kinds"] else next(iter(entry["kinds"]))
        examples = list(tf.compat.v1.io.tf_record_iterator(entry["kinds"][kind]))[:100]
        results["contention"] = contention(path, args.model, examples, args.contention_seconds)
    results["loadavg_end"] = os.getloadavg()
    print(f"\n{args.model}: one swap in one thread (load + warm-up of the new version, retire of the old), "
          f"thread CPU ms; load average {results['loadavg_start'][0]:.1f} -> {results['loadavg_end'][0]:.1f}\n")
    print("| loader | swap | CPU | in GIL-free C calls | GIL held | longest GIL-holding C call |")
    print("|---|---:|---:|---:|---:|---|")
    for name, rows in results["loaders"].items():
        for i, r in enumerate(rows):
            print(f"| {name} | {i + 1} | {r['cpu_ms']:.0f} | {r['gil_free_c_ms']:.0f} | {r['gil_held_ms']:.0f} | "
                  f"{r['longest_gil_c_call_ms']:.1f} ({r['longest_gil_c_call']}) |")
    g = results["full_gc_cpu_ms"]
    print(f"\nfull gc.collect() with two versions loaded: {g['unfrozen_ms']:.1f} ms CPU ({g['objects_tracked']} "
          f"objects tracked); with the {g['objects_frozen']} objects alive before the loads frozen: "
          f"{g['frozen_ms']:.1f} ms")
    for mode, c in results.get("contention", {}).items():
        print(f"in-process Predict handler, 100 ads, {mode}: p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms "
              f"({c['calls']} calls)")
    from bench.bench_serving import write_json

    write_json(args.out, results, "bench_swap_gil")


if __name__ == "__main__":
    main()
