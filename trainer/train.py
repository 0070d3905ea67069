"""Trains a registered model on the ETL output and writes metrics, checkpoints and config.

    python -m trainer.train --data data/etl --model fm --run_dir runs/default \
        [--experiment NAME] [--config file.yaml] [--set model.embedding_dim=16 ...]

Writes into ``run_dir``: ``config.yaml`` (the resolved config), ``backup/``
(kill-safe checkpoints every ``train.checkpoint_every_steps``: rerunning the
same command after a kill resumes at the checkpointed step), ``best/`` (the best
epoch's weights under early stopping), ``tensorboard/``, ``progress.jsonl``
(one line per start/epoch/end with the optimizer step), ``model/`` (final
weights for the exporter), ``metrics.json`` (per task: AUC, logloss,
calibration on the eval split) and ``report/`` (``train.report``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from feature_schema import Schema, configs, load_schema
from trainer import config as config_lib
from trainer import data, metrics
from trainer.models import MODELS, build_model

WEIGHTS_DIR = "model"
BACKUP_DIR = "backup"
BEST_DIR = "best"
PROGRESS_FILE = "progress.jsonl"


def make_optimizer(cfg: config_lib.OptimizerConfig, batch_size: int = 1):
    """The configured Keras optimizer (``scale_lr_by_batch`` multiplies the rate by ``batch_size``)."""
    lr = cfg.learning_rate * (batch_size if cfg.scale_lr_by_batch else 1)
    if cfg.name == "adam":
        return keras.optimizers.Adam(lr)
    if cfg.name == "adagrad":
        # epsilon ~0: libffm divides by sqrt(G) with G starting at initial_accumulator_value.
        return keras.optimizers.Adagrad(lr, initial_accumulator_value=cfg.initial_accumulator_value,
                                        epsilon=1e-10)
    if cfg.name == "ftrl":
        return keras.optimizers.Ftrl(lr, initial_accumulator_value=cfg.initial_accumulator_value,
                                     l1_regularization_strength=cfg.l1, l2_regularization_strength=cfg.l2)
    return keras.optimizers.SGD(lr, momentum=cfg.momentum)


def check_task_settings(cfg: config_lib.ExperimentConfig, tasks, schema: Schema) -> None:
    """Per-task settings must name tasks of the model (and conditions labels of the schema)."""
    t = cfg.train
    for key, mapping in (("loss_weights", t.loss_weights), ("pos_weight", t.pos_weight),
                         ("task_condition", t.task_condition)):
        unknown = [k for k in mapping if k not in tasks]
        if unknown:
            raise ValueError(f"train.{key} names {unknown}, not tasks of the model {list(tasks)}")
    bad = {k: v for k, v in t.task_condition.items() if v not in schema.label_names}
    if bad:
        raise ValueError(f"train.task_condition {bad}: conditions must be labels of {list(schema.label_names)}")


def task_weights(labels: dict, weights: tf.Tensor, tasks, train_cfg: config_lib.TrainConfig, training: bool):
    """Per-task sample weights: example weight x positive weight (training only) x condition label."""
    out = {}
    for t in tasks:
        w = weights
        pw = train_cfg.pos_weight.get(t, 1.0)
        if training and pw != 1.0:
            w = w * (1.0 + (pw - 1.0) * labels[t])
        cond = train_cfg.task_condition.get(t)
        if cond:
            w = w * labels[cond]
        out[t] = w
    return out


def _select(ds, tasks, train_cfg: config_lib.TrainConfig | None = None, training: bool = True):
    """(features, labels, weights) -> Keras (x, y, sample_weight) for the model's tasks."""
    train_cfg = train_cfg or config_lib.TrainConfig()
    return ds.map(lambda f, y, w: (f, {t: y[t] for t in tasks}, task_weights(y, w, tasks, train_cfg, training)))


def binary_crossentropy(y_true, y_pred):
    """Per-example log loss of [batch] labels and probabilities (Keras' version reduces the last axis)."""
    return keras.backend.binary_crossentropy(tf.reshape(tf.cast(y_true, y_pred.dtype), [-1]),
                                             tf.reshape(y_pred, [-1]))


