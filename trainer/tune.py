"""Hyper-parameter search over config keys: grid or random, in one process or several.

    python -m trainer.tune --data data/frappe --model ffm \
        --grid model.embedding_dim=16,32 --grid model.l2_embedding=5e-4,1e-3 \
        [--experiment NAME] [--config base.yaml] [--set key=value ...] \
        [--random N [--dist optimizer.learning_rate=log:0.05:0.5] [--seed S]] \
        [--workers N] [--metric logloss|auc] [--task NAME] [--seeds 42,1,2] [--out DIR]

The base config is resolved like ``trainer.train`` resolves it (experiment ->
``--config`` -> ``--set`` -> ``--data``/``--model``); each trial puts its values on
top and is one training run (``trainer.train.train``) whose metrics are measured
on the eval split (with early stopping configured, at the restored best epoch).
When the schema has a ``valid`` split, trials are ranked on it (each run's
``metrics_valid.json``; early stopping selects on it too) and the eval metrics
are reported next to it; otherwise they are ranked on eval.

Search space:
  --grid KEY=V1,V2,...   discrete values, parsed as YAML scalars; a YAML list
                         (``model.hidden_units=[[256,128],[400,400,400]]``) gives
                         list-valued choices.
  --dist KEY=log:LO:HI | uniform:LO:HI | int:LO:HI
                         a continuous (or integer) range, for ``--random`` only.
  --point "KEY=V KEY=V"  one extra trial with these values (keys that move together,
                         e.g. a batch size and its learning rate); repeatable.
Without ``--random`` every combination of the grids runs (grid search); with
``--random N``, N trials are drawn with seed ``--seed``: distinct grid points when
there are only grids, otherwise independent draws per key. ``--point`` trials follow.
  --seeds S1,S2,...      run every trial once per ``train.seed``; the tables add the
                         mean and standard deviation over the seeds of each point
                         (e.g. ``make tune EXPERIMENT=frappe_ffm ARGS='--seeds 42,1,2'``
                         for a figure with its seed-to-seed spread).

``--workers 1`` runs the trials one after another in this process; ``--workers N``
runs up to N trials at once, each in its own ``python -m trainer.train`` process
with ``TF_NUM_INTRAOP_THREADS`` = cores / N (unless set), so that the workers do not
oversubscribe the CPUs.

Outputs in ``--out`` (``make tune OUT=<dir>``; without it, a new temporary directory,
printed at the start and the end: nothing is written under ``runs/`` unless asked):
  trials.json   the search (command, base, space, metric, split) and every trial: values,
                status, metrics per task (eval, and valid when the schema has it),
                seconds, run dir; with ``--seeds`` also ``summary``: mean and sd per point;
                rewritten after each trial;
  trials.md     the same as a Markdown table, best trial first;
  trial-NNN/    each trial's run dir (config.yaml, metrics.json, history.json, checkpoints).
A trial whose run dir already holds ``metrics.json`` for the identical resolved
config is not rerun, so an interrupted search continues where it stopped.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import yaml

from feature_schema import configs, load_schema
from trainer import config as config_lib
# Run-directory names without TensorFlow: the parent of subprocess workers stays TF-free.
from trainer.run_files import BEST_STATE, METRICS_FILE, PROGRESS_FILE, VALID_METRICS_FILE  # noqa: F401

TRIAL_CONFIG = "trial.yaml"
SEED_KEY = "train.seed"
# Objectives: name -> (sort key from a task's metrics, lower is better).
OBJECTIVES = {
    "logloss": lambda m: m["logloss"],
    "auc": lambda m: -m["auc"],
    "calibration": lambda m: abs(m["calibration"] - 1.0),
}


@dataclasses.dataclass(frozen=True)
class Dist:
    """A sampled range of ``--random`` search: ``log`` / ``uniform`` floats or ``int`` in [lo, hi]."""

    kind: str
    lo: float
    hi: float

    def __post_init__(self):
        if self.kind not in ("log", "uniform", "int"):
            raise ValueError(f"distribution {self.kind!r} not in log/uniform/int")
        if not self.lo <= self.hi:
            raise ValueError(f"distribution range [{self.lo}, {self.hi}] is empty")
        if self.kind == "log" and self.lo <= 0:
            raise ValueError(f"log range needs lo > 0, got {self.lo}")

    def sample(self, rng: random.Random):
        if self.kind == "log":
            return float(math.exp(rng.uniform(math.log(self.lo), math.log(self.hi))))
        if self.kind == "int":
            return rng.randint(int(self.lo), int(self.hi))
        return rng.uniform(self.lo, self.hi)


def _split_key(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"search dimension {item!r} is not KEY=VALUES")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or not raw:
        raise ValueError(f"search dimension {item!r} has an empty key or no values")
    return key, raw


def _scalar(value):
    """YAML value with numbers in any notation: YAML 1.1 reads ``1e-3`` (no dot) as a string."""
    if isinstance(value, list):
        return [_scalar(v) for v in value]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_grid(item: str) -> tuple[str, list]:
    """``"a.b=1,2"`` -> ``("a.b", [1, 2])``; a YAML list value gives its elements."""
    key, raw = _split_key(item)
    parsed = yaml.safe_load(raw)
    values = parsed if isinstance(parsed, list) else [yaml.safe_load(v) for v in raw.split(",")]
    values = [_scalar(v) for v in values]
    if not values:
        raise ValueError(f"search dimension {item!r} has no values")
    return key, values


def parse_dist(item: str) -> tuple[str, Dist]:
    """``"a.b=log:1e-4:1e-2"`` -> ``("a.b", Dist("log", 1e-4, 1e-2))``."""
    key, raw = _split_key(item)
    parts = raw.split(":")
    if len(parts) != 3:
        raise ValueError(f"distribution {item!r} is not KEY=KIND:LO:HI")
    return key, Dist(parts[0], float(parts[1]), float(parts[2]))


def parse_point(item: str) -> dict:
    """``"a=1 b.c=x"`` -> ``{"a": 1, "b.c": "x"}`` (one explicit trial)."""
    point = {}
    for part in item.split():
        key, raw = _split_key(part)
        point[key] = _scalar(yaml.safe_load(raw))
    if not point:
        raise ValueError(f"--point {item!r} has no KEY=VALUE")
    return point


def parse_seeds(raw: str) -> list[int]:
    """``"42,1,2"`` -> ``[42, 1, 2]`` (distinct integers)."""
    if not raw:
        return []
    try:
        seeds = [int(x) for x in raw.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {raw!r} is not a comma-separated list of integers") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {raw!r} repeats a seed")
    return seeds


def with_seeds(points: list[dict], seeds: list[int]) -> list[dict]:
    """Every point once per seed (seed varying fastest), as ``train.seed`` values."""
    if any(SEED_KEY in p for p in points):
        raise ValueError(f"--seeds and a search over {SEED_KEY} together are ambiguous")
    return [{**p, SEED_KEY: s} for p in points for s in seeds]


def grid_trials(grid: list[tuple[str, list]]) -> list[dict]:
    """Every combination of the grids, the first key varying slowest."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def random_trials(grid: list[tuple[str, list]], dists: list[tuple[str, Dist]], n: int, seed: int) -> list[dict]:
    """``n`` random trials: distinct grid points, or independent draws per key when ranges are given."""
    if n < 1:
        raise ValueError(f"--random needs N >= 1, got {n}")
    rng = random.Random(seed)
    if not dists:
        points = grid_trials(grid)
        return rng.sample(points, min(n, len(points)))
    out = []
    for _ in range(n):
        trial = {k: rng.choice(v) for k, v in grid}
        trial.update({k: d.sample(rng) for k, d in dists})
        out.append(trial)
    return out


