"""Learned task-loss weights: homoscedastic uncertainty weighting of multi-task losses.

Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics" (CVPR 2018). Each task t gets a learned observation noise sigma_t; the
network learns ``s_t = log sigma_t^2`` (their numerically stable parametrisation, Sec. 3.2).
A classification likelihood ``Softmax(f / sigma^2)`` (a Boltzmann distribution scaled by sigma^2)
has, by their Sec. 3.2 approximation, negative log likelihood ``(1 / sigma^2) L_t + log sigma``
(the classification term of their joint loss ``1/(2 sigma_1^2) L_1 + 1/sigma_2^2 L_2 + log sigma_1
+ log sigma_2``), i.e. with ``s_t``:

    L = sum_t  exp(-s_t) * L_t  +  s_t / 2

where ``L_t`` is task t's binary cross-entropy (a sigmoid is the two-class softmax with logits
(f, 0), so the same approximation holds). Every task here is binary classification, so every
term takes this form (their regression term would be ``exp(-s_t) L_t / 2 + s_t / 2``). For a
fixed ``L_t`` the term is smallest at ``exp(-s_t) = 1 / (2 L_t)``: noisier (higher-loss) tasks get
smaller weights, and the ``s_t / 2`` term keeps every weight from collapsing to 0. ``s_t``
starts at 0 (weight 1, the fixed-weight default).

``RankingModel.compute_loss`` applies it when ``model.loss_weighting=uncertainty``, inside the
ordinary Keras ``train_step``/``test_step`` (one training loop for every model; ``s_t`` is an
ordinary model variable, so checkpoints, warm starts and parameter servers carry it).
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras


class UncertaintyWeighting(keras.layers.Layer):
    """``sum_t exp(-s_t) L_t + s_t / 2`` over per-task losses, with a learned ``s_t = log sigma_t^2``.

    (Kendall, Gal & Cipolla, CVPR 2018, Sec. 3.2: the classification term ``L_t / sigma_t^2 + log sigma_t``
    in the ``s = log sigma^2`` form; the module docstring derives it.)

    Input: ``[T]`` per-task losses, in ``tasks`` order. Output: a scalar.

    Args:
      tasks: task names (one ``s_t`` each, in this order).
      initial_log_variance: the starting ``s_t`` (0: every weight starts at 1).
    """

    def __init__(self, tasks, initial_log_variance: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tuple(tasks)
        if len(self.tasks) < 2:
            raise ValueError(f"uncertainty weighting needs two or more tasks, got {list(self.tasks)}")
        self.initial_log_variance = float(initial_log_variance)
        # Created here, not lazily: a restore (BackupAndRestore, warm start) runs before the first loss.
        self.log_variance = self.add_weight(
            name="log_variance", shape=[len(self.tasks)], dtype=tf.float32, trainable=True,
            initializer=keras.initializers.Constant(self.initial_log_variance))
        self.built = True

    def call(self, losses):
        s = self.log_variance
        losses = tf.cast(tf.reshape(losses, [len(self.tasks)]), s.dtype)
        return tf.reduce_sum(tf.exp(-s) * losses + 0.5 * s)

    def task_weights(self) -> dict:
        """{task: exp(-s_t)}, the current weight of each task's loss."""
        w = tf.exp(-self.log_variance)
        return {t: w[i] for i, t in enumerate(self.tasks)}

    def get_config(self):
        return {**super().get_config(), "tasks": list(self.tasks),
                "initial_log_variance": self.initial_log_variance}


def task_losses(tasks, y, y_pred, sample_weight) -> tf.Tensor:
    """``[T]`` per-task weighted mean binary cross-entropies, as Keras' compiled loss computes each.

    ``L_t = sum_i w_ti * bce(y_ti, p_ti) / n`` over the batch's n examples (Keras'
    SUM_OVER_BATCH_SIZE: an example whose weight is 0, e.g. outside ``train.task_condition``, still
    counts in n), so with every ``s_t = 0`` the weighted objective equals the fixed-weight one.

    Args:
      tasks: task names.
      y, y_pred: {task: [batch]} labels and probabilities.
      sample_weight: {task: [batch]}, one ``[batch]`` tensor for every task, or None.
    """
    out = []
    for t in tasks:
        p = tf.reshape(y_pred[t], [-1])
        bce = keras.backend.binary_crossentropy(tf.reshape(tf.cast(y[t], p.dtype), [-1]), p)
        w = sample_weight[t] if isinstance(sample_weight, dict) else sample_weight
        w = tf.ones_like(bce) if w is None else tf.reshape(tf.cast(w, bce.dtype), [-1])
        out.append(tf.reduce_sum(w * bce) / tf.cast(tf.size(bce), bce.dtype))
    return tf.stack(out)
