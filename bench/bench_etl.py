"""ETL throughput and memory: the Beam job on generated logs of two sizes, and on Frappe against a
plain single-process converter.

    python -m bench.bench_etl [--sizes 1000000,4000000] [--modes in_memory,multi_processing]
        [--data ../shared/data] [--gen_dir runs/bench/etl_data] [--json runs/bench/etl.json]

Generated data: ``python -m generator.clicklog --n-users 200000 --n-items 100000 --n-queries 20000``
with ``--n-train`` 80% and ``--n-eval`` 20% of each size (kept in ``--gen_dir`` and reused), ETL'd
by ``python -m etl.pipeline --config configs/etl_generated.yaml`` in a subprocess, on the
DirectRunner in memory and with ``--direct_running_mode=multi_processing --direct_num_workers=2``.
Wall: the job's own figure (graph construction to published schema, as it prints; the process
adds Python and Beam imports, reported as ``process s``). Peak RSS: the sum over the job's
process tree (the multi-processing workers are its children), sampled every 0.2 s from /proc.

Frappe (validation = train split, test = eval split, libfm + field map, as ``make etl`` in the
README): the Beam job in this process against ``plain_conversion``, the same work with the same
pure functions (``etl.parsing``, ``etl.features``, ``etl.tfrecord``) in one loop: parse, field map,
checks, counts, vocabulary, version-2 records, gzip TFRecords. Both are timed without imports:
each first runs once on a 1,000-line slice (Beam imports more modules during its first run), then
``--rounds`` alternating timed runs of each; the ratio is the median of the rounds' ratios. Their
vocabularies and record counts must agree.

Bars (issue 14): peak RSS at the largest size <= 1.3x at the smallest, >= 17k lines/s at the
largest size (in memory), Frappe >= 0.7x the plain converter. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from etl import features as feat
from etl import parsing, pipeline, tfrecord, transforms
from feature_schema import ExampleKeys, read_vocabulary, write_vocabulary_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN_FLAGS = ("--n-users", "200000", "--n-items", "100000", "--n-queries", "20000")
MODES = {"in_memory": [], "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]}
BARS = {"rss_ratio": 1.3, "lines_per_s": 17_000, "frappe_ratio": 0.7}


# ---------------------------------------------------------------- generated data

def generated(gen_dir: str, lines: int) -> str:
    """Directory of a generated log of ``lines`` lines (80% train, 20% eval), made once."""
    d = os.path.join(gen_dir, str(lines))
    n_train, n_eval = lines * 4 // 5, lines - lines * 4 // 5
    truth = os.path.join(d, "truth.json")
    if os.path.exists(truth):
        with open(truth, encoding="utf-8") as f:
            cfg = json.load(f)["config"]
        if (cfg["n_train"], cfg["n_eval"], cfg["n_users"]) == (n_train, n_eval, 200000):
            return d
    subprocess.run([sys.executable, "-m", "generator.clicklog", "--out", d, *GEN_FLAGS, "--n-train", str(n_train),
                    "--n-eval", str(n_eval)], check=True, stdout=subprocess.DEVNULL)
    return d


def _tree_rss_kb(root: int) -> int:
    """Resident memory of ``root`` and all its descendants (kB), from /proc."""
    parent, rss = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/status", encoding="utf-8") as f:
                rss[int(name)] = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, par in parent.items():
            if par == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0) for p in tree)


def run_job(data: str, out: str, beam_args) -> dict:
    """Runs the ETL in a subprocess; returns its wall, the job's own seconds and the tree's peak RSS."""
    cmd = [sys.executable, "-m", "etl.pipeline", "--config", os.path.join(ROOT, "configs", "etl_generated.yaml"),
           "--input", os.path.join(data, "train.libffm"), "--eval_input", os.path.join(data, "eval.libffm"),
           "--out", out, *beam_args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"bench_etl: {' '.join(cmd)} failed:\n{stderr[-3000:]}")
    m = re.search(r"etl: wrote .* in ([0-9.]+)s", stdout)
    lines = sum(json.load(open(os.path.join(out, "schema.json")))["counts"][s]["read"] for s in ("train", "eval"))
    return {"lines": lines, "job_s": float(m.group(1)), "process_s": round(wall, 1), "peak_rss_mb": round(peak[0] / 1024),
            "lines_per_s": round(lines / float(m.group(1)))}


# ---------------------------------------------------------------- Frappe

def plain_conversion(train: str, eval_: str, field_map: str, out: str, min_count: int) -> dict:
    """The job's work on Frappe in one process and one loop: the same pure functions, no Beam."""
    fmap = {}
    with open(field_map, encoding="utf-8") as f:
        next(f)
        for line in f:
            key, field = line.rstrip("\n").split("\t")[:2]
            fmap[key] = field
    names = list(dict.fromkeys(fmap.values()))
    proc = feat.LineProcessor(feat.LineSpec(fmt="libfm", split="path"))
    encoder = feat.RecordEncoder(("label",), ExampleKeys())
    counts, dead, written = collections.Counter(), collections.Counter(), 0
    for split, name, path in ((feat.TRAIN, "train", train), (feat.EVAL, "eval", eval_)):
        writer = transforms.GzipWriter(os.path.join(out, name, "part-00000-of-00001.tfrecord.gz"))
        with open(path, "rb") as f:
            for raw in f:
                try:
                    labels, features = proc.parse(raw.rstrip(b"\n"))
                    features = proc.finish(proc.assign(features, fmap))
                except parsing.ParseError as e:
                    dead[e.reason] += 1
                    continue
                if split == feat.TRAIN:
                    counts.update((f[0], f[1]) for f in features)
                writer.write(tfrecord.frame(encoder.encode(labels, features)))
                written += 1
        writer.close()
    settings = {n: dict(kind="categorical", min_count=min_count, linear_only=False, source="log", multi_hot=False)
                for n in names}
    specs, vocab = feat.assign_vocabulary(counts.items(), names, settings)
    with open(os.path.join(out, "vocabulary.tsv"), "w", encoding="utf-8") as f:
        f.writelines(f"{line}\n" for line in write_vocabulary_lines(vocab))
    return {"written": written, "dead_lettered": sum(dead.values()), "num_features": sum(s.vocab_size for s in specs)}


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _head(src: str, dst: str, n: int) -> str:
    with open(src, "rb") as f, open(dst, "wb") as out:
        out.writelines(itertools.islice(f, n))
    return dst


