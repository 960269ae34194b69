"""Training: Adam, ReduceLROnPlateau on validation loss, best/last checkpoints, resume.

Outputs in ``model_dir``: ``model.keras`` (best validation loss), ``history.csv`` (one row
per epoch), ``curves.png`` (the report's training-curve panels) and ``inference.json``
(everything ``predict`` needs to preprocess a new scan).
While training runs, ``checkpoint_dir`` holds ``last.keras`` (with optimizer state),
``best.keras`` and ``history.csv``. It is kept apart from the declared outputs, which
Snakemake deletes before rerunning a job, so a killed run resumes from its last epoch.

A resumed run continues exactly as the uninterrupted one would have: after each epoch the
history is written first, then ``last.keras`` (which records in its archive how many
epochs it holds, :data:`CHECKPOINT_MEMBER`), then ``best.keras`` as a copy of it when the
validation loss improved. Whenever the process is killed, ``last.keras`` is the truth: the
history is cut back to its epochs, a best checkpoint that lags behind is brought up to date,
and the state that callbacks carry from epoch to epoch (ReduceLROnPlateau's best value,
wait and cooldown counters, the best-checkpoint tracker) is rebuilt from the history. The
batch stream restarts at the right step (:mod:`kidney_seg.sampling`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pandas as pd

from kidney_seg.config import class_names
from kidney_seg.atomic import atomic_path, write_json_atomic

if TYPE_CHECKING:
    from kidney_seg.sampling import StreamSpec

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "lr", "loss", "val_loss", "seconds")
TRAINING_MODULES = ("model.py", "losses.py", "sampling.py", "training.py", "determinism.py")
MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
STREAM_ONLY_KEYS = ("epochs", "num_workers")  # settings that cannot change the trained weights
# read_csv parses floats exactly by default from pandas 3 on (and deprecates the option); before, only "round_trip" does
EXACT_FLOATS = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
STATE_FILES = ("last.keras", "best.keras", "history.csv", "fingerprint.json")  # in checkpoint_dir
PUBLISHED_FILES = ("model.keras", "history.csv", "curves.png", "inference.json", "environment.json")  # in model_dir
CHECKPOINT_MEMBER = "kidney_seg_checkpoint.json"  # {"epoch": n} inside a checkpoint's .keras archive


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
        return pd.read_csv(path, **EXACT_FLOATS)  # the callbacks' state is replayed from these values
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


def save_checkpoint(model, path: Path, epoch: int) -> None:
    """Save the model with its optimizer state atomically, recording in the archive that it holds ``epoch`` epochs."""
    with atomic_path(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(CHECKPOINT_MEMBER, json.dumps({"epoch": int(epoch)}))


def checkpoint_epoch(path: Path) -> int | None:
    """The number of epochs a checkpoint holds (None: no such file, or one saved without the record)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return int(json.loads(archive.read(CHECKPOINT_MEMBER))["epoch"])
    except (FileNotFoundError, KeyError, zipfile.BadZipFile):
        return None


def best_so_far(history: pd.DataFrame) -> tuple[int, float]:
    """The epoch (1-based; 0 before any) and validation loss best.keras holds after ``history``.

    The first epoch is always kept, later ones when strictly lower (a NaN never is).
    """
    epoch, best = 0, math.inf
    for i, val in enumerate(history["val_loss"], start=1):
        val = float(val)
        if epoch == 0 or val < best:
            epoch, best = i, val
    return epoch, best


