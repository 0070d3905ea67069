"""Ranking models: short compositions of ``trainer.layers``, registered by name.

A model maps the sparse features of a batch to ``{task name: probability [batch]}``.
Task names are label names from the schema, so a model trains on whatever binary
labels the ETL wrote.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf
import tf_keras as keras

from feature_schema import Schema
from trainer import layers
from trainer.config import ModelConfig

MODELS: dict[str, Callable] = {}


def register_model(name: str, multi_task: bool = False):
    """Class decorator adding a model to the registry under ``name``."""
    def deco(cls):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        cls.registered_name = name
        cls.multi_task = multi_task
        MODELS[name] = cls
        return cls
    return deco


def resolve_tasks(cfg: ModelConfig, schema: Schema, multi_task: bool) -> tuple[str, ...]:
    """Task (label) names of a model: configured, else first label or all labels."""
    tasks = tuple(cfg.tasks) or (schema.label_names if multi_task else schema.label_names[:1])
    unknown = [t for t in tasks if t not in schema.label_names]
    if unknown:
        raise ValueError(f"tasks {unknown} are not labels of the schema {list(schema.label_names)}")
    if not multi_task and len(tasks) != 1:
        raise ValueError(f"model {cfg.name!r} is single-task; got tasks {list(tasks)}")
    return tasks


def build_model(cfg: ModelConfig, schema: Schema) -> keras.Model:
    """Instantiates the registered model ``cfg.name`` sized from ``schema``."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; registered: {sorted(MODELS)}")
    cls = MODELS[cfg.name]
    return cls(cfg, schema, resolve_tasks(cfg, schema, cls.multi_task))


class RankingModel(keras.Model):
    """Base class: holds the config, schema sizes and task names."""

    def __init__(self, cfg: ModelConfig, schema: Schema, tasks: tuple[str, ...], **kwargs):
        super().__init__(name=cfg.name, **kwargs)
        self.cfg = cfg
        self.tasks = tasks
        self.num_features = schema.num_features
        self.num_fields = schema.num_fields
        self.linear_only_fields = schema.linear_only_field_ids

    @property
    def serving_outputs(self) -> tuple[str, ...]:
        """Output keys the exporter serves: the tasks, plus derived outputs a model may add (e.g. ctcvr)."""
        return self.tasks

    def _single(self, logit):
        return {self.tasks[0]: tf.sigmoid(tf.squeeze(logit, axis=1))}


@register_model("lr")
class LogisticRegression(RankingModel):
    """LR: ``sigmoid(w0 + sum_i w_i x_i)``."""

    def __init__(self, cfg, schema, tasks, **kwargs):
        super().__init__(cfg, schema, tasks, **kwargs)
        self.linear = layers.Linear(self.num_features, l2=cfg.l2_linear)

    def call(self, features, training=False):
        return self._single(self.linear(features))


@register_model("fm")
class FactorizationMachine(RankingModel):
    """FM: linear term + FM interaction (position-like linear-only fields get no crosses)."""

    def __init__(self, cfg, schema, tasks, **kwargs):
        super().__init__(cfg, schema, tasks, **kwargs)
        self.linear = layers.Linear(self.num_features, l2=cfg.l2_linear)
        self.fm = layers.FMInteraction(self.num_features, cfg.embedding_dim, self.linear_only_fields,
                                       l2=cfg.l2_embedding, init_stddev=cfg.init_stddev)

    def call(self, features, training=False):
        return self._single(self.linear(features) + self.fm(features))


@register_model("ffm")
class FieldAwareFM(RankingModel):
    """FFM: ``w0 + sum_i w_i x_i + sum_{i<j} <v_{i,f_j}, v_{j,f_i}> x_i x_j`` (linear-only fields: no crosses)."""

    def __init__(self, cfg, schema, tasks, **kwargs):
        super().__init__(cfg, schema, tasks, **kwargs)
        self.linear = layers.Linear(self.num_features, l2=cfg.l2_linear)
        self.ffm = layers.FFMInteraction(self.num_features, self.num_fields, cfg.embedding_dim,
                                         self.linear_only_fields, normalize=cfg.normalize, l2=cfg.l2_embedding,
                                         init=cfg.embedding_init, init_stddev=cfg.init_stddev)

    def call(self, features, training=False):
        return self._single(self.linear(features) + self.ffm(features))
