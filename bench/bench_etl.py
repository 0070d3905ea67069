"""ETL throughput: the Beam job on the DirectRunner vs a plain single-process conversion.

    python -m bench.bench_etl [--data ../shared/data] [--beam_args='--direct_running_mode=multi_processing']

Both read the same Frappe files (libfm, field map; validation = train split,
test = eval split) and use the same pure functions (``etl.parsing``,
``etl.features``, ``etl.tfrecord``): parse, field map, checks, counts,
vocabulary, rare ids, `tf.train.Example` bytes, gzip TFRecords. The plain
conversion holds everything in memory in one process; the Beam job is the
real one (``etl.pipeline.run``: staging, two passes, dead letters, schema).
Lines/s = input lines / wall seconds of the whole conversion (for Beam from
graph construction to the published schema; imports excluded). CPU seconds
are this process's (Beam's in-process runner included). Writes
``runs/bench/etl.json``.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import shutil
import sys
import tempfile
import time

from etl import features as feat
from etl import parsing, pipeline, tfrecord
from feature_schema import ExampleKeys


def plain_conversion(train: str, eval_: str, field_map: str, out: str, min_count: int) -> dict:
    """The same conversion as the job, in one process, everything in memory."""
    fmap = {}
    with open(field_map, encoding="utf-8") as f:
        next(f)
        for line in f:
            key, field = line.rstrip("\n").split("\t")[:2]
            fmap[key] = field
    names = list(dict.fromkeys(fmap.values()))
    proc = feat.LineProcessor(feat.LineSpec(fmt="libfm", split="path"))
    records = {0: [], 1: []}
    dead = collections.Counter()
    for split, path in ((0, train), (1, eval_)):
        with open(path, "rb") as f:
            for raw in f:
                raw = raw.rstrip(b"\n")
                try:
                    labels, features = proc.parse(raw)
                    records[split].append((labels, proc.finish(proc.assign(features, fmap))))
                except parsing.ParseError as e:
                    dead[e.reason] += 1
    counts = collections.Counter((f[0], f[1]) for _, fs in records[0] for f in fs)
    settings = {n: dict(kind="categorical", min_count=min_count, linear_only=False, source="log", multi_hot=False)
                for n in names}
    specs, vocab = feat.assign_vocabulary(counts.items(), names, settings)
    layout = feat.lookup_layout(specs, vocab)
    encoder = tfrecord.ExampleEncoder(("label",), ExampleKeys())
    written = 0
    for split, name in ((0, "train"), (1, "eval")):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        with gzip.open(os.path.join(out, name, "part-00000-of-00001.tfrecord.gz"), "wb") as f:
            for labels, features in records[split]:
                ids, vals, fids, hashes = feat.sparse_lists(features, layout)
                f.write(tfrecord.frame(encoder.encode(ids, vals, fids, hashes, labels)))
                written += 1
    return {"written": written, "dead_lettered": sum(dead.values()), "num_features": sum(s.vocab_size for s in specs)}


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data", help="directory holding frappe/")
    p.add_argument("--min_count", type=int, default=2)
    p.add_argument("--beam_args", default="", help="extra Beam flags for the job, space separated")
    p.add_argument("--json", default="runs/bench/etl.json")
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    d = os.path.join(args.data, "frappe")
    train, eval_, fields = (os.path.join(d, f) for f in ("frappe.validation.libfm", "frappe.test.libfm",
                                                         "frappe.fields.tsv"))
    for path in (train, eval_, fields):
        if not os.path.exists(path):
            raise SystemExit(f"bench_etl: {path} not found (pass --data)")
    with open(train, "rb") as f1, open(eval_, "rb") as f2:
        lines = sum(1 for _ in f1) + sum(1 for _ in f2)
    work = tempfile.mkdtemp(prefix="bench_etl_")
    try:
        plain, plain_wall, plain_cpu = _timed(lambda: plain_conversion(train, eval_, fields, os.path.join(work, "plain"),
                                                                       args.min_count))
        beam_argv = ["--input", train, "--eval_input", eval_, "--format", "libfm", "--field_map", fields,
                     "--out", os.path.join(work, "beam"), "--set", f"min_count={args.min_count}",
                     *args.beam_args.split()]
        schema, beam_wall, beam_cpu = _timed(lambda: pipeline.run(beam_argv))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    beam_written = sum(schema.counts[s]["written"] for s in ("train", "eval"))
    if (beam_written, schema.num_features) != (plain["written"], plain["num_features"]):
        raise SystemExit(f"bench_etl: outputs differ: beam {beam_written} examples / {schema.num_features} rows, "
                         f"plain {plain['written']} / {plain['num_features']}")
    rows = [("beam DirectRunner " + (args.beam_args or "(in-memory)"), beam_wall, beam_cpu),
            ("plain single-process Python", plain_wall, plain_cpu)]
    result = {"input_lines": lines, "examples_written": beam_written, "feature_rows": schema.num_features,
              "beam_args": args.beam_args, "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
              "results": [{"name": n, "wall_s": round(w, 2), "cpu_s": round(c, 2), "lines_per_s": round(lines / w)}
                          for n, w, c in rows]}
    print(f"\nETL on Frappe: {lines} lines (train {schema.counts['train']['read']}, eval {schema.counts['eval']['read']}),"
          f" {beam_written} examples, {schema.num_features} feature rows; 1-min load average "
          f"{result['load_avg_1m']:.1f} on {result['cpu_count']} CPUs")
    print(f"| {'conversion':<45} | {'wall s':>7} | {'CPU s':>7} | {'lines/s':>8} |")
    print(f"|{'-' * 47}|{'-' * 9}|{'-' * 9}|{'-' * 10}|")
    for r in result["results"]:
        print(f"| {r['name']:<45} | {r['wall_s']:>7.1f} | {r['cpu_s']:>7.1f} | {r['lines_per_s']:>8} |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
