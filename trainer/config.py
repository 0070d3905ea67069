"""Typed trainer configuration: frozen dataclasses, named experiments, YAML and `--set` overrides.

Resolution order: dataclass defaults -> named experiment -> YAML file -> `--set key=value`
-> Make variables (DATA, MODEL, RUN_DIR, EXPORT_BASE). Unknown keys are errors. The
resolved config is written to ``<run_dir>/config.yaml`` and into every export.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import yaml

from feature_schema import configs


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline.

    Attributes:
      path: ETL output directory (holds schema.json).
      batch_size: training batch size.
      eval_batch_size: batch size for evaluation and prediction.
      shuffle_buffer: example-level shuffle buffer (0 disables shuffling).
      cache: cache parsed batches in memory after the first epoch.
      num_parallel_reads: TFRecord files read concurrently.
    """

    path: str = "data/etl"
    batch_size: int = 256
    eval_batch_size: int = 4096
    shuffle_buffer: int = 50_000
    cache: bool = False
    num_parallel_reads: int = 4


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Model architecture.

    Attributes:
      name: registered model name (``python -m trainer.train --help`` lists them).
      tasks: label names the model predicts; empty means the schema's first
        label for single-task models and all labels for multi-task models.
      embedding_dim: latent dimension of FM/FFM/embedding tables.
      hidden_units: MLP layer sizes of deep models.
      dropout: dropout rate of MLP layers.
      l2_embedding: L2 on embedding rows touched by a batch.
      l2_linear: L2 on first-order weights touched by a batch.
      init_stddev: stddev of the normal initializer of latent vectors.
      embedding_init: ``normal`` (N(0, init_stddev^2)) or ``uniform`` (libffm's U(0, 1/sqrt(k))).
      normalize: libffm's instance-wise normalisation of FFM's pairwise term.
    """

    name: str = "fm"
    tasks: tuple[str, ...] = ()
    embedding_dim: int = 8
    hidden_units: tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    l2_embedding: float = 0.0
    l2_linear: float = 0.0
    init_stddev: float = 0.01
    embedding_init: str = "normal"
    normalize: bool = False

    def __post_init__(self):
        if self.embedding_init not in ("normal", "uniform"):
            raise ValueError(f"model.embedding_init {self.embedding_init!r} not in normal/uniform")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer.

    Attributes:
      name: ``adam``, ``adagrad``, ``ftrl`` or ``sgd``.
      learning_rate: step size.
      initial_accumulator_value: Adagrad's starting accumulator (libffm starts at 1.0).
      scale_lr_by_batch: multiply the learning rate by the batch size. The loss is a batch mean,
        so this gives each example the step a per-example learner (libffm) would take.
    """

    name: str = "adam"
    learning_rate: float = 0.001
    initial_accumulator_value: float = 0.1
    scale_lr_by_batch: bool = False

    def __post_init__(self):
        if self.name not in ("adam", "adagrad", "ftrl", "sgd"):
            raise ValueError(f"optimizer {self.name!r} not in adam/adagrad/ftrl/sgd")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training loop.

    Attributes:
      epochs: passes over the training split.
      seed: seed of weights init, shuffling and dropout.
      checkpoint_every_steps: steps between kill-safe checkpoints.
      verbose: Keras verbosity (1 progress bar, 2 one line per epoch).
    """

    epochs: int = 2
    seed: int = 42
    checkpoint_every_steps: int = 500
    verbose: int = 2


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One training run.

    Attributes:
      data, model, optimizer, train: the parts above.
      run_dir: checkpoints, TensorBoard logs, metrics.json, config.yaml.
      export_base: TF Serving base path; exports go to ``<export_base>/<model_name>/<version>``.
      model_name: served model name (default: ``model.name``).
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    run_dir: str = "runs/default"
    export_base: str = "runs/export"
    model_name: str = ""

    @property
    def served_name(self) -> str:
        return self.model_name or self.model.name


EXPERIMENTS: dict[str, Callable[[], dict]] = {}


def register_experiment(name: str):
    """Decorator registering a function that returns config overrides (a dict)."""
    def deco(fn):
        if name in EXPERIMENTS:
            raise ValueError(f"experiment {name!r} registered twice")
        EXPERIMENTS[name] = fn
        return fn
    return deco


def resolve(experiment: str = "", yaml_path: str = "", overrides: dict | None = None) -> ExperimentConfig:
    """Builds the resolved config from an experiment, a YAML file and overrides."""
    from trainer import experiments  # noqa: F401  (registers the named experiments)

    data: dict = {}
    if experiment:
        if experiment not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {experiment!r}; known: {sorted(EXPERIMENTS)}")
        data = EXPERIMENTS[experiment]()
    if yaml_path:
        data = configs.deep_merge(data, configs.load_yaml(yaml_path))
    data = configs.deep_merge(data, overrides or {})
    return configs.from_dict(ExperimentConfig, data)


def save(cfg: ExperimentConfig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(configs.to_dict(cfg), f, sort_keys=False)


def load(path: str) -> ExperimentConfig:
    return configs.from_dict(ExperimentConfig, configs.load_yaml(path))
