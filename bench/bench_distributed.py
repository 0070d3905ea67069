"""Training throughput: one process vs a local ParameterServerStrategy cluster with 1 and 2 workers.

    python -m bench.run_all --only distributed [--data data/etl] [--model fm] [--epochs 1]

Runs the same model and config three ways on the same ETL output and reports
training examples/s and eval AUC. Single-process examples/s come from the
run's progress log (first to last step, one validation pass included);
cluster examples/s from the chief's ``timing.json`` (fit time, no validation).
Writes runs/bench/distributed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

NOTE = ("What a machine with few cores can show: that the cluster trains the same model to the same "
        "quality through TensorFlow's own PS runtime, and the per-step cost of that runtime (every step "
        "is a remote closure; every embedding lookup and update an RPC to the parameter servers). What it "
        "cannot show: scaling. The chief, the workers and the parameter servers share the same cores, so "
        "a second worker adds contention, not compute; speed-up needs workers on their own machines.")
ENV = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _run(cmd: list[str]) -> float:
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.time() - start


def _single_rate(run_dir: str, batch_size: int) -> float:
    records = [json.loads(line) for line in open(os.path.join(run_dir, "progress.jsonl"))]
    start = next(r for r in records if r["event"] == "start")
    end = [r for r in records if r["event"] == "end"][-1]
    return (end["step"] - start["step"]) * batch_size / (end["time"] - start["time"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/etl", help="ETL output (make etl)")
    p.add_argument("--model", default="fm")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--out", default="runs/bench")
    args, _ = p.parse_known_args(argv)
    if not os.path.exists(os.path.join(args.data, "schema.json")):
        raise SystemExit(f"bench distributed: no ETL output at {args.data}; run `make etl` first")
    base = os.path.join(args.out, "distributed_runs")
    common = ["--data", args.data, "--model", args.model, "--set", f"train.epochs={args.epochs}",
              "--set", f"data.batch_size={args.batch_size}", "--set", "train.verbose=2"]
    rows = []
    load_start = os.getloadavg()
    run = os.path.join(base, "single")
    wall = _run([sys.executable, "-m", "trainer.train", *common, "--run_dir", run])
    rows.append({"setup": "1 process", "examples_per_second": _single_rate(run, args.batch_size),
                 "wall_seconds": wall, "auc": json.load(open(os.path.join(run, "metrics.json")))["click"]["auc"]})
    for workers in (1, 2):
        run = os.path.join(base, f"ps_{workers}w")
        wall = _run([sys.executable, "-m", "trainer.distributed", "launch", "--workers", str(workers), "--ps", "2",
                     "--", *common, "--run_dir", run])
        timing = json.load(open(os.path.join(run, "timing.json")))
        rows.append({"setup": f"PS cluster: chief + {workers} worker(s) + 2 ps",
                     "examples_per_second": timing["examples_per_second"], "wall_seconds": wall,
                     "auc": json.load(open(os.path.join(run, "metrics.json")))["click"]["auc"]})
    result = {"model": args.model, "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
              "rows": rows, "note": NOTE}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"model {args.model}, batch {args.batch_size}, {args.epochs} epoch(s), {os.cpu_count()} CPUs")
    print(f"| {'setup':38s} | {'train examples/s':>16s} | {'wall s':>7s} | {'eval AUC':>8s} |")
    print(f"|{'-' * 40}|{'-' * 18}:|{'-' * 8}:|{'-' * 9}:|")
    for r in rows:
        print(f"| {r['setup']:38s} | {r['examples_per_second']:16.0f} | {r['wall_seconds']:7.1f} | {r['auc']:8.4f} |")
    print(f"load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end\n{NOTE}")


if __name__ == "__main__":
    main()
