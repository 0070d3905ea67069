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
