"""Request-thread dispatch, side by side: the last idle thread (``--grpc_hot_threads 1``) vs
``ThreadPoolExecutor``'s longest idle one (``0``).

    python -m bench.bench_thread_dispatch [--workdir runs/bench/serving] [--model deepfm] [--kind raw]
        [--ads 100] [--rounds 30] [--block 10] [--out runs/bench/thread_dispatch.json]

Serves the models ``bench.bench_serving`` built in ``--workdir`` (``--reuse_models`` layout) with two
``python -m serving.server`` children, one per setting. Each first takes a 1 s burst of 4 closed-loop
clients (so its pool holds several threads, as after any burst), then one client per server sends the
same request back to back, in blocks interleaved with the 1-thread in-process floor and the gRPC
floor (``bench_serving``'s definitions; the order of the two servers alternates per round). Prints
e2e p50 and e2e / (floor + gRPC floor) of both; JSON at ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_OVERRIDE_GLOBAL_THREADPOOL", "1")  # as bench_serving: the floor's own pool

SETTINGS = (("hot", "1"), ("longest_idle", "0"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from bench import bench_serving as bs

    bs.add_request_args(p, "runs/bench/thread_dispatch.json", block=10)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from serving import server
    from serving.client import ServingClient

    path, req = bs.request_of(args)
    config = os.path.join(args.workdir, "models.config")
    load_start = os.getloadavg()
    procs, fns = [], {}
    echo_proc, echo_target = bs.start_echo()
    try:
        for name, flag in SETTINGS:
            proc, target = bs.start_server(config, os.path.join(args.workdir, f"server-{name}.log"),
                                           "--grpc_hot_threads", flag)
            procs.append(proc)
            bs.qps(target, args.model, req, 4, 1.0)
            client = ServingClient(target, args.model, timeout_s=30)
            fns[f"e2e_{name}"] = lambda c=client: req.call(c)
        lv = server.LoadedVersion(args.model, 1, path, server.session_config(intra_op=1))
        _, echo = bs.echo_call(echo_target)
        base = {"floor": req.floor(lv.signature(req.signature)), "grpc": lambda: echo(req.bytes, timeout=30)}
        e2e = list(fns.items())
        times = {k: [] for k in [*base, *fns]}
        for fn in [*base.values(), *fns.values()]:
            bs.timed(fn, args.block)
        for r in range(args.rounds):
            for k, fn in [*base.items(), *(e2e if r % 2 else e2e[::-1])]:
                times[k] += bs.timed(fn, args.block)
    finally:
        bs.stop_children(procs, echo_proc)
    floors = bs.pct(times["floor"], 50) + bs.pct(times["grpc"], 50)
    out = {"command": "python -m bench.bench_thread_dispatch " + " ".join(sys.argv[1:] if argv is None else argv),
           "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "request_bytes": len(req.bytes),
           "floor_p50_ms": bs.pct(times["floor"], 50), "grpc_floor_p50_ms": bs.pct(times["grpc"], 50),
           "settings": {k: {"e2e_p50_ms": bs.pct(times[k], 50), "e2e_p99_ms": bs.pct(times[k], 99),
                            "e2e_over_floors": bs.pct(times[k], 50) / floors} for k in fns}}
    print(f"{args.model} {args.kind} {args.ads} ads, load average {load_start[0]:.2f} -> {out['loadavg_end'][0]:.2f}: "
          f"floor p50 {out['floor_p50_ms']:.3f} ms, gRPC floor p50 {out['grpc_floor_p50_ms']:.3f} ms")
    for k, v in out["settings"].items():
        print(f"  {k}: e2e p50 {v['e2e_p50_ms']:.3f} ms, p99 {v['e2e_p99_ms']:.3f} ms, "
              f"{v['e2e_over_floors']:.2f} x floors")
    bs.write_json(args.out, out, "bench_thread_dispatch")


if __name__ == "__main__":
    main()