def make_checkpointer(state_dir: Path, history: pd.DataFrame):
    """A callback that commits each epoch: history.csv, then last.keras, then best.keras when val_loss improved.

    The best-loss tracker starts from ``history`` (the epochs a resumed run has done).
    """
    import keras

    class Checkpointer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows = history.to_dict("records")
            self.best = best_so_far(history)[1]
            self.t0 = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            row = {"epoch": epoch + 1, "lr": _current_lr(self.model), "loss": logs.get("loss"),
                   "val_loss": logs.get("val_loss"), "seconds": round(time.perf_counter() - self.t0, 3)}
            row.update({k: float(v) for k, v in logs.items() if k.startswith("val_dice_")})
            self.rows.append(row)
            write_history(pd.DataFrame(self.rows), state_dir / "history.csv")
            save_checkpoint(self.model, state_dir / "last.keras", epoch + 1)
            val = float(logs.get("val_loss", math.inf))
            if val < self.best or not (state_dir / "best.keras").exists():
                self.best = val
                with atomic_path(state_dir / "best.keras") as tmp:
                    shutil.copyfile(state_dir / "last.keras", tmp)
            log.info("epoch %d: %s", epoch + 1, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})

    return Checkpointer()


class _ReplayOptimizer:
    """Stands in for the optimizer while a ReduceLROnPlateau replays past epochs: holds a learning rate, nothing else."""

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate


class _ReplayModel:
    def __init__(self, learning_rate: float):
        self.optimizer = _ReplayOptimizer(learning_rate)


def replay_plateau(callback, history: pd.DataFrame, initial_lr: float) -> None:
    """Put a ReduceLROnPlateau (just reset by ``on_train_begin``) in the state it had after the epochs of ``history``.

    Keras resets its best value and its wait and cooldown counters when fit starts, so a
    resumed run would otherwise count patience from zero again. Each past epoch is fed to
    the callback's own ``on_epoch_end`` with the monitored value it saw and the learning rate
    it started that epoch with (``initial_lr``, then the previous row's ``lr``), against a
    stand-in model, so the counters follow Keras' own rules; the real optimizer, restored
    with the checkpoint, is left alone.
    """
    if not len(history):
        return
    real = getattr(callback, "_model", None)
    lr = float(np.float32(initial_lr))
    try:
        for _, row in history.iterrows():
            stand_in = _ReplayModel(lr)
            callback.set_model(stand_in)
            callback.on_epoch_end(int(row["epoch"]) - 1, {callback.monitor: float(row[callback.monitor])})
            lr = float(row["lr"])
    finally:
        callback.set_model(real)


