"""Named experiments: each returns overrides of the default ExperimentConfig.

* ``generated_*``, ``quality_*``: the generator's data (``generated.py``);
* ``frappe_*``: Frappe (``frappe.py``);
* ``behaviour_*``: the generator's ``behaviour`` preset, click histories (``behaviour.py``).

The package owns the registry (``registry.py``); importing it registers every experiment.
It imports only ``feature_schema.configs``, so ``trainer.config`` can import it without a cycle.
"""
from trainer.experiments import behaviour, frappe, generated  # noqa: F401  (register their experiments)
from trainer.experiments.registry import EXPERIMENTS, overrides, register_experiment

__all__ = ["EXPERIMENTS", "overrides", "register_experiment"]
