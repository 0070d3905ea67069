"""Typed trainer configuration: frozen dataclasses, named experiments, YAML and `--set` overrides.

Resolution order: dataclass defaults -> named experiment -> YAML file -> `--set key=value`
-> Make variables (DATA, MODEL, RUN_DIR, EXPORT_BASE). Unknown keys are errors. The
resolved config is written to ``<run_dir>/config.yaml`` and into every export.
"""
from __future__ import annotations

import dataclasses
import math
import os

import yaml

from feature_schema import configs
from trainer import experiments


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline.

    Attributes:
      path: ETL output directory (holds schema.json).
      batch_size: training batch size.
      eval_batch_size: batch size for evaluation and prediction.
      shuffle_buffer: example-level shuffle buffer (0 disables shuffling).
      cache: cache the raw records in memory after the first epoch (parsed again every epoch).
      num_parallel_reads: TFRecord files read concurrently.
      deterministic: read and parse in a fixed order, so that ``train.seed`` fixes the example order
        (and, on CPU, the whole run); False lets parallel reads deliver out of order (faster when
        files are on slow storage).
      dense_ids: train on the featurization layer's dense layout (``featurization.layer``): the
        records' lists parsed densely, the single-valued fields as dense ``[batch, S]`` rows and
        values, only multi-hot fields sparse. The same features; the layers read either layout, so
        evaluation and the exported model keep the sparse one. Needs ``fill_missing`` and no vector fields.
      featurize_once: train on the split parsed and featurized once (dense layout) and held in memory,
        each epoch's batches gathered from a fresh seeded permutation of all examples (how Keras
        feeds NumPy arrays; ``shuffle_buffer`` 0: file order). For splits that fit in memory (Frappe:
        57,722 x 10 fields, 12 MB) whose fields are all single-valued; ``cache`` is then moot. True:
        always (an error when a field is multi-hot); False: never (parse every epoch); None (``null``):
        auto, on when the split qualifies (``data.featurize_once_fits``: all fields single-valued,
        ``fill_missing``, no vector fields) and its featurized size is at most
        ``featurize_once_max_bytes``; auto stays off for a parameter-server worker's shard.
      featurize_once_max_bytes: the memory budget of ``featurize_once`` auto (``data.featurized_bytes``:
        20 bytes per example and field, 4 per label and weight).
    """

    path: str = "data/etl"
    batch_size: int = 256
    eval_batch_size: int = 4096
    shuffle_buffer: int = 50_000
    cache: bool = False
    num_parallel_reads: int = 4
    deterministic: bool = True
    dense_ids: bool = False
    featurize_once: bool | None = False
    featurize_once_max_bytes: int = 1 << 30

    def __post_init__(self):
        if self.featurize_once_max_bytes < 0:
            raise ValueError(f"data.featurize_once_max_bytes must be >= 0, got {self.featurize_once_max_bytes}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Model architecture.

    Attributes:
      name: registered model name (``python -m trainer.train --help`` lists them).
      tasks: label names the model predicts; empty means the schema's first
        label for single-task models and all labels for multi-task models. ESMM takes
        (click label, click-and-convert label).
      embedding_dim: latent dimension of FM/FFM/embedding tables.
      hidden_units: MLP layer sizes of deep models (the shared bottom of ``mtl``/``esmm``).
      tower_units: hidden layer sizes of each task tower (multi-task models).
      num_experts: experts of ``mmoe`` (each task's gate mixes them; ignored by other models).
      expert_units: hidden layer sizes of each ``mmoe`` expert MLP (``mmoe`` has no shared bottom, so
        it ignores ``hidden_units``).
      activation: activation of MLP layers.
      dropout: dropout rate of MLP layers.
      mlp_dtype: compute dtype of the MLPs built by ``RankingModel._mlp`` (the deep part of
        ``wide_deep``/``deepfm``/``din``/``dicm``, the bottoms of ``mtl``/``esmm``): ``float32``, or ``bfloat16``
        (bfloat16 matmuls, float32 variables, optimizer and outputs; faster on CPUs with AVX512-BF16
        or AMX, docs/TRAINER.md "Training speed"; not the same numerics).
      l2_embedding: L2 on embedding rows touched by a batch (``l2/2 * ||v||^2`` per use, as libffm).
      l2_linear: L2 on first-order weights touched by a batch.
      l2_dense: L2 on MLP kernels.
      init_stddev: stddev of the normal initializer of latent vectors.
      embedding_init: ``normal`` (N(0, init_stddev^2)) or ``uniform`` (libffm's U(0, 1/sqrt(k))); FFM.
      normalize: libffm's instance-wise normalisation of FFM's pairwise term.
      embedding_combiner: pooling of multi-hot fields in deep models, ``sum`` or ``mean``.
      bias_fields: position-bias field names (wide part of ``wide_deep``; seen only by ``bias_tasks``
        in multi-task models; never in a deep part); empty means the schema's linear-only fields.
      bias_tasks: tasks whose towers see ``bias_fields``; None (unset) means the first task (the CTR
        task), an empty list none (e.g. a single-task CVR model).
      wide_fields: fields of the wide (linear) part of ``wide_deep`` besides ``bias_fields``; empty
        means all fields.
      task_fields: task -> field names only that task's tower sees (multi-task models).
      num_regions: m, the regions of ``mlr`` (softmax gate x m region-wise LRs; ``l2_linear`` on their rows).
      user_fields, item_fields: the fields of the user and item towers of ``two_tower``; the first item
        field names the item (one key per example, the rows of the item-embedding file).
      tower_dim: d, the size of ``two_tower``'s user and item vectors (each tower: ``hidden_units`` -> d).
      logq_correction: ``two_tower`` subtracts log q(item) from the in-batch logits, q = the item's
        share of training impressions (the vocabulary's counts).
      temperature: ``two_tower``'s in-batch logits are ``<u, v> / temperature``.
      normalize_towers: L2-normalise both towers' vectors (the score is then a cosine).
      attention_units: hidden layer sizes of the local activation unit of ``din`` and ``dicm``.
      attention_activation: its activation, ``dice`` or ``prelu`` (Zhou et al. 2018).
      attention_softmax: normalise the unit's weights by a softmax over the sequence (the DIN authors'
        released code) instead of the paper's unnormalised weights.
      vector_projection: size of ``dicm``'s projection of the item vectors (0: ``embedding_dim``).
      loss_weighting: how multi-task losses combine: ``fixed`` (``train.loss_weights``) or ``uncertainty``
        (learned log-variances s_t, ``sum_t exp(-s_t) L_t + s_t / 2``; Kendall et al. 2018;
        ``trainer/weighting.py``). A model setting: the s_t are model variables.
    """

    name: str = "fm"
    tasks: tuple[str, ...] = ()
    embedding_dim: int = 8
    hidden_units: tuple[int, ...] = (256, 128)
    tower_units: tuple[int, ...] = (64,)
    num_experts: int = 4
    expert_units: tuple[int, ...] = (64,)
    activation: str = "relu"
    dropout: float = 0.0
    mlp_dtype: str = "float32"
    l2_embedding: float = 0.0
    l2_linear: float = 0.0
    l2_dense: float = 0.0
    init_stddev: float = 0.01
    embedding_init: str = "normal"
    normalize: bool = False
    embedding_combiner: str = "sum"
    bias_fields: tuple[str, ...] = ()
    bias_tasks: tuple[str, ...] | None = None
    wide_fields: tuple[str, ...] = ()
    task_fields: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # mlr (trainer/models/mlr.py) and two_tower (trainer/models/retrieval.py)
    num_regions: int = 12
    user_fields: tuple[str, ...] = ("user", "query", "hour", "device")
    item_fields: tuple[str, ...] = ("item", "category", "brand", "price")
    tower_dim: int = 32
    logq_correction: bool = True
    temperature: float = 1.0
    normalize_towers: bool = False
    # din and dicm (trainer/models/sequence.py)
    attention_units: tuple[int, ...] = (36,)
    attention_activation: str = "dice"
    attention_softmax: bool = False
    vector_projection: int = 0
    loss_weighting: str = "fixed"

    def __post_init__(self):
        if self.embedding_init not in ("normal", "uniform"):
            raise ValueError(f"model.embedding_init {self.embedding_init!r} not in normal/uniform")
        if self.loss_weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"model.loss_weighting {self.loss_weighting!r} not in fixed/uncertainty")
        if self.mlp_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.mlp_dtype {self.mlp_dtype!r} not in float32/bfloat16")
        if self.embedding_combiner not in ("sum", "mean"):
            raise ValueError(f"model.embedding_combiner {self.embedding_combiner!r} not in sum/mean")
        if self.num_experts < 1 or not self.expert_units:
            raise ValueError(f"model.num_experts ({self.num_experts}) must be >= 1 and model.expert_units "
                             f"({list(self.expert_units)}) not empty")
        if self.attention_activation not in ("dice", "prelu") or not self.attention_units or self.vector_projection < 0:
            raise ValueError(f"model.attention_activation {self.attention_activation!r} not in dice/prelu, or "
                             f"model.attention_units empty, or model.vector_projection < 0")
        if self.num_regions < 1 or self.tower_dim < 1 or self.temperature <= 0:
            raise ValueError(f"model.num_regions ({self.num_regions}) and model.tower_dim ({self.tower_dim}) must be "
                             f">= 1 and model.temperature ({self.temperature}) > 0")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer.

    Attributes:
      name: ``adam``, ``adagrad``, ``ftrl`` or ``sgd``.
      learning_rate: step size.
      initial_accumulator_value: Adagrad's and FTRL's starting accumulator (libffm starts at 1.0).
      scale_lr_by_batch: multiply the learning rate by the batch size. The loss is a batch mean,
        so this gives each example the step a per-example learner (libffm) would take.
      l1, l2: FTRL's L1 and L2 regularisation strengths (FTRL only).
      momentum: SGD momentum.
    """

    name: str = "adam"
    learning_rate: float = 0.001
    initial_accumulator_value: float = 0.1
    scale_lr_by_batch: bool = False
    l1: float = 0.0
    l2: float = 0.0
    momentum: float = 0.0

    def __post_init__(self):
        if self.name not in ("adam", "adagrad", "ftrl", "sgd"):
            raise ValueError(f"optimizer {self.name!r} not in adam/adagrad/ftrl/sgd")
        if (self.l1 or self.l2) and self.name != "ftrl":
            raise ValueError("optimizer.l1/l2 are FTRL's; use model.l2_* for the other optimizers")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training loop.

    Attributes:
      epochs: passes over the training split (at most; see early stopping).
      steps_per_epoch: steps per epoch; 0 means one pass over the training split.
      seed: seed of weights init, shuffling and dropout.
      op_determinism: run TensorFlow's ops deterministically
        (``tf.config.experimental.enable_op_determinism``), so that a seed fixes the run whatever
        the machine's load; False lets TensorFlow pick faster non-deterministic kernels where it has them.
      checkpoint_every_steps: steps between kill-safe checkpoints (``run_dir/backup``).
      verbose: 1: Keras' progress bar when stdout is a terminal, and one line per epoch (time,
        examples/s, metrics); 2: the line per epoch only; 0: silent.
      loss_weights: task -> weight of its loss (default 1).
      pos_weight: task -> weight of its positive examples in the training loss (default 1).
      task_condition: task -> label; the task trains (and is early-stopped) only on examples where
        that label is 1, e.g. ``{conversion: click}`` for a CVR model on clicked impressions.
      early_stopping_patience: stop after this many epochs without a lower selection logloss (summed
        over tasks with ``loss_weights``; on the schema's ``valid`` split when it has one, else on
        ``eval``) and restore the best epoch's weights; 0 disables.
      early_stopping_min_delta: smallest decrease that counts as an improvement.
      report: write the evaluation report (``run_dir/report``: JSON, ROC and calibration PNGs).
      warm_start: a previous run dir or TF Serving export version dir to initialise from
        (``trainer/warm_start.py``: variables by name, vocabulary rows by feature); empty: cold start.
      steps_per_execution: training steps per call of the compiled train function (Keras
        ``steps_per_execution``): fewer Python round trips per epoch. Batch callbacks (and so
        ``checkpoint_every_steps``) then count calls, not steps; Keras needs the eval size
        (``validation_steps``) to evaluate with it.
      jit_compile: compile the training step with XLA (not the eval step, nor under
        ``ParameterServerStrategy``); pays off for FFM, not for MLP-bound models (docs/TRAINER.md,
        "Training speed").
    """

    epochs: int = 2
    steps_per_epoch: int = 0
    seed: int = 42
    op_determinism: bool = True
    checkpoint_every_steps: int = 500
    verbose: int = 1
    loss_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    pos_weight: dict[str, float] = dataclasses.field(default_factory=dict)
    task_condition: dict[str, str] = dataclasses.field(default_factory=dict)
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    report: bool = True
    warm_start: str = ""
    steps_per_execution: int = 1
    jit_compile: bool = False

    def __post_init__(self):
        if self.steps_per_execution < 1:
            raise ValueError(f"train.steps_per_execution must be >= 1, got {self.steps_per_execution}")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """The ``fusion`` output of a multi-task export: ``ctr^a * cvr^b * bid`` (ESM^2-style ranking score).

    Only the raw Predict signatures (``serving_default``, ``rank``) serve it; every request Example
    (in ``rank``: each candidate, else the context) carries its bid (docs/SERVING.md).

    Attributes:
      a, b: the exponents of pCTR and pCVR (>= 0; a = b = 1 ranks by expected revenue per impression).
      ctr_output, cvr_output: the model outputs used as pCTR and pCVR (``esmm``: ``ctr``/``cvr``;
        ``mtl``/``mmoe``: task names such as ``click``/``conversion``).
      bid_feature: the float feature of each raw Example holding the bid (not a schema field).
    """

    a: float = 1.0
    b: float = 1.0
    ctr_output: str = "ctr"
    cvr_output: str = "cvr"
    bid_feature: str = "bid"

    def __post_init__(self):
        if not (math.isfinite(self.a) and math.isfinite(self.b) and self.a >= 0 and self.b >= 0):
            raise ValueError(f"fusion.a ({self.a}) and fusion.b ({self.b}) must be finite and >= 0")
        if not (self.ctr_output and self.cvr_output and self.bid_feature):
            raise ValueError("fusion.ctr_output, fusion.cvr_output and fusion.bid_feature must be non-empty")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One training run.

    Attributes:
      data, model, optimizer, train: the parts above.
      run_dir: checkpoints, TensorBoard logs, metrics.json, config.yaml.
      export_base: TF Serving base path; exports go to ``<export_base>/<model_name>/<version>``.
      model_name: served model name (default: ``model.name``).
      fusion: the export's ``fusion`` output (``FusionConfig``), or None (the default) for none.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    run_dir: str = "runs/default"
    export_base: str = "runs/export"
    model_name: str = ""
    fusion: FusionConfig | None = None

    def __post_init__(self):
        if self.model.loss_weighting == "uncertainty" and self.train.loss_weights:
            raise ValueError(f"train.loss_weights {self.train.loss_weights} and model.loss_weighting=uncertainty "
                             f"both weigh the task losses; set one")

    @property
    def served_name(self) -> str:
        return self.model_name or self.model.name


def resolve(experiment: str = "", yaml_path: str = "", overrides: dict | None = None) -> ExperimentConfig:
    """Builds the resolved config from an experiment, a YAML file and overrides."""
    data: dict = experiments.overrides(experiment) if experiment else {}
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
