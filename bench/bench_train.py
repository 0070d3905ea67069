"""Training throughput: input pipeline alone vs each registered model's training step; FFM vs libffm.

    python -m bench.bench_train [--etl data/frappe,data/etl] [--data ../shared/data]
        [--batch_sizes 1024,4096] [--steps 20] [--models lr,fm,...] [--ffm_experiment frappe_ffm]
        [--ffm_train PATH] [--out runs/bench/train.json]

For every batch size:
  * ``input``: examples/s of the training ``tf.data`` pipeline alone (interleave,
    50k shuffle, batch, ``parse_example``, prefetch) and with ``cache``;
  * each registered model: examples/s of ``model.fit`` steps (forward, loss,
    gradients, optimizer update) on the cached pipeline, with the model's default
    config. A model is measured on the first ``--etl`` directory whose schema it
    accepts (multi-task models need two labels: Frappe has one, the generated log two).
Each figure is timed on a second pass after a warm-up pass of ``--steps`` steps (graph
tracing, shuffle buffer fill and cache fill are not timed).

FFM epoch: wall time of one full training epoch of ``--ffm_experiment`` (the tuned Frappe
FFM, at its own batch size) on the Frappe ETL output, next to libffm's ``ffm-train`` with
the same k and lambda (eta 0.2, 1 thread) on the same Frappe files (converted to libffm's
``field:feature:value``), when ``ffm-train`` is on PATH or given by ``--ffm_train``
(build it from https://github.com/ycjuan/libffm with ``make``). libffm's figure is its own
training-time column (cumulative seconds per iteration) divided by the iterations.

Missing ETL directories ``data/frappe`` and ``data/etl`` are built with the README's
``make etl`` commands first. Writes runs/bench/train.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import tf_keras as keras  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAPPE_TRAIN = "frappe.validation.libfm"
FRAPPE_EVAL = "frappe.test.libfm"
FRAPPE_FIELDS = "frappe.fields.tsv"


def _frappe_make_args(data_root: str, out: str) -> list[str]:
    f = os.path.join(data_root, "frappe")
    return ["make", "etl", f"INPUT={os.path.join(f, FRAPPE_TRAIN)}", f"EVAL_INPUT={os.path.join(f, FRAPPE_EVAL)}",
            "FORMAT=libfm", f"FIELD_MAP={os.path.join(f, FRAPPE_FIELDS)}", f"OUT={out}"]


def ensure_etl(path: str, data_root: str) -> bool:
    """Builds the default ETL outputs when missing; returns whether ``path`` holds a schema."""
    if os.path.exists(os.path.join(path, "schema.json")):
        return True
    norm = os.path.normpath(path)
    if norm == os.path.normpath("data/frappe") and os.path.isdir(os.path.join(data_root, "frappe")):
        cmd = _frappe_make_args(data_root, path)
    elif norm == os.path.normpath("data/etl"):
        cmd = ["make", "etl"]
    else:
        print(f"bench_train: {path} has no schema.json, skipped (run `make etl ... OUT={path}`)")
        return False
    print(f"bench_train: building {path}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return True


class EpochTimer(keras.callbacks.Callback):
    """Records each epoch's wall time."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def input_rate(schema, batch: int, steps: int, cache: bool) -> float:
    """Examples/s of the training pipeline alone, timed over ``steps`` batches after ``steps`` warm-up."""
    from trainer import data

    ds = data.make_dataset(schema, "train", batch, shuffle_buffer=50_000, seed=1, cache=cache, repeat=True,
                           drop_remainder=True)
    it = iter(ds)
    per_pass = math.ceil(schema.splits["train"]["examples"] / batch)
    # Warm-up: at least one full pass when caching, so that the timed part reads the cache.
    warm = max(steps, per_pass + 1 if cache else steps)
    for _ in range(warm):
        next(it)
    # Timed over at least three passes: a few batches would mostly time one refill of the
    # example-level shuffle buffer at a pass boundary (20 batches of 4096 read 80k of the 57k-line set).
    timed = max(steps, 3 * per_pass)
    t = time.perf_counter()
    for _ in range(timed):
        next(it)
    return timed * batch / (time.perf_counter() - t)


