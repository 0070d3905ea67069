"""The ranking models: LR, FM, FFM, Wide&Deep, DeepFM and the multi-task shared-bottom family
(hard sharing, MMoE, ESMM), each a short composition of ``trainer.layers`` on ``RankingModel``."""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from trainer import layers
from trainer.models.base import RankingModel, register_model


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
                                         init=cfg.embedding_init, init_stddev=cfg.init_stddev,
                                         multi_hot_fields=[f.id for f in schema.fields if f.multi_hot])

    def call(self, features, training=False):
        return self._single(self.linear(features) + self.ffm(features))


@register_model("wide_deep")
class WideDeep(RankingModel):
    """Wide&Deep (search-ads layout): pooled field embeddings ++ dense values -> MLP, plus a wide linear
    part over the position-bias fields and ``wide_fields``."""

    def __init__(self, cfg, schema, tasks, **kwargs):
        super().__init__(cfg, schema, tasks, **kwargs)
        self.embedding = self._embedding()
        self.deep_fields, self.values = self._split_fields(self.shared_fields, "values")
        self.mlp = self._mlp(cfg.hidden_units, "mlp")
        self.deep_logit = keras.layers.Dense(1, name="deep_logit")
        wide = self.field_ids(cfg.wide_fields) if cfg.wide_fields else tuple(range(self.num_fields))
        self.wide = layers.Linear(self.num_features, l2=cfg.l2_linear,
                                  fields=sorted(set(wide) | set(self.bias_fields)), name="wide")

    def call(self, features, training=False):
        deep = self._deep_input(features, self.embedding(features), self.deep_fields, self.values)
        logit = self.deep_logit(self.mlp(deep, training=training)) + self.wide(features)
        return self._single(logit)


@register_model("deepfm")
class DeepFM(RankingModel):
    """DeepFM: linear term + FM over field embeddings + MLP over the same embeddings (shared)."""

    def __init__(self, cfg, schema, tasks, **kwargs):
        super().__init__(cfg, schema, tasks, **kwargs)
        self.embedding = self._embedding()
        self.linear = layers.Linear(self.num_features, l2=cfg.l2_linear)
        crossed = tuple(f for f in range(self.num_fields) if f not in self.linear_only_fields)
        self.deep_fields, self.values = self._split_fields(crossed, "values")
        self.fm = layers.FieldFMInteraction(name="fm")
        self.mlp = self._mlp(cfg.hidden_units, "mlp")
        self.deep_logit = keras.layers.Dense(1, name="deep_logit")

    def call(self, features, training=False):
        emb = self.embedding(features)
        fm = self.fm(self._fields_of(emb, self.deep_fields))
        deep = self.deep_logit(self.mlp(self._deep_input(features, emb, self.deep_fields, self.values),
                                        training=training))
        return self._single(self.linear(features) + fm + deep)


class _SharedBottomBase(RankingModel):
    """Shared embeddings; per task: a tower over a shared input, task-private fields and, for
    ``bias_tasks``, a wide term over the position-bias fields (which no other task sees)."""

    def _build_heads(self):
        cfg = self.cfg
        self.embedding = self._embedding()
        self.deep_fields, self.values = self._split_fields(self.shared_fields, "values")
        self.towers, self.private, self.bias = {}, {}, {}
        for t in self.tasks:
            self.towers[t] = self._tower(f"tower_{t}")
            own = self.task_field_ids(t)
            if own:
                self.private[t] = self._split_fields(own, f"values_{t}")
            if t in self.bias_tasks and self.bias_fields:
                self.bias[t] = layers.Linear(self.num_features, l2=cfg.l2_linear, fields=self.bias_fields,
                                             name=f"bias_{t}")

    def _tower_logit(self, t, shared, features, emb, training):
        x = shared
        if t in self.private:
            x = tf.concat([x, self._deep_input(features, emb, *self.private[t])], axis=1)
        logit = self.towers[t](x, training=training)
        if t in self.bias:
            logit = logit + self.bias[t](features)
        return logit