class LogLoss(keras.metrics.Mean):
    """Weighted mean log loss of [batch] labels and probabilities (the ``logloss`` Keras logs)."""

    def __init__(self, name="logloss", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            sample_weight = tf.reshape(sample_weight, [-1])
        return super().update_state(binary_crossentropy(y_true, y_pred), sample_weight)


def build_and_compile(cfg: config_lib.ExperimentConfig, schema: Schema):
    model = build_model(cfg.model, schema)
    check_task_settings(cfg, model.tasks, schema)
    model.compile(optimizer=make_optimizer(cfg.optimizer, cfg.data.batch_size),
                  loss={t: binary_crossentropy for t in model.tasks},
                  loss_weights={t: cfg.train.loss_weights.get(t, 1.0) for t in model.tasks},
                  weighted_metrics={t: [keras.metrics.AUC(name="auc"), LogLoss()] for t in model.tasks},
                  steps_per_execution=cfg.train.steps_per_execution, jit_compile=cfg.train.jit_compile)
    return model


def init_model(model, schema: Schema):
    """Creates the model's variables by calling it on one eval batch."""
    features, _, _ = next(iter(data.make_dataset(schema, "eval", 2)))
    model(features)
    return model


def predict_split(model, schema: Schema, split: str, batch_size: int, outputs=None):
    """Predictions, labels and weights of a whole split, in file order.

    Args:
      outputs: model outputs to collect (default: the tasks).

    Returns:
      ({output: probs [n]}, {label: 0/1 [n]}, weights [n]).
    """
    outputs = tuple(outputs or model.tasks)
    preds = {t: [] for t in outputs}
    labels = {name: [] for name in schema.label_names}
    weights = []
    predict = tf.function(lambda f: model(f, training=False), reduce_retracing=True)
    for features, y, w in data.make_dataset(schema, split, batch_size):
        out = predict(features)
        for t in outputs:
            preds[t].append(out[t].numpy())
        for name in schema.label_names:
            labels[name].append(y[name].numpy())
        weights.append(w.numpy())
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}  # noqa: E731
    return cat(preds), cat(labels), np.concatenate(weights)


def derived_eval(model) -> dict:
    """{output: (label, condition label)} of derived outputs a model reports (ESMM's cvr on clicks)."""
    return dict(getattr(model, "derived_eval", {}))


def eval_metrics(model, preds: dict, labels: dict, weights, train_cfg: config_lib.TrainConfig | None = None) -> dict:
    """Per task, over the whole split: AUC, logloss, calibration, examples, positive rate.

    A task trained under ``train.task_condition`` (e.g. conversion on clicks) also reports
    ``given_<condition>``: the same metrics on the examples where the condition label is 1; a
    derived output (ESMM's ``cvr``) reports ``<output>_given_<condition>`` under its label.
    """
    train_cfg = train_cfg or config_lib.TrainConfig()
    weights = np.asarray(weights)
    results = {t: metrics.binary_report(labels[t], preds[t], weights) for t in model.tasks}

    def subset(label, scores, cond):
        m = labels[cond] > 0.5
        return metrics.binary_report(labels[label][m], scores[m], weights[m])

    for t, cond in train_cfg.task_condition.items():
        if t in results:
            results[t][f"given_{cond}"] = subset(t, preds[t], cond)
    for out, (label, cond) in derived_eval(model).items():
        results[label][f"{out}_given_{cond}"] = subset(label, preds[out], cond)
    return results


def evaluate(model, schema: Schema, batch_size: int, train_cfg: config_lib.TrainConfig | None = None) -> dict:
    """Per-task AUC, logloss and calibration on the eval split (see ``eval_metrics``)."""
    preds, labels, weights = predict_split(model, schema, "eval", batch_size,
                                           model.tasks + tuple(derived_eval(model)))
    return eval_metrics(model, preds, labels, weights, train_cfg)


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class ProgressLog(keras.callbacks.Callback):
    """Appends start/epoch/end records with the optimizer step to ``progress.jsonl``.

    Placed after ``BackupAndRestore``, the start record shows the step a resumed run continues from.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        step = self._step()
        if step:
            print(f"train: resuming from the checkpoint at step {step}", flush=True)
        _append_jsonl(self.path, {"event": "start", "step": step, "time": time.time()})

    def on_epoch_end(self, epoch, logs=None):
        _append_jsonl(self.path, {"event": "epoch", "epoch": epoch + 1, "step": self._step(),
                                  **{k: float(v) for k, v in (logs or {}).items()}})

    def on_train_end(self, logs=None):
        _append_jsonl(self.path, {"event": "end", "step": self._step(), "time": time.time()})


def val_logloss(logs: dict, tasks, loss_weights: dict) -> float:
    """Eval log loss summed over tasks with their loss weights, from Keras' epoch logs."""
    if len(tasks) == 1 and "val_logloss" in logs:
        return float(logs["val_logloss"]) * loss_weights.get(tasks[0], 1.0)
    return float(sum(loss_weights.get(t, 1.0) * logs[f"val_{t}_logloss"] for t in tasks))


