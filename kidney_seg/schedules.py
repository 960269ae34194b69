"""Optimizers and learning-rate schedules (``training.optimizer``, ``training.lr_schedule``).

Two optimizers: ``adam`` (the paper) and ``sgd``, SGD with Nesterov momentum 0.99 and
L2 weight decay 3e-5 as nnU-Net v2 configures it (``nnunetv2/training/nnUNetTrainer/
nnUNetTrainer.py``, ``configure_optimizers``: ``torch.optim.SGD(params, lr,
weight_decay=3e-5, momentum=0.99, nesterov=True)``). :class:`TorchSGD` is that update
rule written in Keras ops: the decay is added to the gradient before momentum (coupled
L2), unlike the decoupled ``weight_decay`` of Keras' own optimizers.

Two schedules: ``plateau``, the paper's ReduceLROnPlateau on the validation loss, its
counters replayed from the history on resume (:func:`kidney_seg.checkpoint.replay_plateau`);
and ``poly``, ``lr = learning_rate * (1 - epoch / epochs) ** 0.9`` set at the start of
each 0-based epoch, as ``nnunetv2/training/lr_scheduler/polylr.py`` computes it and
``nnUNetTrainer.on_train_epoch_start`` steps it. Poly is a function of the epoch number
alone, so a resumed run sets the same rates; it depends on ``epochs``, which therefore
joins the resume key (:func:`lr_depends_on_epochs`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import keras
from keras import ops

if TYPE_CHECKING:
    import pandas as pd

POLY_EXPONENT = 0.9  # nnunetv2/training/lr_scheduler/polylr.py
SGD_MOMENTUM = 0.99  # nnUNetTrainer.configure_optimizers
SGD_WEIGHT_DECAY = 3e-5  # nnUNetTrainer.__init__: self.weight_decay
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("plateau", "poly")


@keras.saving.register_keras_serializable(package="kidney_seg")
class TorchSGD(keras.optimizers.Optimizer):
    """torch.optim.SGD's update (dampening 0): ``g += l2 * w; buf = m * buf + g; w -= lr * (g + m * buf)`` (Nesterov).

    Unlike ``keras.optimizers.SGD``, the buffer holds raw gradients and the current rate
    scales the whole step, and the L2 term passes through the momentum, as in PyTorch.
    """

    def __init__(
        self,
        learning_rate: float = 0.01,
        momentum: float = SGD_MOMENTUM,
        nesterov: bool = True,
        l2: float = 0.0,
        name: str = "torch_sgd",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.l2 = float(l2)

    def build(self, variables) -> None:
        """Create one momentum buffer per trainable variable."""
        if self.built:
            return
        super().build(variables)
        self.buffers = self.add_optimizer_variables(variables, "momentum_buffer")

    def update_step(self, gradient, variable, learning_rate) -> None:
        """One PyTorch SGD step for one variable."""
        lr = ops.cast(learning_rate, variable.dtype)
        grad = ops.cast(gradient, variable.dtype)
        if self.l2:
            grad = ops.add(grad, ops.multiply(ops.cast(self.l2, variable.dtype), variable))
        buf = self.buffers[self._get_variable_index(variable)]
        momentum = ops.cast(self.momentum, variable.dtype)
        self.assign(buf, ops.add(ops.multiply(buf, momentum), grad))
        step = ops.add(grad, ops.multiply(buf, momentum)) if self.nesterov else buf
        self.assign_sub(variable, ops.multiply(step, lr))

    def get_config(self) -> dict:
        """The constructor arguments, for saving with a checkpoint."""
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov, "l2": self.l2}


def make_optimizer(train_cfg: dict) -> keras.optimizers.Optimizer:
    """The configured optimizer at ``learning_rate``; it clips the global gradient norm to ``gradient_clip_norm``."""
    kind, lr, clip = train_cfg["optimizer"], train_cfg["learning_rate"], train_cfg["gradient_clip_norm"]
    if kind == "adam":
        return keras.optimizers.Adam(learning_rate=lr, global_clipnorm=clip)
    if kind == "sgd":
        return TorchSGD(lr, SGD_MOMENTUM, nesterov=True, l2=SGD_WEIGHT_DECAY, global_clipnorm=clip)
    raise ValueError(f"unknown optimizer {kind!r} (expected one of {OPTIMIZERS})")


def poly_lr(initial_lr: float, epoch: int, epochs: int) -> float:
    """The poly rate of 0-based ``epoch`` of ``epochs``: ``initial_lr * (1 - epoch / epochs) ** 0.9``."""
    return float(initial_lr * (1 - epoch / epochs) ** POLY_EXPONENT)


def lr_depends_on_epochs(train_cfg: dict) -> bool:
    """Whether the total number of epochs changes the rates (then raising it cannot extend a run)."""
    if train_cfg["lr_schedule"] not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {train_cfg['lr_schedule']!r} (expected one of {LR_SCHEDULES})")
    return train_cfg["lr_schedule"] == "poly"


def plateau_callback(train_cfg: dict, history: pd.DataFrame) -> keras.callbacks.Callback:
    """The paper's ReduceLROnPlateau on the validation loss, its counters restored from ``history`` when resuming."""
    from kidney_seg.checkpoint import replay_plateau

    class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            replay_plateau(self, history, train_cfg["learning_rate"])

    return ResumableReduceLROnPlateau(
        monitor="val_loss",
        factor=train_cfg["lr_factor"],
        patience=train_cfg["lr_patience"],
        min_delta=train_cfg["lr_min_delta"],
        min_lr=train_cfg["min_lr"],
    )


def poly_callback(train_cfg: dict) -> keras.callbacks.Callback:
    """Sets the poly rate at the start of every epoch (stateless: a resumed run needs nothing restored)."""
    initial, epochs = train_cfg["learning_rate"], train_cfg["epochs"]
    return keras.callbacks.LearningRateScheduler(lambda epoch, lr: poly_lr(initial, epoch, epochs))


def lr_callback(train_cfg: dict, history: pd.DataFrame) -> keras.callbacks.Callback:
    """The callback of the configured ``lr_schedule``; ``history`` holds the epochs a resumed run has done."""
    if lr_depends_on_epochs(train_cfg):
        return poly_callback(train_cfg)
    return plateau_callback(train_cfg, history)
