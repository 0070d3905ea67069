"""Ranking models: short compositions of ``trainer.layers``, registered by name.

A model maps the sparse features of a batch to ``{output name: probability [batch]}``. The
outputs always include one per task; task names are label names from the schema, so a model
trains on whatever binary labels the ETL wrote. Field choices in the config (``bias_fields``,
``wide_fields``, ``task_fields``) are field names resolved against the schema.

``base`` owns the registry and ``RankingModel``; every other module of the package registers its
models with ``register_model`` when this package imports it (so the registry imports no model and
no model module imports this package: no import cycle).
"""
from trainer.models.base import MODELS, RankingModel, build_model, register_model, resolve_tasks
from trainer.models.ranking import ESMM_OUTPUTS
from trainer.models import mlr, ranking, retrieval, sequence  # noqa: F401,I001  (registers every model)

__all__ = ["ESMM_OUTPUTS", "MODELS", "RankingModel", "build_model", "register_model", "resolve_tasks"]