def train_rate(model_name: str, schema, data_path: str, batch: int, steps: int) -> float:
    """Examples/s of ``steps`` training steps of a model (second of two epochs of ``steps``)."""
    from trainer import config as config_lib
    from trainer import data, train

    keras.backend.clear_session()
    cfg = config_lib.resolve("", "", {"data": {"path": data_path, "batch_size": batch, "cache": True},
                                      "model": {"name": model_name}})
    model = train.init_model(train.build_and_compile(cfg, schema), schema)
    ds = train._select(data.make_dataset(schema, "train", batch, shuffle_buffer=50_000, seed=1, cache=True,
                                         repeat=True, drop_remainder=True), model.tasks, cfg.train)
    timer = EpochTimer()
    model.fit(ds, epochs=2, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return steps * batch / timer.times[-1]


def ffm_epoch_seconds(experiment: str, data_path: str) -> tuple[float, object]:
    """Wall seconds of one full training epoch (the second of two) of a named FFM experiment."""
    from feature_schema import load_schema
    from trainer import config as config_lib
    from trainer import data, train

    keras.backend.clear_session()
    cfg = config_lib.resolve(experiment, "", {"data": {"path": data_path}})
    schema = load_schema(data_path)
    model = train.init_model(train.build_and_compile(cfg, schema), schema)
    steps = math.ceil(schema.splits["train"]["examples"] / cfg.data.batch_size)
    ds = train._select(data.make_dataset(schema, "train", cfg.data.batch_size, cfg.data.shuffle_buffer,
                                         cfg.train.seed, cfg.data.cache, repeat=True), model.tasks, cfg.train)
    timer = EpochTimer()
    model.fit(ds, epochs=2, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return timer.times[-1], cfg


def libfm_to_libffm(src: str, dst: str, field_of: dict[str, int]) -> None:
    """Rewrites ``label feat:val ...`` as libffm's ``0|1 field:feat:val ...`` (label > 0 is positive)."""
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            toks = ["1" if float(parts[0]) > 0 else "0"]
            for tok in parts[1:]:
                feat, val = tok.rsplit(":", 1)
                toks.append(f"{field_of[feat]}:{feat}:{val}")
            out.write(" ".join(toks) + "\n")


def libffm_epoch_seconds(binary: str, frappe_dir: str, k: int, lam: float, eta: float, iters: int = 5) -> float:
    """libffm's training seconds per iteration on the Frappe files (its own timer, 1 thread)."""
    field_of, ids = {}, {}
    with open(os.path.join(frappe_dir, FRAPPE_FIELDS), encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            field_of[row["feature"]] = ids.setdefault(row["field"], len(ids))
    with tempfile.TemporaryDirectory() as tmp:
        tr, va = os.path.join(tmp, "tr.ffm"), os.path.join(tmp, "va.ffm")
        libfm_to_libffm(os.path.join(frappe_dir, FRAPPE_TRAIN), tr, field_of)
        libfm_to_libffm(os.path.join(frappe_dir, FRAPPE_EVAL), va, field_of)
        out = subprocess.run([binary, "-k", str(k), "-l", str(lam), "-r", str(eta), "-t", str(iters), "-s", "1",
                              "-p", va, tr, os.path.join(tmp, "model")], capture_output=True, text=True, check=True,
                             cwd=tmp)  # ffm-train writes <basename>.bin caches into its working directory
    # Rows "iter tr_logloss va_logloss tr_time" with cumulative time.
    rows = [line.split() for line in out.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    if len(rows) != iters:
        raise RuntimeError(f"unexpected ffm-train output:\n{out.stdout}")
    return float(rows[-1][-1]) / iters


def _fmt_rate(r) -> str:
    return f"{r:,.0f}" if isinstance(r, (int, float)) else str(r)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--etl", default="data/frappe,data/etl", help="comma list of ETL output dirs, in preference order")
    p.add_argument("--data", default=os.path.join("..", "shared", "data"), help="shared raw data root")
    p.add_argument("--batch_sizes", default="1024,4096")
    p.add_argument("--steps", type=int, default=20, help="timed steps per figure (after as many warm-up steps)")
    p.add_argument("--models", default="", help="comma list (default: every registered model)")
    p.add_argument("--ffm_experiment", default="frappe_ffm", help="named experiment timed per epoch ('' skips)")
    p.add_argument("--ffm_train", default="", help="libffm ffm-train binary (default: from PATH)")
    p.add_argument("--out", default=os.path.join("runs", "bench", "train.json"))
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)

    from feature_schema import load_schema
    from trainer import config as config_lib
    from trainer.models import MODELS, build_model

    etl_dirs = [d for d in args.etl.split(",") if d and ensure_etl(d, args.data)]
    if not etl_dirs:
        raise SystemExit("bench_train: no ETL output to benchmark on")
    schemas = {d: load_schema(d) for d in etl_dirs}
    batches = [int(b) for b in args.batch_sizes.split(",")]
    models = args.models.split(",") if args.models else sorted(MODELS)

    # Each model on the first data set whose schema it accepts.
    where, skipped = {}, {}
    for name in models:
        for d in etl_dirs:
            try:
                build_model(config_lib.ModelConfig(name=name), schemas[d])
            except ValueError as e:
                skipped[name] = str(e)
                continue
            where[name] = d
            skipped.pop(name, None)
            break

    rows = []
    for d in sorted(set(where.values()), key=etl_dirs.index):
        for b in batches:
            for cache in (False, True):
                rows.append({"data": d, "what": "input" + (" (cache)" if cache else ""), "batch": b,
                             "examples_per_s": input_rate(schemas[d], b, args.steps, cache)})
                print(f"bench_train: {d} input cache={cache} batch {b}: {rows[-1]['examples_per_s']:,.0f}/s",
                      flush=True)
    for name in models:
        if name not in where:
            rows.append({"data": "-", "what": name, "batch": None, "examples_per_s": f"n/a: {skipped[name]}"})
            continue
        for b in batches:
            rate = train_rate(name, schemas[where[name]], where[name], b, args.steps)
            rows.append({"data": where[name], "what": name, "batch": b, "examples_per_s": rate})
            print(f"bench_train: {where[name]} {name} batch {b}: {rate:,.0f}/s", flush=True)

    ffm = {}
    frappe_etl = next((d for d in etl_dirs if schemas[d].sources.get("input", "").endswith(FRAPPE_TRAIN)), "")
    if args.ffm_experiment and frappe_etl:
        seconds, cfg = ffm_epoch_seconds(args.ffm_experiment, frappe_etl)
        ffm = {"experiment": args.ffm_experiment, "batch_size": cfg.data.batch_size, "k": cfg.model.embedding_dim,
               "lambda": cfg.model.l2_embedding, "epoch_seconds": seconds}
        binary = args.ffm_train or shutil.which("ffm-train")
        eta = 0.2  # libffm's tuned rate on Frappe (time per epoch does not depend on it)
        if binary:
            ffm["libffm_epoch_seconds"] = libffm_epoch_seconds(binary, os.path.join(args.data, "frappe"),
                                                               cfg.model.embedding_dim, cfg.model.l2_embedding, eta)
            ffm["libffm"] = f"{binary} -k {cfg.model.embedding_dim} -l {cfg.model.l2_embedding} -r {eta} -s 1"
        else:
            ffm["libffm"] = "ffm-train not on PATH (pass --ffm_train)"

    print(f"\nTraining throughput (examples/s; {args.steps} timed steps after {args.steps} warm-up; "
          f"{os.cpu_count()} CPUs)")
    print(f"{'data':14s} {'what':14s} {'batch':>6s} {'examples/s':>12s}")
    for r in rows:
        print(f"{r['data']:14s} {r['what']:14s} {str(r['batch'] or '-'):>6s} {_fmt_rate(r['examples_per_s']):>12s}")
    if ffm:
        print(f"\nFFM epoch on Frappe ({ffm['experiment']}: k={ffm['k']}, lambda={ffm['lambda']}, "
              f"batch {ffm['batch_size']}): {ffm['epoch_seconds']:.1f} s")
        if "libffm_epoch_seconds" in ffm:
            print(f"libffm ({ffm['libffm']}): {ffm['libffm_epoch_seconds']:.2f} s per epoch")
        else:
            print(f"libffm: {ffm['libffm']}")
    result = {"rows": rows, "ffm_epoch": ffm, "steps": args.steps, "cpus": os.cpu_count(),
              "machine": platform.machine(), "load_average": os.getloadavg()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
