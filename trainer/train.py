"""Trains a registered model on the ETL output and writes metrics, checkpoints and config.

    python -m trainer.train --data data/etl --model fm --run_dir runs/default \
        [--experiment NAME] [--config file.yaml] [--set model.embedding_dim=16 ...]

Writes into ``run_dir`` (names in ``trainer/run_files.py``): ``config.yaml`` (the resolved
config), ``backup/`` (kill-safe checkpoints every ``train.checkpoint_every_steps``: rerunning
the same command after a kill resumes at the checkpointed step), ``best/`` (the best epoch's
weights under early stopping), ``tensorboard/``, ``progress.jsonl`` (one line per
start/epoch/end with the optimizer step), ``history.json`` (per epoch: seconds, examples/s,
eval and valid metrics; ``trainer/epochs.py``), ``model/`` (final weights for the exporter),
``metrics.json`` (per task: AUC, logloss, calibration on the eval split),
``metrics_valid.json`` (the same on the valid split, when the schema has one) and
``report/`` (``trainer.report``).

The pieces both loops share live here and in ``trainer.epochs`` / ``trainer.evaluation``:
``trainer.distributed`` (parameter servers) builds the model with ``build_and_compile``,
reads ``train_dataset``, ends every epoch with ``epochs.EpochRecorder`` and finishes with
``finish_run``, exactly as ``train`` does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from trainer import quiet

if __name__ == "__main__":  # the command: TensorFlow's noise is filtered from its first import on
    quiet.filter_stderr()

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from feature_schema import Schema, configs, load_schema  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer import data, experiments, run_files  # noqa: E402
from trainer.epochs import EpochRecorder  # noqa: E402
# Evaluation lives in trainer.evaluation; these names stay importable from here for their callers.
from trainer.evaluation import (derived_eval, eval_metrics, evaluate, init_model,  # noqa: E402,F401
                                load_trained, predict_split)
from trainer.metrics import LogLoss, binary_crossentropy  # noqa: E402
from trainer.models import MODELS, build_model  # noqa: E402,F401
from trainer.run_files import BACKUP_DIR, BEST_DIR, PROGRESS_FILE, WEIGHTS_DIR  # noqa: E402,F401

quiet.quiet_tf_logging()


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


def build_and_compile(cfg: config_lib.ExperimentConfig, schema: Schema):
    model = build_model(cfg.model, schema)
    check_task_settings(cfg, model.tasks, schema)
    model.compile(optimizer=make_optimizer(cfg.optimizer, cfg.data.batch_size),
                  loss={t: binary_crossentropy for t in model.tasks},
                  loss_weights={t: cfg.train.loss_weights.get(t, 1.0) for t in model.tasks},
                  weighted_metrics={t: [keras.metrics.AUC(name="auc"), LogLoss()] for t in model.tasks},
                  steps_per_execution=cfg.train.steps_per_execution, jit_compile=cfg.train.jit_compile)
    return model


def set_determinism(train_cfg: config_lib.TrainConfig) -> None:
    """Seeds Python, NumPy and TensorFlow with ``train.seed`` and sets ``train.op_determinism``.

    With op determinism TensorFlow runs only kernels whose results do not depend on thread
    scheduling, so the same command gives the same metrics on a loaded machine (docs/TRAINER.md).
    """
    keras.utils.set_random_seed(train_cfg.seed)
    if train_cfg.op_determinism:
        tf.config.experimental.enable_op_determinism()
    else:  # the setting is per process: an earlier run in it (a tuner trial) may have enabled it
        from tensorflow.python.framework import config as tf_config  # no public switch-off

        tf_config.disable_op_determinism()


def steps_per_epoch(cfg: config_lib.ExperimentConfig, schema: Schema) -> int | None:
    """``train.steps_per_epoch``, else one pass over the train split (None when its size is unknown)."""
    examples = schema.splits.get("train", {}).get("examples")
    return cfg.train.steps_per_epoch or (math.ceil(examples / cfg.data.batch_size) if examples else None)


def train_dataset(cfg: config_lib.ExperimentConfig, schema: Schema, tasks, repeat: bool,
                  files: list[str] | None = None, seed: int | None = None):
    """The Keras training input: (features, labels, per-task weights with ``pos_weight`` and ``task_condition``).

    Args:
      repeat: repeat the split (step-based epochs).
      files: a worker's TFRecord shards instead of the whole split (parameter servers).
      seed: the shuffle seed (default ``train.seed``).
    """
    once = featurizes_once(cfg, schema, files)
    start = time.perf_counter()
    ds = data.make_dataset(schema, "train", cfg.data.batch_size, cfg.data.shuffle_buffer,
                           cfg.train.seed if seed is None else seed, cfg.data.cache, cfg.data.num_parallel_reads,
                           repeat=repeat, files=files, deterministic=cfg.data.deterministic,
                           dense_ids=cfg.data.dense_ids, featurize_once=once)
    if once and cfg.train.verbose:  # its cost is paid here, before the first epoch's clock starts
        print(f"train: train split featurized once, held in memory ({data.featurized_bytes(schema, 'train') or 0:,} "
              f"bytes; {time.perf_counter() - start:.1f}s)", flush=True)
    return _select(ds, tasks, cfg.train, training=True)


def featurizes_once(cfg: config_lib.ExperimentConfig, schema: Schema, files: list[str] | None = None) -> bool:
    """``data.featurize_once`` resolved: auto (None) holds the train split in memory when it qualifies and
    fits ``data.featurize_once_max_bytes``; never for a worker's shard (``files``), whose dataset a
    parameter-server cluster builds in a graph."""
    once = cfg.data.featurize_once
    if once is None:
        return files is None and data.featurize_once_fits(schema, "train", cfg.data.featurize_once_max_bytes)
    return once


def keras_verbosity(train_cfg: config_lib.TrainConfig) -> int:
    """Keras' progress bar only when asked (``train.verbose=1``) and stdout is a terminal.

    Otherwise ``EpochRecorder`` prints the one line per epoch (a log file gets no progress bar).
    """
    return 1 if train_cfg.verbose == 1 and sys.stdout.isatty() else 0


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


class EpochEnd(keras.callbacks.Callback):
    """Runs ``epochs.EpochRecorder`` at the end of every Keras epoch and stops when it says so.

    Adds the selection split's metrics to Keras' epoch logs (``val_<task>_auc``,
    ``val_<task>_logloss``) for the callbacks after it (progress.jsonl, TensorBoard). Under a
    progress bar (``progress_bar``), which Keras finishes after every other callback, the epoch's
    line is printed when the next epoch begins, so that it follows the bar instead of splitting it.
    """

    def __init__(self, recorder: EpochRecorder, progress_bar: bool = False):
        super().__init__()
        self.recorder = recorder
        self.progress_bar = progress_bar
        self._start, self._step, self._pending = 0.0, 0, ""

    def _steps(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def _flush(self) -> None:
        if self._pending:
            print(self._pending, flush=True)
            self._pending = ""

    def on_train_begin(self, logs=None):
        self.recorder.begin()

    def on_epoch_begin(self, epoch, logs=None):
        self._flush()
        self._start, self._step = time.time(), self._steps()

    def on_epoch_end(self, epoch, logs=None):
        entry = self.recorder.epoch_end(epoch + 1, self._steps() - self._step, time.time() - self._start, logs,
                                        echo=not self.progress_bar)
        if self.progress_bar and self.recorder.cfg.train.verbose:
            self._pending = self.recorder.line(entry)
        if logs is not None:
            for task, m in entry[self.recorder.select].items():
                logs.update({f"val_{task}_auc": m["auc"], f"val_{task}_logloss": m["logloss"]})
        if entry["stop"]:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self._flush()
        last = self.recorder.entries[-1]["epoch"] if self.recorder.entries else 0
        self.recorder.end(last)


def _has_backup(backup_dir: str) -> bool:
    return any(tf.train.latest_checkpoint(os.path.join(backup_dir, d))
               for d in (tf.io.gfile.listdir(backup_dir) if tf.io.gfile.isdir(backup_dir) else []))


def start_run(cfg: config_lib.ExperimentConfig, resumed: bool) -> Schema:
    """Seeds, loads the schema and writes ``config.yaml``; a fresh run forgets an earlier run's
    early-stopping state and history in the same directory."""
    set_determinism(cfg.train)
    schema = load_schema(cfg.data.path)
    os.makedirs(cfg.run_dir, exist_ok=True)
    config_lib.save(cfg, os.path.join(cfg.run_dir, run_files.CONFIG_FILE))
    if not resumed:
        best_dir = os.path.join(cfg.run_dir, BEST_DIR)
        if tf.io.gfile.exists(best_dir):
            tf.io.gfile.rmtree(best_dir)
        history = os.path.join(cfg.run_dir, run_files.HISTORY_FILE)
        if os.path.exists(history):
            os.remove(history)
    return schema


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def finish_run(cfg: config_lib.ExperimentConfig, schema: Schema, model, seconds: float, what: str = "") -> dict:
    """Saves the final weights, writes metrics.json (eval), metrics_valid.json (valid, when the
    schema has it) and the report, prints the eval metrics; returns them.

    Args:
      model: an ordinary (single-process) model holding the final, or restored best, weights.
      seconds: training time, for the printed line.
      what: the model's description in the printed line (default ``model.name``).
    """
    tf.train.Checkpoint(model=model).write(run_files.weights_prefix(cfg.run_dir))
    preds, labels, weights = predict_split(model, schema, "eval", cfg.data.eval_batch_size,
                                           model.tasks + tuple(derived_eval(model)))
    results = eval_metrics(model, preds, labels, weights, cfg.train)
    _write_json(os.path.join(cfg.run_dir, run_files.METRICS_FILE), results)
    if "valid" in schema.splits:
        _write_json(os.path.join(cfg.run_dir, run_files.VALID_METRICS_FILE),
                    evaluate(model, schema, cfg.data.eval_batch_size, cfg.train, "valid"))
    if cfg.train.report:
        from trainer import report as report_lib  # matplotlib only when a report is wanted

        report_lib.write_report(cfg.run_dir, {t: preds[t] for t in model.tasks}, labels, weights)
    for t, r in results.items():
        print(f"train: {what or cfg.model.name} {t}: eval AUC {r['auc']:.4f} logloss {r['logloss']:.4f} "
              f"calibration {r['calibration']:.3f} ({r['examples']} examples, {seconds:.1f}s training)", flush=True)
    return results


def train(cfg: config_lib.ExperimentConfig) -> dict:
    """Runs one training job (resuming from ``run_dir/backup`` after a kill); returns the eval metrics."""
    backup_dir = os.path.join(cfg.run_dir, BACKUP_DIR)
    resumed = _has_backup(backup_dir)
    schema = start_run(cfg, resumed)
    # Built before fit so that BackupAndRestore can restore into existing variables.
    model = init_model(build_and_compile(cfg, schema), schema)
    if cfg.train.warm_start and not resumed:  # a resumed run continues from its backup
        from trainer.warm_start import warm_start

        print("train: " + warm_start(model, schema, cfg.train.warm_start).summary(), flush=True)
    steps = steps_per_epoch(cfg, schema)
    # Repeated with a fixed number of steps per epoch, so a resumed epoch runs only its remaining steps.
    train_ds = train_dataset(cfg, schema, model.tasks, repeat=steps is not None)
    recorder = EpochRecorder(cfg, schema, model, resumed)
    verbosity = keras_verbosity(cfg.train)
    callbacks = [
        keras.callbacks.BackupAndRestore(backup_dir, save_freq=cfg.train.checkpoint_every_steps,
                                         delete_checkpoint=True),
        EpochEnd(recorder, progress_bar=verbosity == 1),  # before the callbacks reading what it logs
        ProgressLog(os.path.join(cfg.run_dir, PROGRESS_FILE)),
        keras.callbacks.TensorBoard(os.path.join(cfg.run_dir, run_files.TENSORBOARD_DIR), update_freq="epoch",
                                    profile_batch=0),
    ]
    start = time.time()
    if not recorder.stopped:  # a run killed after early stopping decided has nothing left to train
        model.fit(train_ds, epochs=cfg.train.epochs, steps_per_epoch=steps, callbacks=callbacks,
                  verbose=verbosity)
    return finish_run(cfg, schema, model, time.time() - start)


def _help_epilog() -> str:
    lines = ["models:"] + [f"  {name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}"
                           for name, cls in sorted(MODELS.items())]
    lines += ["experiments:"] + [f"  {name:24s} {(fn.__doc__ or '').strip().splitlines()[0]}"
                                 for name, fn in sorted(experiments.EXPERIMENTS.items())]
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