class LoglossPatience:
    """The early-stopping rule on the eval log loss, with its counters kept in ``best_dir/state.json``.

    Shared by ``EarlyStoppingOnLogloss`` (one process) and ``trainer.distributed`` (the chief of a
    PS cluster), so both stop and restore the same epoch; the state file survives a kill, so a
    resumed run continues the same rule. The caller saves the weights when ``update`` says improved.
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
        """Records epoch ``epoch`` (1-based) with eval logloss ``value``; returns whether it is the best."""
        s = self.state
        s["last_epoch"] = epoch
        improved = value < s["best"] - self.min_delta
        if improved:
            s.update(best=value, best_epoch=epoch, wait=0)
        else:
            s["wait"] += 1
        os.makedirs(self.best_dir, exist_ok=True)
        tmp = self.state_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(s, f)
        os.replace(tmp, self.state_file)
        return improved

    def restore_best(self, model, last_epoch: int) -> None:
        """Loads the best epoch's weights into ``model`` if a later epoch was worse."""
        s = self.state
        if s["best_epoch"] and s["best_epoch"] != last_epoch:
            tf.train.Checkpoint(model=model).read(self.weights_path).expect_partial()
            print(f"train: restored the best epoch {s['best_epoch']} (eval logloss {s['best']:.5f}; "
                  f"stopped after epoch {last_epoch})", flush=True)


class EarlyStoppingOnLogloss(keras.callbacks.Callback):
    """Stops when the eval log loss has not improved for ``patience`` epochs and restores the best
    epoch's weights at the end. Kill-safe: the best weights and counters live in ``best_dir``."""

    def __init__(self, best_dir: str, tasks, loss_weights: dict, patience: int, min_delta: float = 0.0):
        super().__init__()
        self.tasks = tuple(tasks)
        self.loss_weights = dict(loss_weights)
        self.rule = LoglossPatience(best_dir, patience, min_delta)

    @property
    def state(self) -> dict:
        """The rule's counters: best, best_epoch, wait, last_epoch."""
        return self.rule.state

    def on_epoch_end(self, epoch, logs=None):
        if self.rule.update(epoch + 1, val_logloss(logs or {}, self.tasks, self.loss_weights)):
            tf.train.Checkpoint(model=self.model).write(self.rule.weights_path)
        if self.rule.stopped:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.rule.restore_best(self.model, self.rule.state["last_epoch"])


def _has_backup(backup_dir: str) -> bool:
    return any(tf.train.latest_checkpoint(os.path.join(backup_dir, d))
               for d in (tf.io.gfile.listdir(backup_dir) if tf.io.gfile.isdir(backup_dir) else []))


