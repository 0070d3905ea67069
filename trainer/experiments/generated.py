"""Named experiments on the generator's data.

* ``generated_*``: the generator's default data (``make etl``), the walking-skeleton runs.
* ``quality_*``: the generator's ``quality`` preset (``make etl GEN_ARGS='--preset quality'``: 1M
  impressions over small, learnable cardinalities), where the trainer issue's bars against the
  planted Bayes-optimal model are measured (``tests/test_training_quality.py``); ``quality_esmm``
  and ``quality_cvr_clicked`` are compared on the ``esmm`` preset.
"""
from __future__ import annotations

from feature_schema import configs
from trainer.experiments.registry import register_experiment


@register_experiment("generated_fm")
def generated_fm() -> dict:
    """FM on the generator's default data (the walking-skeleton run)."""
    return {"model": {"name": "fm", "embedding_dim": 8, "l2_embedding": 1e-5},
            "optimizer": {"name": "adam", "learning_rate": 0.002},
            "data": {"batch_size": 256}, "train": {"epochs": 2}}


@register_experiment("generated_lr")
def generated_lr() -> dict:
    """Logistic regression on the generator's default data."""
    return {"model": {"name": "lr", "l2_linear": 1e-6},
            "optimizer": {"name": "adam", "learning_rate": 0.005},
            "data": {"batch_size": 256}, "train": {"epochs": 2}}


def libffm_adagrad(learning_rate: float = 0.2, batch_size: int = 32) -> dict:
    """Optimizer/data overrides that mimic libffm's per-example AdaGrad (G starts at 1, step eta/sqrt(G)).

    The loss is a batch mean, so the rate is multiplied by the batch size to give every example
    libffm's step size.
    """
    return {"optimizer": {"name": "adagrad", "learning_rate": learning_rate, "initial_accumulator_value": 1.0,
                          "scale_lr_by_batch": True},
            "data": {"batch_size": batch_size}}


@register_experiment("generated_ffm")
def generated_ffm() -> dict:
    """FFM with libffm's settings (normalisation, U(0,1/sqrt(k)) init, AdaGrad) on the generated data."""
    return configs.deep_merge(libffm_adagrad(0.2, 32), {
        "model": {"name": "ffm", "embedding_dim": 4, "normalize": True, "embedding_init": "uniform",
                  "l2_embedding": 2e-5},
        "train": {"epochs": 3}})


# The quality preset: 1M train impressions, 9 fields. Shared settings of the quality_* runs.
_QUALITY = {"data": {"batch_size": 1024},
            "train": {"epochs": 10, "early_stopping_patience": 1}}
_QUALITY_DEEP = {"embedding_dim": 16, "hidden_units": [256, 128], "tower_units": [64],
                 "l2_embedding": 1e-3, "l2_linear": 1e-4}


def _quality(model: dict, lr: float) -> dict:
    return configs.deep_merge(_QUALITY, {"model": model, "optimizer": {"name": "adam", "learning_rate": lr}})


@register_experiment("quality_lr")
def quality_lr() -> dict:
    """Logistic regression on the quality preset."""
    return _quality({"name": "lr", "l2_linear": 1e-4}, 0.005)


@register_experiment("quality_fm")
def quality_fm() -> dict:
    """FM on the quality preset."""
    return _quality({"name": "fm", "embedding_dim": 16, "l2_embedding": 1e-3, "l2_linear": 1e-4}, 0.002)


@register_experiment("quality_ffm")
def quality_ffm() -> dict:
    """FFM (k=4, the planted rank) on the quality preset."""
    return _quality({"name": "ffm", "embedding_dim": 4, "l2_embedding": 1e-3, "l2_linear": 1e-4}, 0.004)


@register_experiment("quality_deepfm")
def quality_deepfm() -> dict:
    """DeepFM on the quality preset."""
    return _quality({"name": "deepfm", **_QUALITY_DEEP}, 0.002)


@register_experiment("quality_wide_deep")
def quality_wide_deep() -> dict:
    """Wide&Deep (wide: position + all fields) on the quality preset."""
    return _quality({"name": "wide_deep", **_QUALITY_DEEP}, 0.002)


@register_experiment("quality_mtl")
def quality_mtl() -> dict:
    """Hard-sharing CTR+CVR model (position only in the click tower) on the quality preset."""
    return _quality({"name": "mtl", "tasks": ["click", "conversion"], **_QUALITY_DEEP}, 0.002)


@register_experiment("quality_ctr_single")
def quality_ctr_single() -> dict:
    """quality_mtl's architecture trained on click alone (the single-task reference)."""
    return _quality({"name": "mtl", "tasks": ["click"], **_QUALITY_DEEP}, 0.002)


@register_experiment("quality_esmm")
def quality_esmm() -> dict:
    """ESMM (pCTCVR = pCTR x pCVR on all impressions); measured on the generator's ``esmm`` preset."""
    return _quality({"name": "esmm", "tasks": ["click", "conversion"], **_QUALITY_DEEP}, 0.002)


@register_experiment("quality_cvr_clicked")
def quality_cvr_clicked() -> dict:
    """A position-free CVR model trained on clicked impressions only (the baseline ESMM must beat, ``esmm`` preset)."""
    return configs.deep_merge(
        _quality({"name": "mtl", "tasks": ["conversion"], "bias_tasks": [], **_QUALITY_DEEP}, 0.002),
        {"train": {"task_condition": {"conversion": "click"}}})
