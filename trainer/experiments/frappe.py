"""Named experiments on Frappe (train: frappe.validation.libfm, eval: frappe.test.libfm).

Each holds the winner of a ``make tune`` search (docs/TRAINER_RESULTS.md lists the
searches and every trial); all stop early on the eval log loss and restore the best
epoch. Data: ``make etl INPUT=../shared/data/frappe/frappe.validation.libfm
EVAL_INPUT=../shared/data/frappe/frappe.test.libfm FORMAT=libfm
FIELD_MAP=../shared/data/frappe/frappe.fields.tsv OUT=data/frappe``.
"""
from __future__ import annotations

from feature_schema import configs
from trainer.experiments.registry import register_experiment

# Shared by every Frappe run: data location, in-memory cache (57k examples), stopping rule.
_FRAPPE = {
    "data": {"path": "data/frappe", "cache": True},
    "train": {"epochs": 100, "early_stopping_patience": 3, "verbose": 2},
}


def summed_adagrad(learning_rate: float, batch_size: int) -> dict:
    """AdaGrad that steps as if the loss were the batch *sum*, with libffm's accumulator start G0 = 1.

    Keras differentiates the batch mean, g/B. Starting the accumulator at 1/B^2 gives
    ``lr * (g/B) / sqrt(1/B^2 + sum (g/B)^2) = lr * g / sqrt(1 + sum g^2)``: libffm's rule with
    a batch's summed gradient in place of one example's. Unlike multiplying the rate by B
    (``scale_lr_by_batch``), the accumulator then grows as fast as libffm's, so rows that occur
    many times in a batch take bounded steps and large batches stay stable (Frappe FFM:
    batch 256 with the rate x B diverged to AUC 0.5; with this rule it trains).
    """
    return {"optimizer": {"name": "adagrad", "learning_rate": learning_rate,
                          "initial_accumulator_value": 1.0 / batch_size ** 2, "scale_lr_by_batch": False},
            "data": {"batch_size": batch_size}}


def _frappe(*parts: dict) -> dict:
    out = _FRAPPE
    for p in parts:
        out = configs.deep_merge(out, p)
    return out


@register_experiment("frappe_ffm")
def frappe_ffm() -> dict:
    """FFM on Frappe: libffm's model (normalisation, uniform init), k=32, lambda=1e-3, summed AdaGrad, XLA."""
    return _frappe(summed_adagrad(0.5, 1024), {
        "model": {"name": "ffm", "embedding_dim": 32, "l2_embedding": 1e-3, "normalize": True,
                  "embedding_init": "uniform"},
        "train": {"jit_compile": True}})  # same figures, about a third less time (docs/TRAINER.md)


@register_experiment("frappe_deepfm")
def frappe_deepfm() -> dict:
    """DeepFM on Frappe: k=128, MLP 256-128, dropout 0.2, L2 1e-3 on used rows, summed AdaGrad 0.05."""
    return _frappe(summed_adagrad(0.05, 1024), {
        "model": {"name": "deepfm", "embedding_dim": 128, "hidden_units": [256, 128], "dropout": 0.2,
                  "l2_embedding": 1e-3, "l2_linear": 1e-3, "init_stddev": 0.1}})


@register_experiment("frappe_wide_deep")
def frappe_wide_deep() -> dict:
    """Wide&Deep on Frappe: k=64, MLP 512-256, dropout 0.5, L2 0.03 on used rows, summed AdaGrad 0.03."""
    return _frappe(summed_adagrad(0.03, 1024), {
        "model": {"name": "wide_deep", "embedding_dim": 64, "hidden_units": [512, 256], "dropout": 0.5,
                  "l2_embedding": 0.03, "l2_linear": 1e-3, "init_stddev": 0.3},
        # Its best epoch comes later and between whole passes: evaluate every half pass (57 steps = 1).
        "train": {"steps_per_epoch": 28, "early_stopping_patience": 4}})


# Speed (bench/bench_train.py, docs/TRAINER.md "Training speed").
@register_experiment("frappe_ffm_fast")
def frappe_ffm_fast() -> dict:
    """frappe_ffm for time to libffm's best logloss: rate 1.0, batch 1862 (divides 57,722: one step shape)."""
    return configs.deep_merge(frappe_ffm(), configs.deep_merge(summed_adagrad(1.0, 1862), {
        "data": {"eval_batch_size": 4810}}))  # divides the 28,860 eval lines: one eval step shape


@register_experiment("frappe_deepfm_deepctr")
def frappe_deepfm_deepctr() -> dict:
    """DeepFM at DeepCTR's benchmark shape (k=10, DNN 400-400, batch 1024, Adam 1e-3, L2 1e-5 as DeepCTR),
    with the speed settings that paid off (docs/TRAINER.md "Training speed"): the DNN in bfloat16 (same
    eval AUC and logloss to 4 digits on Frappe), 8 steps per execution, the dense layout of the
    single-valued fields (every Frappe field: ``[batch, 10]`` ids, no sparse bookkeeping), and the
    split featurized once and held in memory (``data.featurize_once`` auto: 12 MB), as DeepCTR's arrays."""
    return _frappe({"model": {"name": "deepfm", "embedding_dim": 10, "hidden_units": [400, 400],
                              "l2_embedding": 1e-5, "l2_linear": 1e-5, "mlp_dtype": "bfloat16"},
                    "optimizer": {"name": "adam", "learning_rate": 1e-3},
                    "data": {"batch_size": 1024, "dense_ids": True, "featurize_once": None},
                    "train": {"steps_per_execution": 8}})
