"""Where the slow requests of a version swap fall: the server's load steps next to the client's latencies.

    python -m bench.swap_phases [--workdir runs/bench/serving] [--model mlp] [--swaps 30]
        [--out runs/bench/swap_phases.json]

Serves the model ``bench.bench_serving`` built in ``--workdir`` with ``bench.timed_server``: the
server in a child process, its loader steps timestamped (graph import, variable restore, init ops,
warm-up, unload, each with its thread CPU). This process sends the 100-ad request back to back and
publishes ``--swaps`` new versions one after another (a copy renamed into place, as
``bench_serving``'s swap probe does, then a wait until the old version is unloaded and a pause as
long again).

Per step: wall time and thread CPU (medians over the swaps), the requests that overlapped it, their
p50 and p90, and how many of them were slower than the p99 of the requests outside every swap.
Table on stdout, JSON at ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time

import numpy as np

from bench import timed_server

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

def run_swaps(target: str, model: str, model_dir: str, examples: list, swaps: int) -> tuple[list, list]:
    """(requests as (start, seconds), swap windows as (rename, old version unloaded)) of ``swaps`` swaps."""
    from serving.client import ServingClient

    requests, windows, stop = [], [], threading.Event()

    def loop():
        with ServingClient(target, model, timeout_s=30) as c:
            while not stop.is_set():
                t = time.perf_counter()
                c.score_examples(examples)
                requests.append((t, time.perf_counter() - t))

    sender = threading.Thread(target=loop)
    sender.start()
    first = max(int(d) for d in os.listdir(model_dir) if d.isdigit())
    try:
        time.sleep(2.0)
        with ServingClient(target, model, timeout_s=30) as watcher:
            for _ in range(swaps):
                old = max(int(d) for d in os.listdir(model_dir) if d.isdigit())
                tmp = os.path.join(model_dir, f".phases-{old + 1}")
                shutil.copytree(os.path.join(model_dir, str(old)), tmp)
                start = time.perf_counter()
                os.rename(tmp, os.path.join(model_dir, str(old + 1)))
                while {v: s for v, s, _ in watcher.status()}.get(old) != "END":
                    time.sleep(0.02)
                windows.append((start, time.perf_counter()))
                if old != first:
                    shutil.rmtree(os.path.join(model_dir, str(old)), ignore_errors=True)
                time.sleep(max(0.5, windows[-1][1] - start))
    finally:
        stop.set()
        sender.join()
    return requests, windows


def step_table(records: list, requests: list, windows: list) -> dict:
    """Per step: medians of wall and CPU time, the requests overlapping it and how many were slow."""
    starts = np.array([r[0] for r in requests])
    secs = np.array([r[1] for r in requests])
    ends = starts + secs
    in_swap = np.zeros(len(starts), bool)
    for a, b in windows:
        in_swap |= (ends >= a) & (starts <= b)
    slow_ms = float(np.percentile(secs[~in_swap], 99) * 1e3)
    slow = secs * 1e3 > slow_ms
    table = {}
    for _, name in timed_server.STEPS["swap"]:
        steps = [r for r in records if r["step"] == name and any(a <= r["start"] <= b for a, b in windows)]
        hit = np.zeros(len(starts), bool)
        for r in steps:
            hit |= (ends >= r["start"]) & (starts <= r["end"])
        ms = secs[hit] * 1e3
        table[name] = {"swaps": len(steps), "wall_ms": float(np.median([(r["end"] - r["start"]) * 1e3 for r in steps])),
                       "cpu_ms": float(np.median([r["cpu_s"] * 1e3 for r in steps])),
                       "requests": int(hit.sum()), "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
                       "p90_ms": float(np.percentile(ms, 90)) if len(ms) else None, "slow": int((hit & slow).sum())}
    return {"steady_p99_ms": slow_ms, "requests_outside": int((~in_swap).sum()), "requests_during": int(in_swap.sum()),
            "slow_during": int((in_swap & slow).sum()), "steps": table}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/bench/serving")
    p.add_argument("--model", default="mlp")
    p.add_argument("--swaps", type=int, default=30)
    p.add_argument("--out", default="runs/bench/swap_phases.json")
    args = p.parse_args(argv)
    from bench import bench_serving

    path, kinds, _ = bench_serving.read_models(args.workdir)[args.model]
    examples = kinds["raw" if "raw" in kinds else next(iter(kinds))][:100]
    config = bench_serving.write_model_config(args.workdir, "swap_phases.config", args.model, path)
    steps_path = os.path.abspath(args.out + ".steps")
    proc, target = timed_server.start(config, os.path.join(args.workdir, "swap_phases-server.log"), "swap",
                                      steps_path)
    model_dir = os.path.dirname(path)
    try:
        requests, windows = run_swaps(target, args.model, model_dir, examples, args.swaps)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        served = [int(d) for d in os.listdir(model_dir) if d.isdigit()]
        for v in served:  # back to the version the run started from
            if v != int(os.path.basename(path)):
                shutil.rmtree(os.path.join(model_dir, str(v)), ignore_errors=True)
    with open(steps_path) as f:
        records = json.load(f)
    os.remove(steps_path)
    result = {"command": "python -m bench.swap_phases " + " ".join(argv), "model": args.model, "swaps": len(windows),
              "loadavg_end": os.getloadavg(), **step_table(records, requests, windows)}
    print(f"{args.model}: {len(windows)} swaps; p99 outside swaps {result['steady_p99_ms']:.2f} ms "
          f"({result['requests_outside']} requests); during swaps {result['requests_during']} requests, "
          f"{result['slow_during']} slower than that\n")
    print("| step | wall ms (median) | thread CPU ms (median) | requests overlapping | p50 ms | p90 ms "
          "| slower than p99 outside |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in result["steps"].items():
        p50 = "-" if s["p50_ms"] is None else f"{s['p50_ms']:.2f}"
        p90 = "-" if s["p90_ms"] is None else f"{s['p90_ms']:.2f}"
        print(f"| {name} | {s['wall_ms']:.1f} | {s['cpu_ms']:.1f} | {s['requests']} | {p50} | {p90} | {s['slow']} |")
    print()
    bench_serving.write_json(args.out, result, "swap_phases")


if __name__ == "__main__":
    main()
