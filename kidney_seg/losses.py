"""Soft Dice + cross-entropy from logits with sparse labels (the paper's loss), and Dice metrics.

Three output layouts exist (``training.output_activation``): ``softmax``, one logit per
class (the paper); ``sigmoid``, the paper's "sigmoid counterpart" with one logit per
foreground class, each a binary "voxel belongs to class c" decision
(:class:`SigmoidDiceBCELoss`); and ``regions``, one logit per nested region "label >= c"
(KiTS19: kidney+tumour, tumour), nnU-Net's region-based training for KiTS, where a voxel
takes the highest region whose sigmoid exceeds 0.5 (nnU-Net v2's
``LabelManager.convert_probabilities_to_segmentation``).

Dice is computed over the whole batch ("batch Dice"), per class,
then averaged over classes (background included or not by config); smooth = 1e-5.
Loss = (1 - mean soft Dice) + mean sparse categorical cross-entropy. Everything is
computed in float32, whatever the compute dtype of the model.
"""

from __future__ import annotations

import keras
from keras import ops

from kidney_seg.plan import OUTPUT_ACTIVATIONS


def _prepare(y_true, y_pred, num_classes: int):
    """Cast logits to float32 and one-hot the sparse labels."""
    logits = ops.cast(y_pred, "float32")
    labels = ops.cast(y_true, "int32")
    if len(labels.shape) == len(logits.shape):
        labels = ops.squeeze(labels, axis=-1)
    return logits, labels, ops.one_hot(labels, num_classes, dtype="float32")


def region_targets(onehot):
    """Nested region targets of one-hot labels: region c (c = 1..C-1) is "label >= c" (kidney+tumour, tumour)."""
    return ops.flip(ops.cumsum(ops.flip(onehot, axis=-1), axis=-1), axis=-1)[..., 1:]


def soft_dice_per_class(onehot, probs, smooth: float = 1e-5):
    """Soft Dice of each class over batch and pixels."""
    axes = tuple(range(len(probs.shape) - 1))
    intersection = ops.sum(onehot * probs, axis=axes)
    denominator = ops.sum(onehot, axis=axes) + ops.sum(probs, axis=axes)
    return (2.0 * intersection + smooth) / (denominator + smooth)


@keras.saving.register_keras_serializable(package="kidney_seg")
class DiceCELoss(keras.losses.Loss):
    """(1 - mean soft Dice) + sparse cross-entropy, both from logits."""

    def __init__(
        self, num_classes: int = 3, include_background: bool = True, smooth: float = 1e-5, name="dice_ce", **kwargs
    ):
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
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "include_background": self.include_background,
            "smooth": self.smooth,
        }


@keras.saving.register_keras_serializable(package="kidney_seg")
class SigmoidDiceBCELoss(keras.losses.Loss):
    """The sigmoid counterpart: one logit per foreground class c = 1..C-1, target ``label == c``;
    with ``regions``, one logit per nested region, target ``label >= c`` (:func:`region_targets`).

    Loss = (1 - mean over outputs of the batch soft Dice of sigmoid(logits))
    + mean binary cross-entropy from logits (over pixels and outputs).
    """

    def __init__(
        self, num_classes: int = 3, smooth: float = 1e-5, regions: bool = False, name="sigmoid_dice_bce", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.smooth = smooth
        self.regions = regions

    def call(self, y_true, y_pred):
        logits, _, onehot = _prepare(y_true, y_pred, self.num_classes)
        targets = region_targets(onehot) if self.regions else onehot[..., 1:]
        probs = ops.sigmoid(logits)
        dice = soft_dice_per_class(targets, probs, self.smooth)
        bce = ops.mean(keras.losses.binary_crossentropy(targets, logits, from_logits=True))
        return (1.0 - ops.mean(dice)) + bce

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "smooth": self.smooth,
            "regions": self.regions,
        }


