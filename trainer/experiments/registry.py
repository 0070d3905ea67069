"""The registry of named experiments: name -> function returning ExperimentConfig overrides (a dict)."""
from __future__ import annotations

from typing import Callable

EXPERIMENTS: dict[str, Callable[[], dict]] = {}


def register_experiment(name: str):
    """Decorator registering a function that returns config overrides (a dict)."""
    def deco(fn):
        if name in EXPERIMENTS:
            raise ValueError(f"experiment {name!r} registered twice")
        EXPERIMENTS[name] = fn
        return fn
    return deco


def overrides(name: str) -> dict:
    """The overrides of experiment ``name``.

    Raises:
      ValueError: no experiment of that name.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]()