def nest(flat: dict[str, Any]) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def trial_config(base: dict, values: dict, run_dir: str) -> config_lib.ExperimentConfig:
    """The resolved config of one trial (unknown keys and bad values raise here, before training)."""
    data = configs.deep_merge(base, nest(values))
    data = configs.deep_merge(data, {"run_dir": run_dir})
    return configs.from_dict(config_lib.ExperimentConfig, data)


@dataclasses.dataclass
class Trial:
    """One point of the search and its outcome."""

    index: int
    values: dict
    run_dir: str
    status: str = "pending"  # pending | ok | cached | failed
    metrics: dict = dataclasses.field(default_factory=dict)  # eval split
    valid: dict = dataclasses.field(default_factory=dict)  # valid split (ranks when present)
    seconds: float = 0.0
    epochs: str = ""  # "best/run" epochs under early stopping, else epochs run
    error: str = ""


def _finished(trial: Trial, cfg: config_lib.ExperimentConfig) -> bool:
    """Whether the trial's run dir holds metrics of exactly this config (else it is cleared)."""
    path = os.path.join(trial.run_dir, TRIAL_CONFIG)
    if not os.path.exists(path):
        if os.path.isdir(trial.run_dir):
            shutil.rmtree(trial.run_dir)
        return False
    if config_lib.load(path) != cfg:
        shutil.rmtree(trial.run_dir)  # a different search used this dir: never resume its checkpoints
        return False
    return os.path.exists(os.path.join(trial.run_dir, METRICS_FILE))


