"""The trainer's metrics: the NumPy report metrics and the Keras loss and log-loss metric.

The report metrics (AUC, logloss, calibration, ``binary_report``) live in
``feature_schema.metrics`` (NumPy only, shared with the generator); they are re-exported
here for the trainer's callers. The Keras side is the per-example binary cross-entropy the
model trains on and the weighted ``logloss`` Keras logs during training.
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from feature_schema.metrics import auc, binary_report, calibration, logloss

__all__ = ["LogLoss", "auc", "binary_crossentropy", "binary_report", "calibration", "logloss"]


def binary_crossentropy(y_true, y_pred):
    """Per-example log loss of [batch] labels and probabilities (Keras' version reduces the last axis)."""
    return keras.backend.binary_crossentropy(tf.reshape(tf.cast(y_true, y_pred.dtype), [-1]),
                                             tf.reshape(y_pred, [-1]))


class LogLoss(keras.metrics.Mean):
    """Weighted mean log loss of [batch] labels and probabilities (the ``logloss`` Keras logs)."""

    def __init__(self, name="logloss", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            sample_weight = tf.reshape(sample_weight, [-1])
        return super().update_state(binary_crossentropy(y_true, y_pred), sample_weight)
