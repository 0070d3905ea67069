"""Trains a registered model on the ETL output and writes metrics, checkpoints and config.

    python -m trainer.train --data data/etl --model fm --run_dir runs/default \
        [--experiment NAME] [--config file.yaml] [--set model.embedding_dim=16 ...]

Writes into ``run_dir``: ``config.yaml`` (the resolved config), ``backup/``
(kill-safe checkpoints every ``train.checkpoint_every_steps``: rerunning the
same command after a kill resumes there), ``tensorboard/``, ``model/`` (final
weights for the exporter) and ``metrics.json`` (per task: AUC, logloss,
calibration on the eval split).
"""
from __future__ import annotations

import argparse
import json
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
        return keras.optimizers.Ftrl(lr)
    return keras.optimizers.SGD(lr)


def _select(ds, tasks):
    """(features, labels, weights) -> Keras (x, y, sample_weight) for the model's tasks."""
    return ds.map(lambda f, y, w: (f, {t: y[t] for t in tasks}, {t: w for t in tasks}))


def binary_crossentropy(y_true, y_pred):
    """Per-example log loss of [batch] labels and probabilities (Keras' version reduces the last axis)."""
    return keras.backend.binary_crossentropy(tf.reshape(tf.cast(y_true, y_pred.dtype), [-1]),
                                             tf.reshape(y_pred, [-1]))


def build_and_compile(cfg: config_lib.ExperimentConfig, schema: Schema):
    model = build_model(cfg.model, schema)
    model.compile(optimizer=make_optimizer(cfg.optimizer, cfg.data.batch_size),
                  loss={t: binary_crossentropy for t in model.tasks},
                  weighted_metrics={t: [keras.metrics.AUC(name="auc")] for t in model.tasks})
    return model


def init_model(model, schema: Schema):
    """Creates the model's variables by calling it on one eval batch."""
    features, _, _ = next(iter(data.make_dataset(schema, "eval", 2)))
    model(features)
    return model


def predict_split(model, schema: Schema, split: str, batch_size: int):
    """Predictions, labels and weights of a whole split, in file order."""
    preds = {t: [] for t in model.tasks}
    labels = {name: [] for name in schema.label_names}
    weights = []
    predict = tf.function(lambda f: model(f, training=False))
    for features, y, w in data.make_dataset(schema, split, batch_size):
        out = predict(features)
        for t in model.tasks:
            preds[t].append(out[t].numpy())
        for name in schema.label_names:
            labels[name].append(y[name].numpy())
        weights.append(w.numpy())
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}  # noqa: E731
    return cat(preds), cat(labels), np.concatenate(weights)


def evaluate(model, schema: Schema, batch_size: int) -> dict:
    """Per-task AUC, logloss and calibration on the eval split."""
    preds, labels, weights = predict_split(model, schema, "eval", batch_size)
    return {t: metrics.binary_report(labels[t], preds[t], weights) for t in model.tasks}


def train(cfg: config_lib.ExperimentConfig) -> dict:
    """Runs one training job; returns the eval metrics."""
    keras.utils.set_random_seed(cfg.train.seed)
    schema = load_schema(cfg.data.path)
    os.makedirs(cfg.run_dir, exist_ok=True)
    config_lib.save(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    model = build_and_compile(cfg, schema)
    train_ds = _select(data.make_dataset(schema, "train", cfg.data.batch_size, cfg.data.shuffle_buffer,
                                         cfg.train.seed, cfg.data.cache, cfg.data.num_parallel_reads),
                       model.tasks)
    eval_ds = _select(data.make_dataset(schema, "eval", cfg.data.eval_batch_size), model.tasks)
    callbacks = [
        keras.callbacks.BackupAndRestore(os.path.join(cfg.run_dir, "backup"),
                                         save_freq=cfg.train.checkpoint_every_steps, delete_checkpoint=True),
        keras.callbacks.TensorBoard(os.path.join(cfg.run_dir, "tensorboard"), update_freq="epoch"),
    ]
    start = time.time()
    model.fit(train_ds, validation_data=eval_ds, epochs=cfg.train.epochs, callbacks=callbacks,
              verbose=cfg.train.verbose)
    elapsed = time.time() - start
    tf.train.Checkpoint(model=model).write(os.path.join(cfg.run_dir, WEIGHTS_DIR, "weights"))
    results = evaluate(model, schema, cfg.data.eval_batch_size)
    with open(os.path.join(cfg.run_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
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