def task_metrics(result: dict) -> dict:
    """The per-task entries (``{task: {"auc", "logloss", ...}}``) of a run's metrics."""
    return {k: v for k, v in result.items() if isinstance(v, dict) and "logloss" in v}


def _read_metrics(run_dir: str, name: str = METRICS_FILE) -> dict:
    """Task metrics of a run's ``name`` file ({} when it has none, e.g. no valid split)."""
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return task_metrics(json.load(f))


def _collect(trial: "Trial") -> None:
    """Reads the eval and valid metrics of a finished trial's run dir."""
    trial.metrics = _read_metrics(trial.run_dir)
    trial.valid = _read_metrics(trial.run_dir, VALID_METRICS_FILE)


def run_in_process(cfg: config_lib.ExperimentConfig) -> None:
    """Trains one trial in this process (its metrics land in its run dir)."""
    from trainer import train

    import tf_keras as keras

    keras.backend.clear_session()  # drop the previous trial's graph and variables
    train.train(cfg)


def run_subprocess(cfg: config_lib.ExperimentConfig, threads: int) -> None:
    """Trains one trial in a ``python -m trainer.train`` process (its metrics land in its run dir)."""
    env = dict(os.environ)
    env.setdefault("TF_USE_LEGACY_KERAS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads:
        env.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
        env.setdefault("TF_NUM_INTEROP_THREADS", "1")
    log = os.path.join(cfg.run_dir, "train.log")
    cmd = [sys.executable, "-m", "trainer.train", "--config", os.path.join(cfg.run_dir, TRIAL_CONFIG)]
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        with open(log, encoding="utf-8") as f:
            tail = f.read().strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))


def epochs_of(run_dir: str) -> str:
    """Epochs as "best/run" from the early-stopping state, else the epochs in progress.jsonl."""
    state = os.path.join(run_dir, BEST_STATE)
    if os.path.exists(state):
        with open(state, encoding="utf-8") as f:
            s = json.load(f)
        return f"{s['best_epoch']}/{s['last_epoch']}"
    progress = os.path.join(run_dir, PROGRESS_FILE)
    if not os.path.exists(progress):
        return ""
    with open(progress, encoding="utf-8") as f:
        epochs = [json.loads(line).get("epoch") for line in f if '"epoch"' in line]
    return str(max((e for e in epochs if e), default=0))


def selecting(trial: Trial) -> dict:
    """The metrics that rank a trial: the valid split's when its run has them, else eval's."""
    return trial.valid or trial.metrics


def objective(trial: Trial, metric: str, task: str) -> float:
    """The trial's sort key (lower is better); +inf when it failed or has no such task."""
    m = selecting(trial).get(task)
    if trial.status not in ("ok", "cached") or not m:
        return math.inf
    v = OBJECTIVES[metric](m)
    return math.inf if math.isnan(v) else v