def frappe_files(data: str) -> tuple[str, str, str]:
    """Frappe's train (validation) and eval (test) splits and field map under ``data``."""
    d = os.path.join(data, "frappe")
    files = tuple(os.path.join(d, f) for f in ("frappe.validation.libfm", "frappe.test.libfm", "frappe.fields.tsv"))
    for path in files:
        if not os.path.exists(path):
            raise SystemExit(f"bench_etl: {path} not found (pass --data)")
    return files


def beam_conversion(train: str, eval_: str, field_map: str, out: str, min_count: int):
    """The ETL job on a libfm train and eval file with a field map, in this process; its schema."""
    with contextlib.redirect_stdout(io.StringIO()):
        return pipeline.run(["--input", train, "--eval_input", eval_, "--format", "libfm", "--field_map", field_map,
                             "--out", out, "--set", f"min_count={min_count}"])


def frappe(data: str, min_count: int, work: str, rounds: int = 3) -> dict:
    """Plain converter and Beam job on Frappe, side by side: both first run once on a 1,000-line
    slice (lazy imports and first-use caches of either are not the conversion), then ``rounds``
    alternating timed runs each; the ratio is the median of the rounds' ratios."""
    train, eval_, fields = frappe_files(data)
    with open(train, "rb") as f1, open(eval_, "rb") as f2:
        lines = sum(1 for _ in f1) + sum(1 for _ in f2)

    def plain(tr, ev, out):
        return plain_conversion(tr, ev, fields, out, min_count)

    def beam(tr, ev, out):
        return beam_conversion(tr, ev, fields, out, min_count)

    slice_ = (_head(train, os.path.join(work, "warm-train.libfm"), 1000),
              _head(eval_, os.path.join(work, "warm-eval.libfm"), 1000))
    plain(*slice_, os.path.join(work, "warm-plain"))
    beam(*slice_, os.path.join(work, "warm-beam"))
    runs = []
    for r in range(rounds):
        plain_out, beam_out = os.path.join(work, f"plain{r}"), os.path.join(work, f"beam{r}")
        counts, plain_wall, plain_cpu = _timed(lambda: plain(train, eval_, plain_out))
        schema, beam_wall, beam_cpu = _timed(lambda: beam(train, eval_, beam_out))
        _check_same(schema, counts, os.path.join(plain_out, "vocabulary.tsv"))
        runs.append({"plain_s": round(plain_wall, 3), "beam_s": round(beam_wall, 3), "plain_cpu_s": round(plain_cpu, 3),
                     "beam_cpu_s": round(beam_cpu, 3), "ratio": round(plain_wall / beam_wall, 3),
                     "cpu_ratio": round(plain_cpu / beam_cpu, 3), "load_avg_1m": os.getloadavg()[0]})
    mid = sorted(runs, key=lambda x: x["ratio"])[len(runs) // 2]
    return {"lines": lines, "examples": counts["written"], "feature_rows": schema.num_features, "rounds": runs,
            **{k: mid[k] for k in ("plain_s", "beam_s", "plain_cpu_s", "beam_cpu_s")},
            "beam_lines_per_s": round(lines / mid["beam_s"]), "plain_lines_per_s": round(lines / mid["plain_s"]),
            "ratio": mid["ratio"], "cpu_ratio": statistics.median(x["cpu_ratio"] for x in runs)}


def _check_same(schema, plain: dict, plain_vocab: str) -> None:
    """Raises unless the Beam job and the plain converter wrote the same examples and vocabulary."""
    written = sum(schema.counts[s]["written"] for s in ("train", "eval"))
    if (written, schema.num_features) != (plain["written"], plain["num_features"]) or \
            read_vocabulary(schema.vocabulary_file()) != read_vocabulary(plain_vocab):
        raise SystemExit(f"bench_etl: outputs differ: beam {written} examples / {schema.num_features} rows, "
                         f"plain {plain['written']} / {plain['num_features']}")


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000000,4000000", help="generated log sizes in lines")
    p.add_argument("--modes", default="in_memory,multi_processing", help=f"comma list of {sorted(MODES)}")
    p.add_argument("--data", default="../shared/data", help="directory holding frappe/ ('' skips Frappe)")
    p.add_argument("--gen_dir", default="runs/bench/etl_data", help="where generated logs are kept")
    p.add_argument("--min_count", type=int, default=2, help="Frappe min_count")
    p.add_argument("--rounds", type=int, default=3, help="Frappe: alternating timed runs of each converter")
    p.add_argument("--json", default="runs/bench/etl.json")
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    result = {"cpu_count": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0], "generated": [], "bars": BARS}
    work = tempfile.mkdtemp(prefix="bench_etl_")
    try:
        for size in sizes:
            data = generated(args.gen_dir, size)
            for mode in modes:
                row = run_job(data, os.path.join(work, f"{size}-{mode}"), MODES[mode])
                row.update(size=size, mode=mode, load_avg_1m=os.getloadavg()[0])
                result["generated"].append(row)
                shutil.rmtree(os.path.join(work, f"{size}-{mode}"), ignore_errors=True)
                print(f"bench_etl: {size} lines {mode}: {row}", flush=True)
        if args.data:
            result["frappe"] = frappe(args.data, args.min_count, work, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    _judge(result, sizes)
    _print(result)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return result


def _judge(result: dict, sizes) -> None:
    rows = {(r["size"], r["mode"]): r for r in result["generated"]}
    checks = {}
    if len(sizes) >= 2:
        lo, hi = min(sizes), max(sizes)
        for mode in {r["mode"] for r in result["generated"]}:
            if (lo, mode) in rows and (hi, mode) in rows:
                ratio = rows[(hi, mode)]["peak_rss_mb"] / rows[(lo, mode)]["peak_rss_mb"]
                checks[f"peak RSS {hi} / {lo} lines, {mode} <= {BARS['rss_ratio']}"] = (round(ratio, 2),
                                                                                       ratio <= BARS["rss_ratio"])
    if sizes and (max(sizes), "in_memory") in rows:
        rate = rows[(max(sizes), "in_memory")]["lines_per_s"]
        checks[f"lines/s at {max(sizes)} lines, in_memory >= {BARS['lines_per_s']}"] = (rate,
                                                                                     rate >= BARS["lines_per_s"])
    if "frappe" in result:
        ratio = result["frappe"]["ratio"]
        checks[f"Frappe beam / plain lines/s >= {BARS['frappe_ratio']}"] = (ratio, ratio >= BARS["frappe_ratio"])
    result["checks"] = {k: {"value": v, "ok": ok} for k, (v, ok) in checks.items()}


def _print(result: dict) -> None:
    print(f"\nETL on generated logs (--n-users 200000 --n-items 100000 --n-queries 20000; 80% train, 20% eval); "
          f"1-min load average {result['load_avg_1m_start']:.1f} -> {result['load_avg_1m_end']:.1f} "
          f"on {result['cpu_count']} CPUs")
    print(f"| {'lines':>9} | {'runner':<16} | {'job s':>7} | {'process s':>9} | {'lines/s':>8} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 11}|{'-' * 18}|{'-' * 9}|{'-' * 11}|{'-' * 10}|{'-' * 13}|")
    for r in result["generated"]:
        print(f"| {r['size']:>9} | {r['mode']:<16} | {r['job_s']:>7.1f} | {r['process_s']:>9.1f} | "
              f"{r['lines_per_s']:>8} | {r['peak_rss_mb']:>11} |")
    if "frappe" in result:
        fr = result["frappe"]
        print(f"\nFrappe: {fr['lines']} lines, {fr['examples']} examples, {fr['feature_rows']} feature rows")
        print(f"| {'conversion':<34} | {'wall s':>7} | {'CPU s':>7} | {'lines/s':>8} |")
        print(f"|{'-' * 36}|{'-' * 9}|{'-' * 9}|{'-' * 10}|")
        print(f"| {'Beam job (FnApiRunner, in memory)':<34} | {fr['beam_s']:>7.2f} | {fr['beam_cpu_s']:>7.2f} | "
              f"{fr['beam_lines_per_s']:>8} |")
        print(f"| {'plain single-process Python':<34} | {fr['plain_s']:>7.2f} | {fr['plain_cpu_s']:>7.2f} | "
              f"{fr['plain_lines_per_s']:>8} |")
        print(f"beam / plain lines/s: {fr['ratio']:.2f} (by CPU seconds: {fr['cpu_ratio']:.2f}); the median of "
              f"{len(fr['rounds'])} alternating rounds: " + ", ".join(f"{r['ratio']:.2f}" for r in fr["rounds"]))
    for name, c in result["checks"].items():
        print(f"bar: {name}: {c['value']} [{'ok' if c['ok'] else 'MISSED'}]")


if __name__ == "__main__":
    main()
