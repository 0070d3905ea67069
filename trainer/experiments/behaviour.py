"""Named experiments on the generator's ``behaviour`` preset (users' click histories, ``hist``).

    make etl GEN_ARGS='--preset behaviour --formats libffm' CONFIG=configs/etl_behaviour.yaml RAW=data/raw-behaviour OUT=data/etl-behaviour
    make train DATA=data/etl-behaviour EXPERIMENT=behaviour_din

The planted click logit holds a soft maximum of the candidate's similarity to the history's items
(``generator.behaviour``), which attention over the sequence (``din``, ``dicm``) can represent and a
mean-pooled history (``deepfm`` with ``embedding_combiner: mean``) sees only through the mean of the
items' embeddings; ``bench/quality_behaviour.py``
measures them against the planted Bayes-optimal AUC and the mean-pooling ceiling (``bench/behaviour_ceiling.py``).
"""
from __future__ import annotations

from feature_schema import configs
from trainer.experiments.registry import register_experiment

# Shared by every behaviour_* run: early stopping on the eval log loss (patience 2: the AUC still rose
# one epoch after a flat log loss), best epoch restored. Chosen by single-seed runs of DIN on the
# preset (200k train impressions; eval click AUC, Bayes 0.9373): embedding 16 / L2 1e-5 / Dice /
# patience 1: 0.9136; + L2 1e-4, dropout 0.1: 0.9139; embedding 8: 0.9163; PReLU instead of Dice: 0.9170;
# L2 3e-4: 0.9173 (MLP [64, 32]: 0.9136; softmax attention, embedding 16: 0.9067 at its 6th epoch);
# docs/TRAINER.md#behaviour-sequences.
_BEHAVIOUR = {"data": {"batch_size": 1024}, "train": {"epochs": 12, "early_stopping_patience": 2},
              "optimizer": {"name": "adam", "learning_rate": 0.003}}
_DEEP = {"embedding_dim": 8, "hidden_units": [128, 64], "dropout": 0.1, "l2_embedding": 3e-4, "l2_linear": 1e-5}


def _behaviour(model: dict) -> dict:
    return configs.deep_merge(_BEHAVIOUR, {"model": {**_DEEP, **model}})


@register_experiment("behaviour_din")
def behaviour_din() -> dict:
    """DIN (local activation unit with PReLU) over ``hist``, queried by the candidate item's embedding."""
    return _behaviour({"name": "din", "attention_units": [36], "attention_activation": "prelu"})


@register_experiment("behaviour_din_dice")
def behaviour_din_dice() -> dict:
    """``behaviour_din`` with Dice in the activation unit."""
    return _behaviour({"name": "din", "attention_units": [36], "attention_activation": "dice"})


@register_experiment("behaviour_deepfm")
def behaviour_deepfm() -> dict:
    """DeepFM with ``hist`` mean-pooled (the embedding combiner): the baseline DIN must beat."""
    return _behaviour({"name": "deepfm", "embedding_combiner": "mean"})


@register_experiment("behaviour_dicm")
def behaviour_dicm() -> dict:
    """DICM: DIN plus the projected item vectors of the candidate and of ``hist``, pooled by attention."""
    return _behaviour({"name": "dicm", "attention_units": [36], "attention_activation": "prelu",
                       "vector_projection": 16})