def ranked(trials: list[Trial], metric: str, task: str) -> list[Trial]:
    return sorted(trials, key=lambda t: (objective(t, metric, task), t.index))


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def seed_summary(trials: list[Trial], metric: str, task: str) -> list[dict]:
    """Per point (the values without ``train.seed``): seeds, and mean and sd over them of each
    task's AUC and logloss (eval, and valid when present), best point first by the mean objective."""
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        point = {k: v for k, v in t.values.items() if k != SEED_KEY}
        groups.setdefault(json.dumps(point, sort_keys=True, default=str), []).append(t)
    out = []
    for key, members in groups.items():
        done = [t for t in members if objective(t, metric, task) < math.inf]
        row = {"values": json.loads(key), "seeds": [t.values.get(SEED_KEY) for t in done],
               "trials": [t.index for t in members], "objective": math.inf, "eval": {}, "valid": {}}
        if done:
            row["objective"] = statistics.fmean(objective(t, metric, task) for t in done)
            for split in ("eval", "valid"):
                per_task = [getattr(t, "metrics" if split == "eval" else "valid") for t in done]
                for name in sorted(set.intersection(*(set(m) for m in per_task))):
                    row[split][name] = {k: _mean_sd([m[name][k] for m in per_task]) for k in ("auc", "logloss")}
        out.append(row)
    return sorted(out, key=lambda r: (r["objective"], min(r["trials"])))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def markdown_table(search: dict, trials: list[Trial]) -> str:
    """The trials as a Markdown table, best first, under a header describing the search."""
    metric, task = search["metric"], search["task"]
    keys = search["keys"]
    tasks = [task] + [t for t in sorted({t for tr in trials for t in tr.metrics}) if t != task]
    on_valid = any(tr.valid for tr in trials)
    lines = [f"# Search `{search['name']}`", "",
             f"Command: `{search['command']}`", "",
             f"Ranked by {'valid' if on_valid else 'eval'} {metric} of task `{task}`; {len(trials)} trials "
             f"({search['mode']}, {search['workers']} worker(s))"
             + ("; the other columns are eval metrics." if on_valid else "."), ""]
    head = ["rank", "trial"] + [f"`{k}`" for k in keys]
    if on_valid:
        head += [f"valid {task} AUC", f"valid {task} logloss"]
    for t in tasks:
        head += [f"{t} AUC", f"{t} logloss", f"{t} calib."]
    head += ["epochs", "seconds", "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, tr in enumerate(ranked(trials, metric, task), 1):
        row = [str(rank) if objective(tr, metric, task) < math.inf else "-", f"{tr.index:03d}"]
        row += [_fmt(tr.values.get(k, "")) for k in keys]
        if on_valid:
            v = tr.valid.get(task, {})
            row += [f"{v['auc']:.4f}", f"{v['logloss']:.4f}"] if v else ["", ""]
        for t in tasks:
            m = tr.metrics.get(t, {})
            row += [f"{m['auc']:.4f}", f"{m['logloss']:.4f}", f"{m['calibration']:.3f}"] if m else ["", "", ""]
        row += [tr.epochs, f"{tr.seconds:.0f}", tr.status + (f": {tr.error}" if tr.error else "")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    if search.get("seeds"):
        lines += ["", *summary_table(search, seed_summary(trials, metric, task), tasks)]
    return "\n".join(lines) + "\n"


def summary_table(search: dict, summary: list[dict], tasks: list[str]) -> list[str]:
    """Markdown lines of the mean ± sd over seeds per point (``--seeds``)."""
    keys = [k for k in search["keys"] if k != SEED_KEY]
    splits = ["valid", "eval"] if any(r["valid"] for r in summary) else ["eval"]
    lines = [f"Mean ± sd over seeds {', '.join(str(s) for s in search['seeds'])} (sample sd):", ""]
    head = [f"`{k}`" for k in keys] + ["seeds"]
    for split in splits:
        head += [f"{split} {t} {m}" for t in tasks for m in ("AUC", "logloss")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        row = [_fmt(r["values"].get(k, "")) for k in keys] + [str(len(r["seeds"]))]
        for split in splits:
            for t in tasks:
                m = r[split].get(t)
                row += ([f"{m[k]['mean']:.4f} ± {m[k]['sd']:.4f}" for k in ("auc", "logloss")] if m else ["", ""])
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return lines


def write_tables(out: str, search: dict, trials: list[Trial]) -> None:
    """Writes trials.json and trials.md atomically (readers never see half a table)."""
    best = ranked(trials, search["metric"], search["task"])[0] if trials else None
    doc = {**search, "best": None, "trials": [dataclasses.asdict(t) for t in trials]}
    if best is not None and objective(best, search["metric"], search["task"]) < math.inf:
        doc["best"] = {"index": best.index, "values": best.values, "metrics": best.metrics, "valid": best.valid,
                       "config": os.path.join(best.run_dir, "config.yaml")}
    if search.get("seeds"):
        doc["summary"] = seed_summary(trials, search["metric"], search["task"])
    for name, text in (("trials.json", json.dumps(doc, indent=1, default=str)),
                       ("trials.md", markdown_table(search, trials))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def _default_task(cfg: config_lib.ExperimentConfig) -> str:
    """The model's first task: configured, else the schema's first label ("" when unreadable)."""
    if cfg.model.tasks:
        return cfg.model.tasks[0]
    try:
        return load_schema(cfg.data.path).label_names[0]
    except (OSError, ValueError, IndexError):
        return ""  # filled in from the first finished trial


def search(base: dict, points: list[dict], out: str, *, metric: str = "logloss", task: str = "",
           workers: int = 1, name: str = "", command: str = "", mode: str = "grid",
           seeds: list[int] | None = None) -> dict:
    """Runs every trial (resuming finished ones) and writes the tables; returns trials.json's content.

    Args:
      base: config overrides shared by all trials (resolved experiment + YAML + --set).
      points: one dict of flat ``key: value`` per trial.
      out: output directory.
      metric: ``logloss``, ``auc`` or ``calibration`` (closeness to 1).
      task: task whose metric ranks the trials (default: the model's first task).
      workers: 1 = in this process; N > 1 = up to N concurrent training processes.
      name, command, mode: recorded in the tables.
      seeds: the ``train.seed`` values the points were repeated with (adds the mean ± sd table).
    """
    if metric not in OBJECTIVES:
        raise ValueError(f"metric {metric!r} not in {sorted(OBJECTIVES)}")
    if not points:
        raise ValueError("the search has no trials")
    os.makedirs(out, exist_ok=True)
    trials, cfgs = [], []
    for i, values in enumerate(points):
        trial = Trial(index=i, values=values, run_dir=os.path.join(out, f"trial-{i:03d}"))
        cfgs.append(trial_config(base, values, trial.run_dir))  # every config is valid before any trains
        trials.append(trial)
    keys = list(dict.fromkeys(k for p in points for k in p))
    task = task or _default_task(cfgs[0])
    info = {"name": name or os.path.basename(os.path.normpath(out)), "command": command, "mode": mode,
            "workers": workers, "metric": metric, "task": task, "keys": keys, "base": base,
            "seeds": list(seeds or [])}
    lock = threading.Lock()
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0

    def record(trial: Trial) -> None:
        with lock:
            if not info["task"] and trial.metrics:
                info["task"] = next(iter(trial.metrics))
            split = "valid" if trial.valid else "eval"
            write_tables(out, info, trials)
            best = objective(trial, metric, info["task"]) if info["task"] else math.inf
            print(f"tune: trial {trial.index:03d} {trial.status} {trial.values} "
                  f"{split} {metric}={'n/a' if best == math.inf else _fmt(abs(best))} ({trial.seconds:.0f}s)",
                  flush=True)

    def run(trial: Trial, cfg: config_lib.ExperimentConfig) -> None:
        if _finished(trial, cfg):
            trial.status = "cached"
            _collect(trial)
            trial.epochs = epochs_of(trial.run_dir)
            record(trial)
            return
        os.makedirs(trial.run_dir, exist_ok=True)
        config_lib.save(cfg, os.path.join(trial.run_dir, TRIAL_CONFIG))
        start = time.time()
        try:
            run_subprocess(cfg, threads) if workers > 1 else run_in_process(cfg)
            _collect(trial)
            trial.status = "ok"
        except Exception as e:  # a failed trial is a row of the table, not the end of the search
            trial.status, trial.error = "failed", f"{type(e).__name__}: {e}"[:300]
        trial.seconds = time.time() - start
        trial.epochs = epochs_of(trial.run_dir)
        record(trial)

    write_tables(out, info, trials)  # the pending trials, visible from the start
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, trials, cfgs))
    else:
        for trial, cfg in zip(trials, cfgs):
            run(trial, cfg)
    with lock:
        write_tables(out, info, trials)
    with open(os.path.join(out, "trials.json"), encoding="utf-8") as f:
        return json.load(f)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Grid or random hyper-parameter search over trainer config keys.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Search space:")[1].split("Outputs in")[0])
    p.add_argument("--data", default="", help="ETL output directory (data.path)")
    p.add_argument("--model", default="", help="registered model name (model.name)")
    p.add_argument("--experiment", default="", help="named experiment the trials start from")
    p.add_argument("--config", default="", help="YAML file of base overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="base override")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="discrete search values")
    p.add_argument("--dist", action="append", default=[], metavar="KEY=KIND:LO:HI",
                   help="range for --random (log, uniform or int)")
    p.add_argument("--point", action="append", default=[], metavar="'KEY=V KEY=V'",
                   help="an explicit trial (space-separated KEY=VALUE)")
    p.add_argument("--random", type=int, default=0, metavar="N", help="N random trials instead of the full grid")
    p.add_argument("--seed", type=int, default=0, help="seed of the random search")
    p.add_argument("--workers", type=int, default=1, help="concurrent trials (>1: one process each)")
    p.add_argument("--metric", default="logloss", choices=sorted(OBJECTIVES), help="ranking metric")
    p.add_argument("--task", default="", help="task whose metric ranks trials (default: first task)")
    p.add_argument("--seeds", default="", metavar="S1,S2,...",
                   help="run every trial once per train.seed and add mean ± sd over the seeds")
    p.add_argument("--out", default="", help="output directory (default: a new temporary directory)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    grid = [parse_grid(g) for g in args.grid]
    dists = [parse_dist(d) for d in args.dist]
    if dists and not args.random:
        raise SystemExit("--dist needs --random N")
    points = [parse_point(x) for x in args.point]
    seeds = parse_seeds(args.seeds)
    if not grid and not dists and not points and not seeds:
        raise SystemExit("nothing to search: give --grid KEY=V1,V2, --dist KEY=KIND:LO:HI, --point 'KEY=V ...' "
                         "or --seeds S1,S2")
    flat = {}
    if args.data:
        flat["data"] = {"path": args.data}
    if args.model:
        flat["model"] = {"name": args.model}
    overrides = configs.deep_merge(configs.parse_overrides(args.set), flat)
    base_cfg = config_lib.resolve(args.experiment, args.config, overrides)  # validates the base
    base = configs.to_dict(base_cfg)
    if args.random:
        points = random_trials(grid, dists, args.random, args.seed) + points
    elif grid:
        points = grid_trials(grid) + points
    mode = f"random {args.random}, seed {args.seed}" if args.random else (
        "grid" if grid else ("points" if points else "base config"))
    if seeds:
        points = with_seeds(points or [{}], seeds)
        mode += f" x seeds {','.join(map(str, seeds))}"
    name = args.experiment or base_cfg.model.name
    out = args.out or tempfile.mkdtemp(prefix=f"tune-{name}-")
    if not args.out:
        print(f"tune: writing to {out} (give --out, or make tune OUT=<dir>, to choose; rerun with it to resume)",
              flush=True)
    command = "python -m trainer.tune " + " ".join(shlex.quote(a) for a in argv)
    result = search(base, points, out, metric=args.metric, task=args.task, workers=args.workers, name=name,
                    command=command, mode=mode, seeds=seeds)
    print(open(os.path.join(out, "trials.md"), encoding="utf-8").read())
    print(f"tune: tables and trials in {out}", flush=True)
    return result


if __name__ == "__main__":
    from trainer import quiet

    quiet.filter_stderr()  # the command: TensorFlow's noise is filtered (trials import it)
    main()
