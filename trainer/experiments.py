"""Named experiments: each returns overrides of the default ExperimentConfig."""
from __future__ import annotations

from trainer.config import register_experiment


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
    from feature_schema import configs
    return configs.deep_merge(libffm_adagrad(0.2, 32), {
        "model": {"name": "ffm", "embedding_dim": 4, "normalize": True, "embedding_init": "uniform",
                  "l2_embedding": 2e-5},
        "train": {"epochs": 3}})