@register_model("mtl", multi_task=True)
class SharedBottom(_SharedBottomBase):
    """Hard-sharing multi-task: shared embeddings + bottom MLP, one tower per task (label)."""

    def __init__(self, cfg, schema, tasks, **kwargs):
        super().__init__(cfg, schema, tasks, **kwargs)
        self._build_heads()
        self.bottom = self._mlp(cfg.hidden_units, "bottom")

    def call(self, features, training=False):
        emb = self.embedding(features)
        shared = self.bottom(self._deep_input(features, emb, self.deep_fields, self.values), training=training)
        return {t: tf.sigmoid(tf.squeeze(self._tower_logit(t, shared, features, emb, training), axis=1))
                for t in self.tasks}


@register_model("mmoe", multi_task=True)
class MMoE(_SharedBottomBase):
    """MMoE (Ma et al., KDD 2018): shared embeddings feed ``num_experts`` expert MLPs; each task's softmax
    gate mixes them and its tower reads that mixture (position-bias and private fields as in ``mtl``)."""

    def __init__(self, cfg, schema, tasks, **kwargs):
        super().__init__(cfg, schema, tasks, **kwargs)
        self._build_heads()
        self.moe = layers.MixtureOfExperts(len(self.tasks), cfg.num_experts, cfg.expert_units, cfg.activation,
                                           cfg.dropout, cfg.l2_dense, name="moe")

    def call(self, features, training=False):
        emb = self.embedding(features)
        mixed = self.moe(self._deep_input(features, emb, self.deep_fields, self.values), training=training)
        return {t: tf.sigmoid(tf.squeeze(self._tower_logit(t, mixed[:, i], features, emb, training), axis=1))
                for i, t in enumerate(self.tasks)}


@register_model("esmm", multi_task=True)
class ESMM(_SharedBottomBase):
    """ESMM: pCTR and position-free pCVR towers on shared embeddings; pCTCVR = pCTR x pCVR, both trained
    on all impressions."""

    def __init__(self, cfg, schema, tasks, **kwargs):
        super().__init__(cfg, schema, tasks, **kwargs)
        if len(self.tasks) != 2:
            raise ValueError(f"esmm needs two tasks (click, then click-and-convert), got {list(self.tasks)}")
        if self.tasks[1] in self.bias_tasks:
            raise ValueError(f"esmm: the CVR tower ({self.tasks[1]!r}) must not see the position-bias fields")
        self._build_heads()
        self.bottoms = {t: self._mlp(cfg.hidden_units, f"bottom_{t}") for t in self.tasks}

    @property
    def serving_outputs(self) -> tuple[str, ...]:
        return self.tasks + tuple(o for o in ESMM_OUTPUTS if o not in self.tasks)

    @property
    def derived_eval(self) -> dict[str, tuple[str, str]]:
        # pCVR = P(conversion | click): its observable labels are the conversions of clicked impressions.
        return {"cvr": (self.tasks[1], self.tasks[0])}

    def call(self, features, training=False):
        emb = self.embedding(features)
        deep = self._deep_input(features, emb, self.deep_fields, self.values)
        ctr_task, ctcvr_task = self.tasks
        logits = {t: tf.squeeze(self._tower_logit(t, self.bottoms[t](deep, training=training), features, emb,
                                                  training), axis=1) for t in self.tasks}
        ctr = tf.sigmoid(logits[ctr_task])
        cvr = tf.sigmoid(logits[ctcvr_task])
        ctcvr = ctr * cvr
        return {ctr_task: ctr, ctcvr_task: ctcvr, "ctr": ctr, "cvr": cvr, "ctcvr": ctcvr}


# ESMM's derived outputs: pCTR, pCVR = P(conversion | click), pCTCVR = P(click and conversion).
ESMM_OUTPUTS = ("ctr", "cvr", "ctcvr")
