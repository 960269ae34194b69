"""Training: the paper's Adam and ReduceLROnPlateau (or SGD, poly: :mod:`kidney_seg.schedules`), checkpoints, resume.

Outputs in ``model_dir``: ``model.keras`` (best validation loss, or the last epoch with
``training.publish: final``; the plain U-Net without the heads when
``model.deep_supervision`` trained some), ``history.csv`` (one row per epoch),
``curves.png`` (the training-curve panels, :mod:`kidney_seg.curves`) and ``inference.json``
(a copy of the plan, :mod:`kidney_seg.plan`: everything ``predict`` needs to preprocess a
new scan).
While training runs, ``checkpoint_dir`` holds the checkpoints (:mod:`kidney_seg.checkpoint`).
It is kept apart from the declared outputs, which Snakemake deletes before rerunning a
job, so a killed run resumes from its last epoch.

A resumed run continues exactly as the uninterrupted one would have: ``last.keras`` is the
truth, the history is cut back to its epochs, a best checkpoint that lags behind is brought
up to date, and the state that callbacks carry from epoch to epoch (ReduceLROnPlateau's
best value, wait and cooldown counters, the best-checkpoint tracker) is rebuilt from the
history; the poly schedule is a function of the epoch number and needs none. The batch
stream restarts at the right step (:mod:`kidney_seg.sampling`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from kidney_seg.atomic import atomic_path, write_json_atomic
from kidney_seg.checkpoint import (
    STATE_FILES,
    best_so_far,
    checkpoint_epoch,
    discard_checkpoints,
    make_checkpointer,
    read_history,
    remove_partial_files,
    reset_stale_state,
    resume_key,
    write_history,
)
from kidney_seg.curves import write_curves
from kidney_seg.environment import configure_threads
from kidney_seg.plan import check_training_agrees
from kidney_seg.vocabulary import class_names

if TYPE_CHECKING:
    from kidney_seg.sampling import StreamSpec

log = logging.getLogger(__name__)

MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
PUBLISHED_FILES = ("model.keras", "history.csv", "curves.png", "inference.json", "environment.json")  # in model_dir


@contextmanager
def precision_policy(mixed_precision: str | None) -> Iterator[None]:
    """Set Keras' global dtype policy for ``mixed_precision`` (None = leave it) and restore it afterwards."""
    import keras

    if not mixed_precision:
        yield
        return
    if mixed_precision not in MIXED_POLICIES:
        raise ValueError(f"unknown mixed_precision {mixed_precision!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(MIXED_POLICIES[mixed_precision])
    log.info("mixed precision: global dtype policy %s", MIXED_POLICIES[mixed_precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _mirrored_devices() -> list[str]:
    """The devices MirroredStrategy would replicate over: all GPUs, else all logical CPUs."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def make_strategy(choice: str):
    """A tf.distribute.MirroredStrategy for ``choice`` ("auto", "none", "mirrored"), or None."""
    import keras

    if choice not in ("auto", "none", "mirrored"):
        raise ValueError(f"unknown distribute {choice!r}")
    if choice == "none" or keras.backend.backend() != "tensorflow":
        if choice == "mirrored":
            log.warning("distribute: mirrored needs the TensorFlow backend; training without a strategy")
        return None
    import tensorflow as tf

    if choice == "auto":
        if len(tf.config.list_physical_devices("GPU")) < 2:
            return None
        return tf.distribute.MirroredStrategy()
    devices = _mirrored_devices()
    if tf.config.list_logical_devices("GPU"):
        return tf.distribute.MirroredStrategy(devices)
    if len(devices) < 2:
        log.warning("distribute: mirrored found no GPU and a single CPU device; training without a strategy")
        return None
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())


def strategy_scope(strategy):
    """The strategy's scope, or a no-op context without one."""
    return strategy.scope() if strategy is not None else nullcontext()


def make_lr_schedule(train_cfg: dict, history: pd.DataFrame):
    """The callback of ``training.lr_schedule`` (:mod:`kidney_seg.schedules`), resumable from ``history``."""
    from kidney_seg.schedules import lr_callback

    return lr_callback(train_cfg, history)


def compile_model(model, num_classes: int, train_cfg: dict) -> None:
    """Attach the configured optimizer (:mod:`kidney_seg.schedules`), the activation's loss and Dice metrics.

    softmax: Dice + CE over all classes (the paper); sigmoid: the sigmoid counterpart,
    Dice + binary CE over the foreground classes; regions: the same over the nested regions.
    """
    from kidney_seg.losses import DeepSupervisionLoss, DiceCELoss, HardDice, SigmoidDiceBCELoss
    from kidney_seg.model import deep_supervision_weights, output_channels, supervision_scales
    from kidney_seg.schedules import make_optimizer

    activation = train_cfg["output_activation"]
    if activation == "softmax":
        loss = DiceCELoss(num_classes, include_background=train_cfg["dice_include_background"])
    elif activation in ("sigmoid", "regions"):
        loss = SigmoidDiceBCELoss(num_classes, regions=activation == "regions")
    else:
        raise ValueError(f"unknown output_activation {activation!r}")
    scales, channels = supervision_scales(model), None
    if scales:  # a deep-supervised training model: the loss on every output, the metrics on the full resolution's
        channels = output_channels(num_classes, activation)
        loss = DeepSupervisionLoss(loss, channels, scales, deep_supervision_weights(len(scales)))
    names = class_names(tuple(range(num_classes)))
    model.compile(
        optimizer=make_optimizer(train_cfg),
        loss=loss,
        metrics=[HardDice(c, names[c], activation=activation, channels=channels) for c in range(1, num_classes)],
        jit_compile=train_cfg["jit_compile"],
    )


def restore_or_build(state_dir: Path, model_cfg: dict, train_cfg: dict, num_classes: int, history: pd.DataFrame):
    """Resume from last.keras when a previous run left one; otherwise build a fresh model.

    Returns the model, the history of the epochs it holds and that number of epochs. The
    history can be one epoch ahead of last.keras (killed between the two writes): it is cut
    back, and that epoch is trained again. A best.keras that lags (killed before the copy)
    is brought up to date from last.keras.
    """
    from kidney_seg.model import build_from_config, load_model

    last, best = state_dir / "last.keras", state_dir / "best.keras"
    epochs = checkpoint_epoch(last)
    if epochs and len(history) >= epochs:
        history = history.iloc[:epochs].reset_index(drop=True)
        wanted = best_so_far(history)[0]
        if checkpoint_epoch(best) != wanted and wanted == epochs:
            with atomic_path(best) as tmp:
                shutil.copyfile(last, tmp)
        if best.is_file():
            log.info("resuming from %s after epoch %d", last, epochs)
            return load_model(last), history, epochs
    if last.is_file() or len(history):
        log.info("the checkpoint in %s does not match its history: starting afresh", state_dir)
        discard_checkpoints(state_dir)
    model = build_from_config(model_cfg, num_classes, train_cfg["output_activation"], training=True)
    compile_model(model, num_classes, train_cfg)
    # The optimizer's variables made here (in the strategy's scope), not in fit's first step: fit then traces
    # its train step once, not twice (about 1.5 s of a tiny model's 4 s train(); the weights are bitwise the same).
    model.optimizer.build(model.trainable_variables)
    return model, history.iloc[:0], 0


def train(
    train_dirs: list[str | os.PathLike],
    val_dirs: list[str | os.PathLike],
    model_dir: str | os.PathLike,
    model_cfg: dict,
    train_cfg: dict,
    plan: dict,
    seed: int,
    checkpoint_dir: str | os.PathLike | None = None,
    threads: int | None = None,
    deterministic: bool = False,
) -> pd.DataFrame:
    """Train (or resume training) the U-Net, publish the best or final model (``publish``), return the history.

    ``model_cfg`` and ``train_cfg`` are validated config sections; ``plan`` is the plan
    (:mod:`kidney_seg.plan`) the slice cache was made with: its classes and output
    activation shape the model, and it is published as ``inference.json`` for prediction.
    ``deterministic`` makes the framework's ops deterministic and single-threaded
    (:func:`kidney_seg.determinism.enable`): bitwise-repeatable, and slower.
    """
    configure_threads(threads)
    if deterministic:
        from kidney_seg.determinism import enable

        enable(seed)
    import keras

    from kidney_seg.sampling import load_case

    model_dir = Path(model_dir)
    state_dir = Path(checkpoint_dir) if checkpoint_dir else model_dir / "checkpoint"
    state_dir.mkdir(parents=True, exist_ok=True)
    check_training_agrees(plan, train_cfg)
    num_classes = plan["num_classes"]
    keras.utils.set_random_seed(seed)
    train_cases = [load_case(d) for d in train_dirs]
    val_cases = [load_case(d) for d in val_dirs]
    if not train_cases or not val_cases:
        raise ValueError("training needs at least one training and one validation case")
    remove_partial_files(state_dir, STATE_FILES)
    remove_partial_files(model_dir, PUBLISHED_FILES)
    reset_stale_state(state_dir, resume_key(train_dirs, val_dirs, model_cfg, train_cfg, plan, seed, deterministic))
    history = read_history(state_dir / "history.csv")
    strategy = make_strategy(train_cfg["distribute"])
    if strategy is not None:
        log.info(
            "distribute: %s with num_replicas_in_sync == %d (global batch %d)",
            type(strategy).__name__,
            strategy.num_replicas_in_sync,
            train_cfg["batch_size"],
        )
    with precision_policy(train_cfg["mixed_precision"]):
        with strategy_scope(strategy):
            model, history, initial_epoch = restore_or_build(state_dir, model_cfg, train_cfg, num_classes, history)
        if initial_epoch < train_cfg["epochs"]:
            fit(
                model,
                train_cases,
                val_cases,
                train_cfg,
                seed,
                initial_epoch,
                state_dir,
                history,
                [str(d) for d in train_dirs],
            )
        else:
            log.info("training already complete (%d epochs)", initial_epoch)
    return publish(state_dir, model_dir, plan, train_cfg["publish"])


def publish(state_dir: Path, model_dir: Path, plan: dict, which: str = "best") -> pd.DataFrame:
    """Copy the ``which`` model (best or final), history, plan (inference.json) and environment to the declared
    outputs, atomically.

    The environment (environment.json) records where the model was trained.
    """
    from kidney_seg.environment import write_environment

    if which not in ("best", "final"):
        raise ValueError(f"training.publish must be 'best' or 'final', got {which!r}")
    publish_model(state_dir / ("last.keras" if which == "final" else "best.keras"), model_dir / "model.keras")
    history = read_history(state_dir / "history.csv")
    write_history(history, model_dir / "history.csv")
    write_curves(history, model_dir / "curves.png")
    write_json_atomic(model_dir / "inference.json", plan)
    write_environment(model_dir / "environment.json", accelerators=True)
    return history


def publish_model(checkpoint: Path, out: Path) -> None:
    """A checkpoint as the published model, atomically: a copy, or the plain U-Net of a deep-supervised one."""
    from kidney_seg.model import inference_model, load_model

    with atomic_path(out) as tmp:
        if _has_deep_supervision(checkpoint):
            inference_model(load_model(checkpoint, compile=False)).save(tmp)
        else:
            shutil.copyfile(checkpoint, tmp)


def _has_deep_supervision(path: Path) -> bool:
    """Whether a saved model holds deep supervision heads (read from its config, without building it)."""
    import zipfile

    if not zipfile.is_zipfile(path):  # not a Keras archive: published as it is, as any other
        return False
    with zipfile.ZipFile(path) as archive:
        return "config.json" in archive.namelist() and '"ds_packed"' in archive.read("config.json").decode("utf-8")


def stream_spec(train_dirs: list[str], train_cfg: dict, seed: int) -> StreamSpec:
    """The picklable description of the training batch stream."""
    from kidney_seg.augmentation import Augmentation
    from kidney_seg.sampling import StreamSpec

    return StreamSpec(
        tuple(train_dirs),
        tuple(train_cfg["patch_size"]),
        tuple(train_cfg["scale_range"]),
        train_cfg["p_scale"],
        train_cfg["p_mirror"],
        train_cfg["batch_size"],
        train_cfg["foreground_per_batch"],
        seed,
        train_cfg["tumor_per_batch"],
        train_cfg["crop"],
        Augmentation.from_config(train_cfg["augmentation"]),
    )


def fit(
    model,
    train_cases,
    val_cases,
    train_cfg: dict,
    seed: int,
    initial_epoch: int,
    state_dir: Path,
    history,
    train_dirs: list[str],
) -> None:
    """Run model.fit from ``initial_epoch`` with the rate and checkpoint callbacks; batches come from workers."""
    from kidney_seg.sampling import BatchLoader, validation_set

    x_val, y_val = validation_set(val_cases, train_cfg["val_slices"], train_cfg["patch_size"], seed)
    log.info(
        "%d train cases, %d val cases, %d val slices; epochs %d-%d x %d steps",
        len(train_cases),
        len(val_cases),
        len(x_val),
        initial_epoch + 1,
        train_cfg["epochs"],
        train_cfg["steps_per_epoch"],
    )
    # the checkpoint comes last: it holds the learning rate as the schedule left it after the epoch
    callbacks = [make_lr_schedule(train_cfg, history), make_checkpointer(state_dir, history)]
    loader = BatchLoader(
        stream_spec(train_dirs, train_cfg, seed),
        start=initial_epoch * train_cfg["steps_per_epoch"],
        num_workers=train_cfg["num_workers"],
    )
    with loader:  # try/finally: the worker pool is shut down however fit ends
        model.fit(
            loader.batches(),
            steps_per_epoch=train_cfg["steps_per_epoch"],
            epochs=train_cfg["epochs"],
            initial_epoch=initial_epoch,
            shuffle=False,
            validation_data=(x_val, y_val),
            validation_batch_size=train_cfg["batch_size"],
            callbacks=callbacks,
            verbose=2,
        )