def train(cfg: config_lib.ExperimentConfig) -> dict:
    """Runs one training job (resuming from ``run_dir/backup`` after a kill); returns the eval metrics."""
    keras.utils.set_random_seed(cfg.train.seed)
    schema = load_schema(cfg.data.path)
    os.makedirs(cfg.run_dir, exist_ok=True)
    config_lib.save(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    backup_dir = os.path.join(cfg.run_dir, BACKUP_DIR)
    best_dir = os.path.join(cfg.run_dir, BEST_DIR)
    if not _has_backup(backup_dir):  # a fresh run: forget the best epoch of an earlier one
        tf.io.gfile.rmtree(best_dir) if tf.io.gfile.exists(best_dir) else None
    # Built before fit so that BackupAndRestore can restore into existing variables.
    model = init_model(build_and_compile(cfg, schema), schema)
    if cfg.train.warm_start and not _has_backup(backup_dir):  # a resumed run continues from its backup
        from trainer.warm_start import warm_start

        print("train: " + warm_start(model, schema, cfg.train.warm_start).summary(), flush=True)
    examples = schema.splits.get("train", {}).get("examples")
    steps = cfg.train.steps_per_epoch or (math.ceil(examples / cfg.data.batch_size) if examples else None)
    # Repeated with a fixed number of steps per epoch, so a resumed epoch runs only its remaining steps.
    train_ds = _select(data.make_dataset(schema, "train", cfg.data.batch_size, cfg.data.shuffle_buffer,
                                         cfg.train.seed, cfg.data.cache, cfg.data.num_parallel_reads,
                                         repeat=steps is not None, deterministic=cfg.data.deterministic),
                       model.tasks, cfg.train, training=True)
    eval_ds = _select(data.make_dataset(schema, "eval", cfg.data.eval_batch_size), model.tasks, cfg.train,
                      training=False)
    callbacks = [
        keras.callbacks.BackupAndRestore(backup_dir, save_freq=cfg.train.checkpoint_every_steps,
                                         delete_checkpoint=True),
        ProgressLog(os.path.join(cfg.run_dir, PROGRESS_FILE)),
        keras.callbacks.TensorBoard(os.path.join(cfg.run_dir, "tensorboard"), update_freq="epoch",
                                    profile_batch=0),
    ]
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStoppingOnLogloss(best_dir, model.tasks, cfg.train.loss_weights,
                                                cfg.train.early_stopping_patience,
                                                cfg.train.early_stopping_min_delta))
    start = time.time()
    model.fit(train_ds, validation_data=eval_ds, epochs=cfg.train.epochs, steps_per_epoch=steps,
              callbacks=callbacks, verbose=cfg.train.verbose)
    elapsed = time.time() - start
    tf.train.Checkpoint(model=model).write(os.path.join(cfg.run_dir, WEIGHTS_DIR, "weights"))
    preds, labels, weights = predict_split(model, schema, "eval", cfg.data.eval_batch_size,
                                           model.tasks + tuple(derived_eval(model)))
    results = eval_metrics(model, preds, labels, weights, cfg.train)
    with open(os.path.join(cfg.run_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    if cfg.train.report:
        from trainer import report as report_lib  # matplotlib only when a report is wanted

        report_lib.write_report(cfg.run_dir, {t: preds[t] for t in model.tasks}, labels, weights)
    for t, r in results.items():
        print(f"train: {cfg.model.name} {t}: eval AUC {r['auc']:.4f} logloss {r['logloss']:.4f} "
              f"calibration {r['calibration']:.3f} ({r['examples']} examples, {elapsed:.1f}s training)")
    return results


def load_trained(run_dir: str):
    """Rebuilds the model of a finished run (config, schema, final weights)."""
    cfg = config_lib.load(os.path.join(run_dir, "config.yaml"))
    schema = load_schema(cfg.data.path)
    model = init_model(build_model(cfg.model, schema), schema)
    tf.train.Checkpoint(model=model).read(os.path.join(run_dir, WEIGHTS_DIR, "weights")).expect_partial()
    return cfg, schema, model


def _help_epilog() -> str:
    from trainer import experiments  # noqa: F401

    lines = ["models:"] + [f"  {name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}"
                           for name, cls in sorted(MODELS.items())]
    lines += ["experiments:"] + [f"  {name:24s} {(fn.__doc__ or '').strip().splitlines()[0]}"
                                 for name, fn in sorted(config_lib.EXPERIMENTS.items())]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Train a CTR/CVR model on ETL output.", epilog=_help_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="", help="named experiment (see below)")
    p.add_argument("--config", default="", help="YAML file of ExperimentConfig overrides")
    p.add_argument("--data", default="", help="ETL output directory (data.path)")
    p.add_argument("--model", default="", help="registered model name (model.name)")
    p.add_argument("--run_dir", default="", help="run directory")
    p.add_argument("--export_base", default="", help="TF Serving base path for exports")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return p.parse_args(argv)


def resolve_from_args(args) -> config_lib.ExperimentConfig:
    overrides = configs.parse_overrides(args.set)
    flat = {}
    if args.data:
        flat["data"] = {"path": args.data}
    if args.model:
        flat["model"] = {"name": args.model}
    if args.run_dir:
        flat["run_dir"] = args.run_dir
    if args.export_base:
        flat["export_base"] = args.export_base
    return config_lib.resolve(args.experiment, args.config, configs.deep_merge(overrides, flat))


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    train(resolve_from_args(args))


if __name__ == "__main__":
    main()
