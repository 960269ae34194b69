"""Training: Adam, ReduceLROnPlateau on validation loss, best/last checkpoints, resume.

Outputs in ``model_dir``: ``model.keras`` (best validation loss), ``history.csv`` (one row
per epoch), ``curves.png`` (the report's training-curve panels) and ``inference.json``
(everything ``predict`` needs to preprocess a new scan).
While training runs, ``checkpoint_dir`` holds ``last.keras`` (with optimizer state),
``best.keras`` and ``history.csv``. It is kept apart from the declared outputs, which
Snakemake deletes before rerunning a job, so a killed run resumes from its last epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pandas as pd

from kidney_seg.config import class_names
from kidney_seg.io import atomic_path, write_json_atomic

if TYPE_CHECKING:
    from kidney_seg.sampling import StreamSpec

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "lr", "loss", "val_loss", "seconds")
TRAINING_MODULES = ("model.py", "losses.py", "sampling.py", "training.py")
MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
STREAM_ONLY_KEYS = ("epochs", "num_workers")  # settings that cannot change the trained weights


def configure_threads(threads: int | None) -> None:
    """Limit the backend's CPU threads to what the scheduler granted."""
    if not threads:
        return
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(min(2, int(threads)))
        except RuntimeError:  # runtime already initialised
            log.warning("could not set TensorFlow thread counts; the runtime was already initialised")


def read_history(path: Path) -> pd.DataFrame:
    """The training log so far, or an empty frame."""
    if path.is_file() and path.stat().st_size:
        return pd.read_csv(path)
    return pd.DataFrame(columns=list(HISTORY_COLUMNS))


def write_history(df: pd.DataFrame, path: Path) -> None:
    """Write the training log atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_curves(history: pd.DataFrame, path: Path) -> None:
    """Draw the report's training-curve panels to a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from kidney_seg.report.html import history_figure

    fig = history_figure(history)
    if fig is None:
        fig = Figure(figsize=(4.2, 3.0))
        fig.text(0.5, 0.5, "no training history to plot", ha="center", va="center")
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


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


def make_strategy(choice: str = "auto"):
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


