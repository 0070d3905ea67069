"""The model registry and ``RankingModel``, the base every registered model composes on.

A model maps the sparse features of a batch to ``{output name: probability [batch]}``. The
outputs always include one per task; task names are label names from the schema, so a model
trains on whatever binary labels the ETL wrote. Field choices in the config (``bias_fields``,
``wide_fields``, ``task_fields``) are field names resolved against the schema.
"""
from __future__ import annotations

import functools
from typing import Callable

import tensorflow as tf
import tf_keras as keras

from feature_schema import Schema, configs
from trainer import layers, weighting
from trainer.config import ModelConfig

MODELS: dict[str, Callable] = {}


def register_model(name: str, multi_task: bool = False):
    """Class decorator adding a model to the registry under ``name``.

    Args:
      name: the ``model.name`` that selects it.
      multi_task: without ``model.tasks`` the model predicts every label of the schema
        (else only the first one).
    """
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
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks {list(tasks)} repeat a label")
    return tasks


def build_model(cfg: ModelConfig, schema: Schema) -> keras.Model:
    """Instantiates the registered model ``cfg.name`` sized from ``schema``."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; registered: {sorted(MODELS)}")
    cls = MODELS[cfg.name]
    return cls(cfg, schema, resolve_tasks(cfg, schema, cls.multi_task))


class RankingModel(keras.Model):
    """Base class: holds the config, schema sizes, task names and resolved field sets.

    With ``model.loss_weighting=uncertainty`` its ``compute_loss`` (run by Keras' own ``train_step``
    and ``test_step``) weighs the task losses with learned log-variances (``trainer.weighting``);
    Keras' ``loss`` then reports that objective and ``<task>_loss_weight`` each ``exp(-s_t)``.
    """

    def __init__(self, cfg: ModelConfig, schema: Schema, tasks: tuple[str, ...], **kwargs):
        super().__init__(name=cfg.name, **kwargs)
        self.cfg = cfg
        self.schema = schema
        self.tasks = tuple(tasks)
        self.num_features = schema.num_features
        self.num_fields = schema.num_fields
        self.linear_only_fields = schema.linear_only_field_ids
        for key, names in (("task_fields", cfg.task_fields), ("bias_tasks", cfg.bias_tasks or ())):
            for t in names:
                if t not in self.tasks:
                    raise ValueError(f"model.{key} names {t!r}, not a task of {list(self.tasks)}")
        self.bias_fields = self.field_ids(cfg.bias_fields) if cfg.bias_fields else self.linear_only_fields
        private = {f for names in cfg.task_fields.values() for f in self.field_ids(names)}
        # Fields every task's shared part sees: no position-like bias, no task-private field.
        self.shared_fields = tuple(f.id for f in schema.fields
                                   if f.id not in self.bias_fields and f.id not in private)
        self.numeric_fields = tuple(f.id for f in schema.fields if f.kind == "numeric")
        self.loss_weighting = None
        if cfg.loss_weighting == "uncertainty":
            if len(self.tasks) < 2:
                raise ValueError(f"model.loss_weighting=uncertainty weighs the losses of several tasks; model "
                                 f"{cfg.name!r} has tasks {list(self.tasks)}")
            self.loss_weighting = weighting.UncertaintyWeighting(self.tasks, name="loss_weighting")
            self.weighted_loss = keras.metrics.Mean(name="weighted_loss")

    @property
    def metrics(self):
        extra = [self.weighted_loss] if getattr(self, "loss_weighting", None) is not None else []
        return super().metrics + extra

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        """Keras' compiled loss, or with uncertainty weighting ``sum_t exp(-s_t) L_t + s_t / 2`` plus the
        regularisation terms (``L_t``: each task's compiled loss; ``trainer.weighting``)."""
        fixed = super().compute_loss(x, y, y_pred, sample_weight)  # also Keras' per-task loss metrics
        if self.loss_weighting is None or y is None:
            return fixed
        total = self.loss_weighting(weighting.task_losses(self.tasks, y, y_pred, sample_weight))
        if self.losses:
            total += tf.add_n(self.losses)
        self.weighted_loss.update_state(total, sample_weight=tf.shape(y_pred[self.tasks[0]])[0])
        # As Keras scales its compiled loss: gradients are summed over replicas.
        return total / tf.distribute.get_strategy().num_replicas_in_sync

    def compute_metrics(self, x, y, y_pred, sample_weight):
        out = super().compute_metrics(x, y, y_pred, sample_weight)
        if self.loss_weighting is not None:
            # Keras' "loss" tracks the compiled (fixed-weight) loss; report the optimised objective.
            out["loss"] = out.pop(self.weighted_loss.name)
            out.update({f"{t}_loss_weight": w for t, w in self.loss_weighting.task_weights().items()})
        return out

    def field_ids(self, names) -> tuple[int, ...]:
        """Field ids of field names (KeyError for a name not in the schema)."""
        return tuple(self.schema.field(n).id for n in names)

    def task_field_ids(self, task: str) -> tuple[int, ...]:
        return self.field_ids(self.cfg.task_fields.get(task, ()))

    @property
    def bias_tasks(self) -> tuple[str, ...]:
        """Tasks that see the position-bias fields (default: the first task, e.g. click)."""
        return self.tasks[:1] if self.cfg.bias_tasks is None else tuple(self.cfg.bias_tasks)

    @property
    def serving_outputs(self) -> tuple[str, ...]:
        """Output keys the exporter serves: the tasks, plus derived outputs a model may add (e.g. ctcvr)."""
        return self.tasks

    @property
    def derived_eval(self) -> dict[str, tuple[str, str]]:
        """Derived outputs to evaluate: {output: (label, condition label)} (metrics where the condition is 1)."""
        return {}

    def get_config(self):
        return {"model_config": configs.to_dict(self.cfg), "schema": self.schema.to_json_dict(),
                "tasks": list(self.tasks)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        schema = Schema.from_json_dict(config["schema"])
        return cls(configs.from_dict(ModelConfig, config["model_config"]), schema, tuple(config["tasks"]))

    def compile(self, *args, jit_compile=False, **kwargs):
        """Keras' ``compile``; ``jit_compile`` compiles the training step with XLA, not the eval step:
        that one runs once per epoch, and compiling it cost more than it saved (about 3 s on Frappe,
        for an eval pass no faster). Under a distribution strategy (``ParameterServerStrategy``: tables
        sharded across parameter servers) the step stays uncompiled."""
        super().compile(*args, jit_compile=False, **kwargs)
        xla = jit_compile and not tf.distribute.has_strategy()
        self.xla_train_step = (tf.function(functools.partial(keras.Model.train_step, self), jit_compile=True,
                                           reduce_retracing=True) if xla else None)

    def train_step(self, data):
        step = getattr(self, "xla_train_step", None)
        return step(data) if step is not None else super().train_step(data)

    def _single(self, logit):
        return {self.tasks[0]: tf.sigmoid(tf.squeeze(logit, axis=1))}

    def _embedding(self):
        """The field-wise pooled embedding table every deep model uses."""
        c = self.cfg
        return layers.FieldEmbedding(self.num_features, self.num_fields, c.embedding_dim, c.embedding_combiner,
                                     l2=c.l2_embedding, init_stddev=c.init_stddev, name="embedding")

    # Dropout seeds come from the global seed (train.seed via keras.utils.set_random_seed).
    def _mlp(self, units, name):
        c = self.cfg
        return layers.MLP(units, c.activation, c.dropout, c.l2_dense, compute_dtype=c.mlp_dtype, name=name)

    def _tower(self, name):
        c = self.cfg
        return layers.TaskTower(c.tower_units, c.activation, c.dropout, c.l2_dense, name=name)

    def _split_fields(self, fields, name):
        """(categorical/binned fields, FieldValues layer of the numeric ones or None) of a deep input."""
        cat = tuple(f for f in fields if f not in self.numeric_fields)
        num = tuple(f for f in fields if f in self.numeric_fields)
        return cat, (layers.FieldValues(num, name=name) if num else None)

    def _fields_of(self, emb, fields):
        """``emb[:, fields]`` (no copy when ``fields`` are all fields in order)."""
        return emb if tuple(fields) == tuple(range(self.num_fields)) else tf.gather(emb, list(fields), axis=1)

    def _deep_input(self, features, emb, cat_fields, values_layer):
        """Flattened embeddings of ``cat_fields`` (part 1) ++ dense values (part 2), ``[batch, d]``."""
        parts = []
        if cat_fields:
            e = self._fields_of(emb, cat_fields)
            parts.append(tf.reshape(e, [-1, len(cat_fields) * self.cfg.embedding_dim]))
        if values_layer is not None:
            parts.append(values_layer(features))
        if not parts:
            raise ValueError(f"model {self.cfg.name!r}: a deep part has no input field")
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]
