"""The end of every epoch, shared by one process and the parameter-server chief.

``EpochRecorder.epoch_end`` evaluates the selection split (``valid`` when the schema has one,
else ``eval``) and the eval split, appends an entry to ``run_dir/history.json``, applies the
early-stopping rule (``LoglossPatience``, best weights in ``run_dir/best/``) and prints one
line. The single-process loop calls it from a Keras callback with the model it trains; the PS
chief calls it with its ordinary copy of the model after reading the epoch's checkpoint.

``history.json`` is a list with one entry per epoch::

    {"epoch": 3, "seconds": 12.4,            # wall since training started, evaluation included
     "examples": 57722, "train_seconds": 2.1, "examples_per_sec": 27486.7,  # training only
     "loss": 0.2345,                        # Keras' training loss of the epoch, when it has one
     "eval": {"click": {"auc": 0.95, "logloss": 0.22}},
     "valid": {...},                        # only when the schema has a valid split
     "selection_logloss": 0.22, "best_epoch": 3}

A task trained under ``train.task_condition`` also has ``given_<label>`` metrics there. A
resumed run keeps the entries of the epochs it does not redo, and its ``seconds`` continue from
the last entry (the time between a kill and the restart is not counted).
"""
from __future__ import annotations

import json
import math
import os
import time

import tensorflow as tf

from feature_schema import Schema
from trainer import data, evaluation, run_files

HISTORY_METRICS = ("auc", "logloss")


class LoglossPatience:
    """The early-stopping rule on the selection log loss, with its counters in ``best_dir/state.json``.

    The state file survives a kill, so a resumed run (one process or a restarted PS cluster)
    continues the same rule. The caller saves the weights when ``update`` says improved.
    """

    def __init__(self, best_dir: str, patience: int, min_delta: float = 0.0):
        self.best_dir = best_dir
        self.patience = patience
        self.min_delta = min_delta
        self.state_file = os.path.join(best_dir, "state.json")
        self.state = {"best": math.inf, "best_epoch": 0, "wait": 0, "last_epoch": 0}
        if os.path.exists(self.state_file):  # a resumed run
            with open(self.state_file, encoding="utf-8") as f:
                self.state = json.load(f)

    @property
    def weights_path(self) -> str:
        return os.path.join(self.best_dir, "weights")

    @property
    def stopped(self) -> bool:
        return self.state["wait"] >= self.patience

    def update(self, epoch: int, value: float) -> bool:
        """Records epoch ``epoch`` (1-based) with selection logloss ``value``; returns whether it is the best."""
        s = self.state
        s["last_epoch"] = epoch
        improved = value < s["best"] - self.min_delta
        if improved:
            s.update(best=value, best_epoch=epoch, wait=0)
        else:
            s["wait"] += 1
        _write_json(self.state_file, s)
        return improved

    def restore_best(self, model, last_epoch: int) -> None:
        """Loads the best epoch's weights into ``model`` if a later epoch was worse."""
        s = self.state
        if s["best_epoch"] and s["best_epoch"] != last_epoch:
            tf.train.Checkpoint(model=model).read(self.weights_path).expect_partial()
            print(f"train: restored the best epoch {s['best_epoch']} (selection logloss {s['best']:.5f}; "
                  f"stopped after epoch {last_epoch})", flush=True)