@keras.saving.register_keras_serializable(package="kidney_seg")
class DeepSupervisionLoss(keras.losses.Loss):
    """nnU-Net's deep supervision: ``loss`` on the full-resolution logits and on each auxiliary output, weighted.

    ``y_pred`` is a deep-supervised model's packed output (:func:`kidney_seg.model.deep_supervised`):
    ``channels`` logits at full resolution, then ``channels`` per scale s, each upsampled (nearest) by s
    from a 1/s grid. Taking every s-th pixel from offset s // 2 gives back that grid's logits and the
    labels downsampled to it as PyTorch's ``nearest-exact`` does (nnU-Net v2's DownsampleSegForDSTransform).
    """

    def __init__(self, loss=None, channels: int = 3, scales=(), weights=(1.0,), name="deep_supervision", **kwargs):
        super().__init__(name=name, **kwargs)
        self.loss = loss if isinstance(loss, keras.losses.Loss) else keras.saving.deserialize_keras_object(loss)
        self.channels = int(channels)
        self.scales = tuple(int(s) for s in scales)
        self.weights = tuple(float(w) for w in weights)
        if len(self.weights) != len(self.scales) + 1:
            raise ValueError(f"{len(self.scales)} auxiliary scales need {len(self.scales) + 1} weights, got {weights}")

    def call(self, y_true, y_pred):
        c = self.channels
        total = self.weights[0] * self.loss.call(y_true, y_pred[..., :c])
        for i, s in enumerate(self.scales, start=1):
            off = s // 2
            coarse = y_pred[:, off::s, off::s, i * c : (i + 1) * c]
            total = total + self.weights[i] * self.loss.call(y_true[:, off::s, off::s], coarse)
        return total

    def get_config(self):
        return {
            **super().get_config(),
            "loss": keras.saving.serialize_keras_object(self.loss),
            "channels": self.channels,
            "scales": list(self.scales),
            "weights": list(self.weights),
        }


ACTIVATIONS = OUTPUT_ACTIVATIONS


def hard_labels(logits, activation: str = "softmax"):
    """Integer labels of logits: argmax (softmax); for sigmoid logits (one per foreground
    class) the foreground class of highest probability where it exceeds 0.5, else 0; for
    region logits the highest region c whose probability exceeds 0.5, else 0."""
    if activation == "softmax":
        return ops.argmax(logits, axis=-1)
    if activation == "sigmoid":
        best = ops.cast(ops.argmax(logits, axis=-1), "int32") + 1
        return ops.where(ops.max(logits, axis=-1) > 0, best, ops.zeros_like(best))
    if activation == "regions":
        labels = ops.zeros_like(ops.cast(logits[..., 0], "int32"))
        for c in range(logits.shape[-1]):
            labels = ops.where(logits[..., c] > 0, c + 1, labels)
        return labels
    raise ValueError(f"unknown activation {activation!r}")


@keras.saving.register_keras_serializable(package="kidney_seg")
class HardDice(keras.metrics.Metric):
    """Dice of one class of the hard prediction (:func:`hard_labels`), accumulated over an epoch."""

    def __init__(
        self,
        class_id: int,
        class_name: str | None = None,
        name: str | None = None,
        activation: str = "softmax",
        channels: int | None = None,
        **kwargs,
    ):
        super().__init__(name=name or f"dice_{class_name or class_id}", **kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        self.class_id = class_id
        self.class_name = class_name
        self.activation = activation
        self.channels = channels  # the first logits of a packed deep-supervised output; None = all
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = ops.cast(y_true, "int32")
        if len(labels.shape) == len(y_pred.shape):
            labels = ops.squeeze(labels, axis=-1)
        truth = ops.cast(ops.equal(labels, self.class_id), "float32")
        if self.channels is not None:
            y_pred = y_pred[..., : self.channels]
        pred = ops.cast(
            ops.equal(ops.cast(hard_labels(ops.cast(y_pred, "float32"), self.activation), "int32"), self.class_id),
            "float32",
        )
        self.intersection.assign_add(ops.sum(truth * pred))
        self.total.assign_add(ops.sum(truth) + ops.sum(pred))

    def result(self):
        return ops.where(self.total > 0, 2.0 * self.intersection / ops.maximum(self.total, 1.0), 1.0)

    def reset_state(self):
        self.intersection.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {
            **super().get_config(),
            "class_id": self.class_id,
            "class_name": self.class_name,
            "activation": self.activation,
            "channels": self.channels,
        }
