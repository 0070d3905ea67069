"""Where the Frappe ETL job's time goes: graph construction, each stage the runner executes, and
Python's cyclic GC, next to the plain converter of ``bench.bench_etl``.

    python -m bench.etl_stages [--data ../shared/data] [--rounds 3] [--json runs/bench/etl_stages.json]

Both first convert a 1,000-line slice (imports, first-use caches), then ``--rounds`` alternating
runs each. Per Beam run: ``build_pipeline`` seconds, every ``FnApiRunner._execute_bundle`` call
(wall and thread CPU, by stage name: the instrumented method is the in-memory runner's, so this
probe is for that runner only), and the collections per GC generation; per plain run, its wall
and its collections. The last round's stages are printed; the JSON holds all rounds.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time

from apache_beam.runners.portability.fn_api_runner import fn_runner

from bench.bench_etl import _head, beam_conversion, frappe_files, plain_conversion
from etl import pipeline


def _collections() -> list[int]:
    return [g["collections"] for g in gc.get_stats()]


def _gc_delta(before: list[int]) -> list[int]:
    return [b - a for a, b in zip(before, _collections())]


class _Timed:
    """``build_pipeline`` and ``FnApiRunner._execute_bundle`` wrapped to record their times."""

    def __init__(self):
        self.stages, self.build_s = [], 0.0

    def __enter__(self):
        self._bundle, self._build = fn_runner.FnApiRunner._execute_bundle, pipeline.build_pipeline
        timed = self

        def execute_bundle(runner, context, manager, *args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            result = timed._bundle(runner, context, manager, *args, **kwargs)
            timed.stages.append({"stage": manager.stage.name, "wall_s": round(time.perf_counter() - wall, 4),
                                 "cpu_s": round(time.thread_time() - cpu, 4)})
            return result

        def build(*args, **kwargs):
            start = time.perf_counter()
            result = timed._build(*args, **kwargs)
            timed.build_s = time.perf_counter() - start
            return result

        fn_runner.FnApiRunner._execute_bundle, pipeline.build_pipeline = execute_bundle, build
        return self

    def __exit__(self, *exc):
        fn_runner.FnApiRunner._execute_bundle, pipeline.build_pipeline = self._bundle, self._build


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min_count", type=int, default=2)
    p.add_argument("--json", default="runs/bench/etl_stages.json")
    args = p.parse_args(argv)
    train, eval_, fields = frappe_files(args.data)
    work = tempfile.mkdtemp(prefix="etl_stages_")

    def beam(tr, ev, out):
        beam_conversion(tr, ev, fields, out, args.min_count)

    slice_ = (_head(train, os.path.join(work, "t.libfm"), 1000), _head(eval_, os.path.join(work, "e.libfm"), 1000))
    plain_conversion(*slice_, fields, os.path.join(work, "warm-plain"), args.min_count)
    beam(*slice_, os.path.join(work, "warm-beam"))
    rounds = []
    for r in range(args.rounds):
        gc.collect()
        before, start = _collections(), time.perf_counter()
        plain_conversion(train, eval_, fields, os.path.join(work, f"plain{r}"), args.min_count)
        plain = {"wall_s": round(time.perf_counter() - start, 3), "gc_collections": _gc_delta(before)}
        gc.collect()
        with _Timed() as t:
            before, start = _collections(), time.perf_counter()
            beam(train, eval_, os.path.join(work, f"beam{r}"))
        rounds.append({"plain": plain, "beam": {"wall_s": round(time.perf_counter() - start, 3),
                                                "build_s": round(t.build_s, 3), "gc_collections": _gc_delta(before),
                                                "stages": t.stages}, "load_avg_1m": os.getloadavg()[0]})
    last = rounds[-1]["beam"]
    print(f"{'wall s':>7} {'CPU s':>7}  stage (last round)")
    for s in last["stages"]:
        print(f"{s['wall_s']:7.3f} {s['cpu_s']:7.3f}  {s['stage'][:100]}")
    for r in rounds:
        b = r["beam"]
        print(f"beam {b['wall_s']:.2f} s (construction {b['build_s']:.2f} s, {len(b['stages'])} stages, "
              f"GC collections per generation {b['gc_collections']}); plain {r['plain']['wall_s']:.2f} s "
              f"(GC {r['plain']['gc_collections']}); load {r['load_avg_1m']:.1f}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"rounds": rounds}, f, indent=2)
    return {"rounds": rounds}


if __name__ == "__main__":
    main()