def _current_lr(model) -> float:
    """The optimizer's learning rate as a float."""
    import keras

    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def make_epoch_logger(state_dir: Path, history: pd.DataFrame):
    """A callback that saves last.keras and appends to history.csv after every epoch."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows = history.to_dict("records")
            self.t0 = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            row = {"epoch": epoch + 1, "lr": _current_lr(self.model), "loss": logs.get("loss"),
                   "val_loss": logs.get("val_loss"), "seconds": round(time.perf_counter() - self.t0, 3)}
            row.update({k: float(v) for k, v in logs.items() if k.startswith("val_dice_")})
            self.rows.append(row)
            with atomic_path(state_dir / "last.keras") as tmp:
                self.model.save(tmp)
            write_history(pd.DataFrame(self.rows), state_dir / "history.csv")
            log.info("epoch %d: %s", epoch + 1, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})

    return EpochLogger()


def make_best_checkpoint(state_dir: Path, history: pd.DataFrame):
    """A callback that keeps the weights with the lowest validation loss in best.keras."""
    import keras

    class BestCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = float(history["val_loss"].min()) if len(history) else math.inf

        def on_epoch_end(self, epoch, logs=None):
            val = float((logs or {}).get("val_loss", math.inf))
            if val < self.best or not (state_dir / "best.keras").exists():
                self.best = min(val, self.best)
                with atomic_path(state_dir / "best.keras") as tmp:
                    self.model.save(tmp)

    return BestCheckpoint()


def output_activation(train_cfg: dict) -> str:
    """The configured output activation; configs that predate the option mean softmax."""
    return train_cfg.get("output_activation", "softmax")


def compile_model(model, num_classes: int, train_cfg: dict) -> None:
    """Attach Adam, the loss of the configured output activation and per-class Dice metrics.

    softmax: Dice + CE over all classes (the paper); sigmoid: the sigmoid counterpart,
    Dice + binary CE over the foreground classes.
    """
    import keras

    from kidney_seg.losses import DiceCELoss, HardDice, SigmoidDiceBCELoss

    activation = output_activation(train_cfg)
    if activation == "softmax":
        loss = DiceCELoss(num_classes, include_background=train_cfg["dice_include_background"])
    elif activation == "sigmoid":
        loss = SigmoidDiceBCELoss(num_classes)
    else:
        raise ValueError(f"unknown output_activation {activation!r}")
    names = class_names(num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=train_cfg["learning_rate"]),
        loss=loss,
        metrics=[HardDice(c, names[c], activation=activation) for c in range(1, num_classes)],
        jit_compile=bool(train_cfg.get("jit_compile", False)),
    )


def restore_or_build(state_dir: Path, model_cfg: dict, train_cfg: dict, num_classes: int, history: pd.DataFrame):
    """Resume from last.keras when a previous run left one; otherwise build a fresh model."""
    from kidney_seg.model import build_from_config, load_model

    last = state_dir / "last.keras"
    if last.is_file() and len(history):
        log.info("resuming from %s after epoch %d", last, len(history))
        return load_model(last), int(len(history))
    model = build_from_config(model_cfg, num_classes, output_activation(train_cfg))
    compile_model(model, num_classes, train_cfg)
    return model, 0


def inference_settings(preprocessing: dict, train_cfg: dict, num_classes: int, labels) -> dict:
    """What predict needs besides the weights: the resolved preprocessing, classes, patch size and output activation."""
    return {**preprocessing, "num_classes": num_classes, "labels": list(labels), "patch_size": list(train_cfg["patch_size"]),
            "output_activation": output_activation(train_cfg)}


def train(
    train_dirs: list[str | os.PathLike],
    val_dirs: list[str | os.PathLike],
    model_dir: str | os.PathLike,
    model_cfg: dict,
    train_cfg: dict,
    preprocessing: dict,
    labels: tuple[int, ...],
    seed: int,
    checkpoint_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Train (or resume training) the U-Net, publish the best model, return the history.

    ``preprocessing`` is the resolved preprocessing (concrete clip window, normalisation
    statistics) the slice cache was made with; it is stored for prediction.
    """
    configure_threads(threads)
    import keras

    from kidney_seg.sampling import load_case

    model_dir = Path(model_dir)
    state_dir = Path(checkpoint_dir) if checkpoint_dir else model_dir / "checkpoint"
    state_dir.mkdir(parents=True, exist_ok=True)
    num_classes = len(labels)
    keras.utils.set_random_seed(seed)
    train_cases = [load_case(d) for d in train_dirs]
    val_cases = [load_case(d) for d in val_dirs]
    if not train_cases or not val_cases:
        raise ValueError("training needs at least one training and one validation case")
    reset_stale_state(state_dir, run_fingerprint(train_dirs, val_dirs, model_cfg, train_cfg, preprocessing, labels, seed))
    history = read_history(state_dir / "history.csv")
    strategy = make_strategy(train_cfg.get("distribute", "auto"))
    if strategy is not None:
        log.info("distribute: %s with num_replicas_in_sync == %d (global batch %d)", type(strategy).__name__,
                 strategy.num_replicas_in_sync, train_cfg["batch_size"])
    with precision_policy(train_cfg.get("mixed_precision")):
        with strategy_scope(strategy):
            model, initial_epoch = restore_or_build(state_dir, model_cfg, train_cfg, num_classes, history)
        if initial_epoch < train_cfg["epochs"]:
            fit(model, train_cases, val_cases, train_cfg, seed, initial_epoch, state_dir, history,
                [str(d) for d in train_dirs])
        else:
            log.info("training already complete (%d epochs)", initial_epoch)
    return publish(state_dir, model_dir, inference_settings(preprocessing, train_cfg, num_classes, labels))


