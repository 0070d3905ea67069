"""Evaluation of a model on a whole split: predictions, per-task metrics, the selection logloss.

Shared by the single-process loop, the parameter-server chief (which evaluates its ordinary
copy of the model), the tuner and ``trainer.report``. Metrics are the NumPy ones of
``feature_schema.metrics`` over every example of the split (exact AUC, not Keras' binned one).
"""
from __future__ import annotations

import dataclasses
import os
import weakref

import numpy as np
import tensorflow as tf

from feature_schema import Schema, load_schema
from feature_schema import metrics
from trainer import config as config_lib
from trainer import data, run_files
from trainer.models import build_model

# One prediction function per model: a fresh tf.function per call would retrace every epoch.
_PREDICT_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def selection_split(schema: Schema) -> str:
    """The split that selects (early stopping, tuning): ``valid`` when the schema has it, else ``eval``."""
    return "valid" if "valid" in schema.splits else "eval"


def init_model(model, schema: Schema):
    """Creates the model's variables by calling it on one eval batch."""
    features, _, _ = next(iter(data.make_dataset(schema, "eval", 2)))
    model(features)
    return model


def load_trained(run_dir: str):
    """Rebuilds the model of a finished run (config, schema, final weights).

    The model is rebuilt in float32 whatever ``model.mlp_dtype`` it trained with: its weights are
    float32, and bfloat16 is a training speed setting. Served in bfloat16, the TF Serving graph and
    the in-process model round differently (Frappe DeepFM: up to 2.4e-3 apart, beyond the
    exporter's 1e-5 check).
    """
    cfg = config_lib.load(os.path.join(run_dir, run_files.CONFIG_FILE))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mlp_dtype="float32"))
    schema = load_schema(cfg.data.path)
    model = init_model(build_model(cfg.model, schema), schema)
    tf.train.Checkpoint(model=model).read(run_files.weights_prefix(run_dir)).expect_partial()
    return cfg, schema, model


def _predict_fn(model):
    fn = _PREDICT_FNS.get(model)
    if fn is None:
        fn = _PREDICT_FNS[model] = tf.function(lambda f: model(f, training=False), reduce_retracing=True)
    return fn


def predict_split(model, schema: Schema, split: str, batch_size: int, outputs=None, dataset=None):
    """Predictions, labels and weights of a whole split, in file order.

    Args:
      outputs: model outputs to collect (default: the tasks).
      dataset: the split's ``data.make_dataset`` (e.g. one cached across epochs); default: a new one.

    Returns:
      ({output: probs [n]}, {label: 0/1 [n]}, weights [n]).
    """
    outputs = tuple(outputs or model.tasks)
    preds = {t: [] for t in outputs}
    labels = {name: [] for name in schema.label_names}
    weights = []
    predict = _predict_fn(model)
    if dataset is None:
        dataset = data.make_dataset(schema, split, batch_size)
    for features, y, w in dataset:
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


def evaluate(model, schema: Schema, batch_size: int, train_cfg: config_lib.TrainConfig | None = None,
             split: str = "eval", dataset=None) -> dict:
    """Per-task metrics of ``model`` on ``split`` (see ``eval_metrics``; ``dataset`` as in ``predict_split``)."""
    preds, labels, weights = predict_split(model, schema, split, batch_size,
                                           model.tasks + tuple(derived_eval(model)), dataset)
    return eval_metrics(model, preds, labels, weights, train_cfg)


def selection_logloss(results: dict, tasks, train_cfg: config_lib.TrainConfig) -> float:
    """The logloss that selects epochs and trials: summed over tasks with ``train.loss_weights``.

    Each task counts on the examples it trains on: a task under ``train.task_condition`` on the
    examples where its condition label is 1 (its ``given_<condition>`` entry).
    """
    total = 0.0
    for t in tasks:
        cond = train_cfg.task_condition.get(t)
        r = results[t][f"given_{cond}"] if cond else results[t]
        total += train_cfg.loss_weights.get(t, 1.0) * r["logloss"]
    return float(total)