def make_lr_schedule(train_cfg: dict, history: pd.DataFrame):
    """The paper's ReduceLROnPlateau on the validation loss, its counters restored from ``history`` when resuming."""
    import keras

    class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            replay_plateau(self, history, train_cfg["learning_rate"])

    return ResumableReduceLROnPlateau(monitor="val_loss", factor=train_cfg["lr_factor"], patience=train_cfg["lr_patience"],
                                      min_delta=train_cfg["lr_min_delta"], min_lr=train_cfg["min_lr"])


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
    """Resume from last.keras when a previous run left one; otherwise build a fresh model.

    Returns the model, the history of the epochs it holds and that number of epochs. The
    history can be one epoch ahead of last.keras (killed between the two writes): it is cut
    back, and that epoch is trained again. A best.keras that lags (killed before the copy)
    is brought up to date from last.keras.
    """
    from kidney_seg.model import build_from_config, load_model

    last, best = state_dir / "last.keras", state_dir / "best.keras"
    epochs = checkpoint_epoch(last)
    if last.is_file() and epochs is None and len(history):  # a checkpoint from before the epoch was recorded
        epochs = len(history)
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
        for name in ("last.keras", "best.keras", "history.csv"):
            (state_dir / name).unlink(missing_ok=True)
    model = build_from_config(model_cfg, num_classes, output_activation(train_cfg))
    compile_model(model, num_classes, train_cfg)
    return model, history.iloc[:0], 0


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
    deterministic: bool = False,
) -> pd.DataFrame:
    """Train (or resume training) the U-Net, publish the best model, return the history.

    ``preprocessing`` is the resolved preprocessing (concrete clip window, normalisation
    statistics) the slice cache was made with; it is stored for prediction.
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
    num_classes = len(labels)
    keras.utils.set_random_seed(seed)
    train_cases = [load_case(d) for d in train_dirs]
    val_cases = [load_case(d) for d in val_dirs]
    if not train_cases or not val_cases:
        raise ValueError("training needs at least one training and one validation case")
    remove_partial_files(state_dir, STATE_FILES)
    remove_partial_files(model_dir, PUBLISHED_FILES)
    reset_stale_state(state_dir, run_fingerprint(train_dirs, val_dirs, model_cfg, train_cfg, preprocessing, labels, seed,
                                                 deterministic))
    history = read_history(state_dir / "history.csv")
    strategy = make_strategy(train_cfg.get("distribute", "auto"))
    if strategy is not None:
        log.info("distribute: %s with num_replicas_in_sync == %d (global batch %d)", type(strategy).__name__,
                 strategy.num_replicas_in_sync, train_cfg["batch_size"])
    with precision_policy(train_cfg.get("mixed_precision")):
        with strategy_scope(strategy):
            model, history, initial_epoch = restore_or_build(state_dir, model_cfg, train_cfg, num_classes, history)
        if initial_epoch < train_cfg["epochs"]:
            fit(model, train_cases, val_cases, train_cfg, seed, initial_epoch, state_dir, history,
                [str(d) for d in train_dirs])
        else:
            log.info("training already complete (%d epochs)", initial_epoch)
    return publish(state_dir, model_dir, inference_settings(preprocessing, train_cfg, num_classes, labels))


def run_fingerprint(train_dirs, val_dirs, model_cfg, train_cfg, preprocessing, labels, seed, deterministic=False) -> dict:
    """What a checkpoint must match to be resumed: settings (but epochs, which may grow), cases, cache files, code.

    A deterministic run never resumes a checkpoint made without ``deterministic`` (nor the reverse).
    """
    def stamp(d):
        return [str(d)] + [os.stat(Path(d) / f).st_mtime_ns for f in ("image.npy", "label.npy", "meta.json")]

    return json.loads(json.dumps({
        "model": model_cfg, "training": {k: v for k, v in train_cfg.items() if k not in STREAM_ONLY_KEYS}, "preprocessing": preprocessing, "labels": list(labels),
        "seed": seed, "train": [stamp(d) for d in train_dirs], "val": [stamp(d) for d in val_dirs], "code": code_digest(),
        **({"deterministic": True} if deterministic else {}),
    }))


def code_digest() -> str:
    """SHA-256 of the library modules that shape training, so edited code never resumes an old run."""
    digest = hashlib.sha256()
    for name in TRAINING_MODULES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def remove_partial_files(folder: Path, names) -> None:
    """Delete the temporary files a killed run left beside ``names`` (atomic writes never finished: ``.<name>.*``)."""
    for name in names:
        for partial in folder.glob(f".{name}.*"):
            log.info("removing %s, left by an interrupted run", partial)
            partial.unlink(missing_ok=True)


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
    from kidney_seg.sampling import BatchLoader, validation_set

    x_val, y_val = validation_set(val_cases, train_cfg["val_slices"], train_cfg["patch_size"], seed)
    log.info("%d train cases, %d val cases, %d val slices; epochs %d-%d x %d steps",
             len(train_cases), len(val_cases), len(x_val), initial_epoch + 1, train_cfg["epochs"], train_cfg["steps_per_epoch"])
    # the checkpoint comes last: it holds the learning rate as ReduceLROnPlateau left it after the epoch
    callbacks = [make_lr_schedule(train_cfg, history), make_checkpointer(state_dir, history)]
    loader = BatchLoader(stream_spec(train_dirs, train_cfg, seed), start=initial_epoch * train_cfg["steps_per_epoch"],
                         num_workers=train_cfg.get("num_workers", 1))
    with loader:  # try/finally: the worker pool is shut down however fit ends
        model.fit(loader.batches(), steps_per_epoch=train_cfg["steps_per_epoch"], epochs=train_cfg["epochs"],
                  initial_epoch=initial_epoch, shuffle=False, validation_data=(x_val, y_val),
                  validation_batch_size=train_cfg["batch_size"], callbacks=callbacks, verbose=2)