def run_fingerprint(train_dirs, val_dirs, model_cfg, train_cfg, preprocessing, labels, seed) -> dict:
    """What a checkpoint must match to be resumed: settings (but epochs, which may grow), cases, cache files, code."""
    def stamp(d):
        return [str(d)] + [os.stat(Path(d) / f).st_mtime_ns for f in ("image.npy", "label.npy", "meta.json")]

    return json.loads(json.dumps({
        "model": model_cfg, "training": {k: v for k, v in train_cfg.items() if k not in STREAM_ONLY_KEYS}, "preprocessing": preprocessing, "labels": list(labels),
        "seed": seed, "train": [stamp(d) for d in train_dirs], "val": [stamp(d) for d in val_dirs], "code": code_digest(),
    }))


def code_digest() -> str:
    """SHA-256 of the library modules that shape training, so edited code never resumes an old run."""
    digest = hashlib.sha256()
    for name in TRAINING_MODULES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def reset_stale_state(state_dir: Path, fingerprint: dict) -> None:
    """Discard checkpoints left by a run with other settings or inputs."""
    path = state_dir / "fingerprint.json"
    if path.is_file() and json.loads(path.read_text()) != fingerprint:
        log.info("settings or inputs changed since the checkpoint in %s: starting afresh", state_dir)
        for name in ("last.keras", "best.keras", "history.csv"):
            (state_dir / name).unlink(missing_ok=True)
    write_json_atomic(path, fingerprint)


def publish(state_dir: Path, model_dir: Path, settings: dict) -> pd.DataFrame:
    """Copy the best model, the history and where it was trained (environment.json) to the declared outputs, atomically."""
    from kidney_seg.environment import write_environment

    with atomic_path(model_dir / "model.keras") as tmp:
        shutil.copyfile(state_dir / "best.keras", tmp)
    history = read_history(state_dir / "history.csv")
    write_history(history, model_dir / "history.csv")
    write_curves(history, model_dir / "curves.png")
    write_json_atomic(model_dir / "inference.json", settings)
    write_environment(model_dir / "environment.json", accelerators=True)
    return history


def stream_spec(train_dirs: list[str], train_cfg: dict, seed: int) -> "StreamSpec":
    """The picklable description of the training batch stream."""
    from kidney_seg.sampling import StreamSpec

    return StreamSpec(tuple(train_dirs), tuple(train_cfg["patch_size"]), tuple(train_cfg["scale_range"]), train_cfg["p_scale"],
                      train_cfg["p_mirror"], train_cfg["batch_size"], train_cfg["foreground_per_batch"], seed,
                      train_cfg["tumor_per_batch"])


def fit(model, train_cases, val_cases, train_cfg: dict, seed: int, initial_epoch: int, state_dir: Path, history,
        train_dirs: list[str]) -> None:
    """Run model.fit from ``initial_epoch`` with the paper's callbacks; batches come from background workers."""
    import keras

    from kidney_seg.sampling import BatchLoader, validation_set

    x_val, y_val = validation_set(val_cases, train_cfg["val_slices"], train_cfg["patch_size"], seed)
    log.info("%d train cases, %d val cases, %d val slices; epochs %d-%d x %d steps",
             len(train_cases), len(val_cases), len(x_val), initial_epoch + 1, train_cfg["epochs"], train_cfg["steps_per_epoch"])
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=train_cfg["lr_factor"], patience=train_cfg["lr_patience"],
                                          min_delta=train_cfg["lr_min_delta"], min_lr=train_cfg["min_lr"]),
        make_best_checkpoint(state_dir, history),
        make_epoch_logger(state_dir, history),
    ]
    loader = BatchLoader(stream_spec(train_dirs, train_cfg, seed), start=initial_epoch * train_cfg["steps_per_epoch"],
                         num_workers=train_cfg.get("num_workers", 1))
    with loader:  # try/finally: the worker pool is shut down however fit ends
        model.fit(loader.batches(), steps_per_epoch=train_cfg["steps_per_epoch"], epochs=train_cfg["epochs"],
                  initial_epoch=initial_epoch, shuffle=False, validation_data=(x_val, y_val),
                  validation_batch_size=train_cfg["batch_size"], callbacks=callbacks, verbose=2)