def _write_json(path: str, value) -> None:
    """Writes atomically: a reader (or a resumed run) never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def read_history(run_dir: str) -> list[dict]:
    """The entries of ``run_dir/history.json`` ([] when there is none)."""
    path = os.path.join(run_dir, run_files.HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def epoch_examples(steps: int, batch_size: int, split_examples: int | None) -> int:
    """Examples trained in ``steps`` steps over a repeated split whose every pass ends in a partial batch.

    Exact when the epoch starts at a pass boundary (the default: an epoch is one pass); otherwise
    within one batch.
    """
    if not split_examples:
        return steps * batch_size
    per_pass = math.ceil(split_examples / batch_size)
    passes, rest = divmod(steps, per_pass)
    return passes * split_examples + rest * batch_size


def history_metrics(results: dict, train_cfg) -> dict:
    """{task: {"auc", "logloss"[, "given_<label>": {...}]}} of ``evaluation.evaluate`` results."""
    out = {}
    for t, r in results.items():
        out[t] = {k: r[k] for k in HISTORY_METRICS}
        cond = train_cfg.task_condition.get(t)
        if cond:
            out[t][f"given_{cond}"] = {k: r[f"given_{cond}"][k] for k in HISTORY_METRICS}
    return out


class EpochRecorder:
    """Evaluation, history, early stopping and the progress line at the end of each epoch.

    Args:
      cfg: the run's ExperimentConfig.
      schema: the ETL schema.
      model: the model to evaluate (and whose weights are the best epoch's, when early stopping).
      resumed: the run continues an earlier one (keep its history and stopping state).
      prefix: what the progress line starts with.
    """

    def __init__(self, cfg, schema: Schema, model, resumed: bool, prefix: str = "train"):
        self.cfg, self.schema, self.model, self.prefix = cfg, schema, model, prefix
        self.tasks = tuple(model.tasks)
        self.select = evaluation.selection_split(schema)
        self.splits = tuple(dict.fromkeys((self.select, "eval")))
        # Built once: with data.cache the eval records stay in memory across epochs.
        self.datasets = {s: data.make_dataset(schema, s, cfg.data.eval_batch_size, cache=cfg.data.cache)
                         for s in self.splits}
        best_dir = os.path.join(cfg.run_dir, run_files.BEST_DIR)
        patience = cfg.train.early_stopping_patience
        self.rule = LoglossPatience(best_dir, patience, cfg.train.early_stopping_min_delta) if patience else None
        self._best_ckpt = tf.train.Checkpoint(model=model)  # one saver: a new one per write retraces
        self.path = os.path.join(cfg.run_dir, run_files.HISTORY_FILE)
        self.entries = read_history(cfg.run_dir) if resumed else []
        self.split_examples = schema.splits.get("train", {}).get("examples")
        self.start = time.time()

    @property
    def stopped(self) -> bool:
        """Early stopping has ended the run (a resumed run may find it already ended)."""
        return bool(self.rule and self.rule.stopped)

    def begin(self) -> None:
        """Training (re)starts now: ``seconds`` continue from the last recorded epoch."""
        self.start = time.time() - (self.entries[-1]["seconds"] if self.entries else 0.0)

    def epoch_end(self, epoch: int, steps: int, train_seconds: float, logs: dict | None = None,
                  echo: bool = True) -> dict:
        """Evaluates, records and prints epoch ``epoch`` (1-based) after ``steps`` training steps.

        ``echo=False`` leaves the printing (``line``) to the caller.

        Returns:
          The history entry; ``entry["stop"]`` says whether early stopping ends training now.
        """
        results = {s: evaluation.evaluate(self.model, self.schema, self.cfg.data.eval_batch_size,
                                          self.cfg.train, s, self.datasets[s]) for s in self.splits}
        value = evaluation.selection_logloss(results[self.select], self.tasks, self.cfg.train)
        if self.rule is not None and self.rule.update(epoch, value):
            self._best_ckpt.write(self.rule.weights_path)
        examples = epoch_examples(steps, self.cfg.data.batch_size, self.split_examples)
        entry = {"epoch": epoch, "seconds": time.time() - self.start, "examples": examples,
                 "train_seconds": train_seconds,
                 "examples_per_sec": round(examples / train_seconds, 1) if train_seconds > 0 else None}
        if logs and "loss" in logs:
            entry["loss"] = float(logs["loss"])
        for s in ("eval", "valid"):
            if s in results:
                entry[s] = history_metrics(results[s], self.cfg.train)
        entry["selection_logloss"] = value
        entry["best_epoch"] = self.rule.state["best_epoch"] if self.rule else None
        self.entries = [e for e in self.entries if e["epoch"] < epoch] + [entry]
        _write_json(self.path, self.entries)
        if self.cfg.train.verbose and echo:
            print(self.line(entry), flush=True)
        return {**entry, "stop": self.stopped}

    def line(self, entry: dict) -> str:
        """The one progress line of an epoch."""
        parts = [f"{self.prefix}: epoch {entry['epoch']}/{self.cfg.train.epochs}",
                 f"{entry['examples_per_sec'] or 0:,.0f} examples/s ({entry['train_seconds']:.1f}s training, "
                 f"{entry['seconds']:.1f}s in all)"]
        if "loss" in entry:
            parts.append(f"loss {entry['loss']:.4f}")
        for s in ("valid", "eval"):
            if s in entry:
                parts.append(f"{s} " + ", ".join(f"{t} AUC {m['auc']:.4f} logloss {m['logloss']:.4f}"
                                                 for t, m in entry[s].items()))
        if entry["best_epoch"]:
            parts.append(f"best epoch {entry['best_epoch']}")
        return " - ".join(parts)

    def end(self, last_epoch: int) -> None:
        """Loads the best epoch's weights into the model when a later epoch was worse."""
        if self.rule is not None:
            self.rule.restore_best(self.model, last_epoch)
