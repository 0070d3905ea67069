"""Where a 100-ad request's time goes beyond its floors: the server's own timing next to the client's.

    python -m bench.request_split [--workdir runs/bench/serving] [--model deepfm] [--kind raw]
        [--ads 100] [--rounds 30] [--block 20] [--out runs/bench/request_split.json]

Serves the model ``bench.bench_serving`` built in ``--workdir`` with ``bench.timed_server``, which
times ``Handlers.predict`` (the handler) and ``Signature.run`` (the Session call) in the server
process. This process interleaves, in blocks of ``--block`` calls for ``--rounds`` rounds, the
three measurements of ``bench_serving``'s 100-ad bar: the floor (the same callable in this process,
1 compute thread), the gRPC floor (the same request bytes to a bare grpcio server) and e2e
(``ServingClient`` to the server). The table splits e2e p50 into the server's Session call, the
handler's Python around it, and the rest (client and transport), each next to the floor it
should match: the floor, nothing, and the gRPC floor; then the Session call's thread CPU in the
server against the floor loop's, and the floor called ``PACE_S`` after going idle, as a served
request's Session call is, against the back-to-back floor loop.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bench import timed_server
from bench.bench_serving import interleaved

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


PACE_S = 0.0007  # the idle time before each call of the paced floor: about what a served request waits for


def split(times: dict, records: list, extra: dict | None = None) -> dict:
    """p50s (ms) of the client's measurements and of the server's timed calls made during e2e.

    ``extra``: more lists of seconds (the floor's thread CPU, the paced floor) reported as p50s
    only; the server's Session calls also give their thread CPU (``session run cpu``).
    """
    p50 = {k: float(np.percentile(v, 50) * 1e3) for k, v in {**times, **(extra or {})}.items()}
    n = len(times["e2e"])  # the server's last n calls of each are the e2e block's (warm-up calls come first)
    for name in ("handler", "session run"):
        calls = [r for r in records if r["step"] == name][-n:]
        p50[name] = float(np.percentile([r["end"] - r["start"] for r in calls], 50) * 1e3)
    p50["session run cpu"] = float(np.percentile([r["cpu_s"] for r in calls], 50) * 1e3)
    return {**p50, "e2e_over_floors": p50["e2e"] / (p50["floor"] + p50["grpc floor"]),
            "session_run_over_floor_ms": p50["session run"] - p50["floor"],
            "handler_python_ms": p50["handler"] - p50["session run"],
            "rest_over_grpc_floor_ms": p50["e2e"] - p50["handler"] - p50["grpc floor"]}


def with_cpu(fn, cpu: list):
    """``fn`` that also appends its thread CPU seconds to ``cpu``."""
    def call():
        t = time.thread_time()
        fn()
        cpu.append(time.thread_time() - t)
    return call


def paced(fn, seconds: list):
    """``fn`` after ``PACE_S`` of sleep, its own time appended to ``seconds`` (the sleep is not in it)."""
    def call():
        time.sleep(PACE_S)
        t = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t)
    return call


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from bench import bench_serving

    bench_serving.add_request_args(p, "runs/bench/request_split.json", block=20)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from serving import server
    from serving.client import ServingClient

    path, req = bench_serving.request_of(args)
    config = bench_serving.write_model_config(args.workdir, "request_split.config", args.model, path)
    records_path = os.path.abspath(args.out + ".records")
    proc, target = timed_server.start(config, os.path.join(args.workdir, "request_split-server.log"), "request",
                                      records_path)
    echo_proc, echo_target = bench_serving.start_echo()
    try:
        _, echo = bench_serving.echo_call(echo_target)
        lv = server.LoadedVersion(args.model, 1, path, server.session_config(intra_op=1))
        floor = req.floor(lv.signature(req.signature))
        extra = {"floor cpu": [], "floor paced": []}
        with ServingClient(target, args.model, timeout_s=30) as client:
            times = interleaved({"floor": with_cpu(floor, extra["floor cpu"]),
                                 "grpc floor": lambda: echo(req.bytes, timeout=30),
                                 "e2e": lambda: req.call(client),
                                 "floor paced": paced(floor, extra["floor paced"])}, args.rounds, args.block)
        del times["floor paced"]  # its own list (without the sleep) is in ``extra``
        lv.retire()
    finally:
        bench_serving.stop_children([proc], echo_proc)
    with open(records_path) as f:
        records = json.load(f)
    os.remove(records_path)
    result = {"command": "python -m bench.request_split " + " ".join(sys.argv[1:] if argv is None else argv),
              "request_bytes": len(req.bytes), "loadavg_end": os.getloadavg(), **split(times, records, extra)}
    r = result
    print(f"{args.model} {args.kind}, {args.ads} ads ({len(req.bytes)} bytes), p50 ms:\n")
    print("| part | measured | its floor | over it |")
    print("|---|---:|---:|---:|")
    print(f"| Session call in the server | {r['session run']:.3f} | {r['floor']:.3f} (floor) | "
          f"{r['session_run_over_floor_ms']:+.3f} |")
    print(f"| handler Python around it | {r['handler_python_ms']:.3f} | 0 | {r['handler_python_ms']:+.3f} |")
    print(f"| the rest of e2e (client, transport) | {r['e2e'] - r['handler']:.3f} | {r['grpc floor']:.3f} "
          f"(gRPC floor) | {r['rest_over_grpc_floor_ms']:+.3f} |")
    print(f"| e2e | {r['e2e']:.3f} | {r['floor'] + r['grpc floor']:.3f} | ratio {r['e2e_over_floors']:.3f} |")
    print(f"\nthread CPU of the Session call: {r['session run cpu']:.3f} ms in the server, {r['floor cpu']:.3f} ms in "
          f"the floor loop; the floor called {PACE_S * 1e3:.1f} ms after going idle (as a served request is): "
          f"{r['floor paced']:.3f} ms\n")
    bench_serving.write_json(args.out, result, "request_split")


if __name__ == "__main__":
    main()
