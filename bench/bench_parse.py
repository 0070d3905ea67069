"""``tf.io.parse_example`` against ``featurization.raw.parse_examples`` in the serving graph.

    python -m bench.bench_parse [--workdir runs/bench/serving] [--data data/etl] [--sizes 1,10,100,500]
        [--rounds 10] [--block 20] [--out runs/bench/parse.json]

Two tables, each of calls made in turn in blocks of ``--block`` for ``--rounds`` rounds, in
Sessions with the server's config (one intra-op thread, ops in the calling thread):

* **the parse alone**: both ops on the first N of ``bench_serving``'s ``raw`` requests (built by it
  in ``--workdir`` from the eval log of ``--data``) with the schema's ``RawParser`` spec, every
  output read by a small op (a Session that fetched nothing would let Grappler prune the parse);
* **the model**: the DeepFM that ``bench_serving`` trained in ``--workdir`` exported twice (in a
  child process, as ``bench_serving`` builds its models), once with ``ParseExample`` put back in
  ``raw.parse_examples``' place, and the floor of its ``serving_default``, ``rank`` and hashed
  signatures (``bench_serving``'s ``Request.floor``) on each.

Both ways must give equal outputs before anything is timed. Prints p50 microseconds and the
ratio, and writes them as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys

import numpy as np

from bench import bench_serving

OPS = ("ParseExample", "parse_examples")


@contextlib.contextmanager
def parse_op(op: str):
    """Builds graphs in the block with ``op`` as ``raw.parse_examples`` (the serving graph's parse)."""
    import tensorflow as tf

    from featurization import raw

    saved = raw.parse_examples
    if op == "ParseExample":
        raw.parse_examples = lambda serialized, spec: tf.io.parse_example(serialized, spec)
    try:
        yield raw.parse_examples
    finally:
        raw.parse_examples = saved


def read_all(parsed: dict):
    """One float scalar that reads every output of a parse (indices, values, shapes)."""
    import tensorflow as tf

    parts = []
    for sp in parsed.values():
        values = tf.strings.length(sp.values) if sp.values.dtype == tf.string else sp.values
        parts += [tf.reduce_sum(sp.indices), tf.reduce_sum(tf.cast(values, tf.int64)), tf.reduce_sum(sp.dense_shape)]
    return tf.add_n(parts)


def parse_callables(spec: dict, config) -> dict:
    """{op: (callable(serialized) -> every output, callable(serialized) -> ``read_all``)}, a Session each."""
    import tensorflow as tf

    out = {}
    for op in OPS:
        graph = tf.Graph()
        with graph.as_default(), parse_op(op) as parse:
            x = tf.compat.v1.placeholder(tf.string, [None])
            parsed = parse(x, spec)
            fetches = [t for k in sorted(parsed) for t in (parsed[k].indices, parsed[k].values, parsed[k].dense_shape)]
            read = read_all(parsed)
        sess = tf.compat.v1.Session(graph=graph, config=config)
        out[op] = (sess.make_callable(fetches, [x]), sess.make_callable(read, [x]))
    return out


def export_both(workdir: str) -> None:
    """Exports bench_serving's DeepFM run once per parse op, under ``<workdir>/parse_ab/<op>``."""
    from export import exporter

    shutil.rmtree(os.path.join(workdir, "parse_ab"), ignore_errors=True)
    for op in OPS:
        with parse_op(op):
            exporter.export(os.path.join(workdir, "run-deepfm"), os.path.join(workdir, "parse_ab", op), "deepfm",
                            verify_examples=1000, version=1)


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def timed_rows(fns: dict, sizes, args, what: str) -> list[dict]:
    """Rows of p50 us per (label, size) of ``fns`` {(label, size, op): call}, called in turn."""
    times = bench_serving.interleaved(fns, args.rounds, args.block)
    rows = []
    for label, n in dict.fromkeys((k[0], k[1]) for k in fns):
        row = {"what": what, "request": label, "examples": n}
        for op in OPS:
            row[f"{op}_p50_us"] = bench_serving.pct(times[label, n, op], 50) * 1e3
        row["ratio"] = row["parse_examples_p50_us"] / row["ParseExample_p50_us"]
        rows.append(row)
    return rows


def parse_alone(args, sizes, examples) -> list[dict]:
    from feature_schema import load_schema
    from featurization.raw import RawParser
    from serving import server

    calls = parse_callables(RawParser(load_schema(args.data), join=False).spec(), server.session_config())
    fns = {}
    for n in sizes:
        batch = np.empty(n, dtype=object)
        batch[:] = examples[:n]
        if not same(*(calls[op][0](batch) for op in OPS)):
            raise SystemExit(f"bench_parse: the two parses differ at {n} Examples")
        for op in OPS:
            fns["raw", n, op] = lambda read=calls[op][1], batch=batch: read(batch)
    return timed_rows(fns, sizes, args, "parse alone")


def model_floors(args, sizes, kinds) -> list[dict]:
    from serving import server

    versions = {op: server.LoadedVersion("deepfm", 1, os.path.join(args.workdir, "parse_ab", op, "deepfm", "1"),
                                         server.session_config()) for op in OPS}
    fns = {}
    for kind in ("raw", "rank", "hashed"):
        for n in sizes:
            req = bench_serving.Request("deepfm", kind, kinds[kind], n)
            floors = {op: req.floor(v.signature(req.signature)) for op, v in versions.items()}
            if not same(*(floors[op]() for op in OPS)):
                raise SystemExit(f"bench_parse: the two exports score {kind} requests of {n} ads differently")
            for op in OPS:
                fns[kind, n, op] = floors[op]
    return timed_rows(fns, sizes, args, "DeepFM floor")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/bench/serving", help="bench_serving's models and requests (built by it)")
    p.add_argument("--data", default="data/etl", help="the ETL output whose schema the requests follow")
    p.add_argument("--sizes", default="1,10,100,500", help="Examples per call")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=20)
    p.add_argument("--out", default="runs/bench/parse.json")
    p.add_argument("--export_only", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.export_only:
        return export_both(args.workdir)
    # Exported in a child: this process's first Sessions must be the server's config (see bench_serving).
    subprocess.run([sys.executable, "-m", "bench.bench_parse", "--export_only", "1", "--workdir", args.workdir],
                   check=True, env=bench_serving.child_env())
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = bench_serving.read_models(args.workdir)["deepfm"][1]
    if max(sizes) > len(kinds["raw"]):
        raise SystemExit(f"bench_parse: {args.workdir} holds {len(kinds['raw'])} raw Examples, fewer than {max(sizes)}")
    rows = parse_alone(args, sizes, kinds["raw"]) + model_floors(args, sizes, kinds)
    print(f"| what | request | Examples | {OPS[0]} p50 us | {OPS[1]} p50 us | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['request']} | {r['examples']} | {r['ParseExample_p50_us']:.0f} | "
              f"{r['parse_examples_p50_us']:.0f} | {r['ratio']:.2f} |")
    bench_serving.write_json(args.out, {"command": "python -m bench.bench_parse " + " ".join(sys.argv[1:]),
                                        "machine": bench_serving.machine(), "rows": rows}, "bench_parse")


if __name__ == "__main__":
    main()
