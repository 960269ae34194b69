"""Soft Dice + cross-entropy from logits with sparse labels (the paper's loss), and Dice metrics.

Dice is computed over the whole batch ("batch Dice", as nnU-Net does in 2D), per class,
then averaged over classes (background included or not by config); smooth = 1e-5.
Loss = (1 - mean soft Dice) + mean sparse categorical cross-entropy. Everything is
computed in float32, whatever the compute dtype of the model.
"""

from __future__ import annotations

import keras
from keras import ops


def _prepare(y_true, y_pred, num_classes: int):
    """Cast logits to float32 and one-hot the sparse labels."""
    logits = ops.cast(y_pred, "float32")
    labels = ops.cast(y_true, "int32")
    if len(labels.shape) == len(logits.shape):
        labels = ops.squeeze(labels, axis=-1)
    return logits, labels, ops.one_hot(labels, num_classes, dtype="float32")


def soft_dice_per_class(onehot, probs, smooth: float = 1e-5):
    """Soft Dice of each class over batch and pixels."""
    axes = tuple(range(len(probs.shape) - 1))
    intersection = ops.sum(onehot * probs, axis=axes)
    denominator = ops.sum(onehot, axis=axes) + ops.sum(probs, axis=axes)
    return (2.0 * intersection + smooth) / (denominator + smooth)


@keras.saving.register_keras_serializable(package="kidney_seg")
class DiceCELoss(keras.losses.Loss):
    """(1 - mean soft Dice) + sparse cross-entropy, both from logits."""

    def __init__(self, num_classes: int = 3, include_background: bool = True, smooth: float = 1e-5, name="dice_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.include_background = include_background
        self.smooth = smooth

    def call(self, y_true, y_pred):
        logits, labels, onehot = _prepare(y_true, y_pred, self.num_classes)
        probs = ops.softmax(logits, axis=-1)
        dice = soft_dice_per_class(onehot, probs, self.smooth)
        if not self.include_background:
            dice = dice[1:]
        ce = ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        return (1.0 - ops.mean(dice)) + ce

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "include_background": self.include_background, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="kidney_seg")
class HardDice(keras.metrics.Metric):
    """Dice of one class of the argmax prediction, accumulated over an epoch."""

    def __init__(self, class_id: int, class_name: str | None = None, name: str | None = None, **kwargs):
        super().__init__(name=name or f"dice_{class_name or class_id}", **kwargs)
        self.class_id = class_id
        self.class_name = class_name
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = ops.cast(y_true, "int32")
        if len(labels.shape) == len(y_pred.shape):
            labels = ops.squeeze(labels, axis=-1)
        truth = ops.cast(ops.equal(labels, self.class_id), "float32")
        pred = ops.cast(ops.equal(ops.argmax(y_pred, axis=-1), self.class_id), "float32")
        self.intersection.assign_add(ops.sum(truth * pred))
        self.total.assign_add(ops.sum(truth) + ops.sum(pred))

    def result(self):
        return ops.where(self.total > 0, 2.0 * self.intersection / ops.maximum(self.total, 1.0), 1.0)

    def reset_state(self):
        self.intersection.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "class_id": self.class_id, "class_name": self.class_name}
