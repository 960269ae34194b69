"""Checkpoints and resume: what a killed training run leaves behind, and how it carries on.

``checkpoint_dir`` holds ``last.keras`` (with optimizer state), ``best.keras``,
``history.csv`` and ``resume_key.json``. After each epoch the history is written first,
then ``last.keras`` (which records in its archive how many epochs it holds,
:data:`CHECKPOINT_MEMBER`), then ``best.keras`` as a copy of it when the validation loss
improved. Whenever the process is killed, ``last.keras`` is the truth.

The resume key (:func:`resume_key`) is what a checkpoint must match to be resumed: the
settings that shape the weights, the cases and their cache files, and a digest of the
training code (:func:`code_digest`). A different key discards the checkpoints
(:func:`reset_stale_state`). It is not the intensity fingerprint of preprocessing.
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
from pathlib import Path

import numpy as np
import pandas as pd

from kidney_seg.atomic import atomic_path, write_json_atomic
from kidney_seg.code_inputs import SOURCE_ROOT, training_code

log = logging.getLogger(__name__)

#: seconds: the epoch's steps and validation; train_seconds: its steps alone (both before the checkpoint commit).
HISTORY_COLUMNS = ("epoch", "lr", "loss", "val_loss", "seconds", "train_seconds")
TIMING_COLUMNS = ("seconds", "train_seconds")  # the columns that differ between identical runs
# read_csv parses floats exactly by default from pandas 3 on (and deprecates the option); before, only "round_trip" does
EXACT_FLOATS = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
RESUME_KEY_NAME = "resume_key.json"
CHECKPOINTS = ("last.keras", "best.keras", "history.csv")  # discarded together when they cannot be resumed
STATE_FILES = CHECKPOINTS + (RESUME_KEY_NAME,)  # in checkpoint_dir
CHECKPOINT_MEMBER = "kidney_seg_checkpoint.json"  # {"epoch": n} inside a checkpoint's .keras archive
#: settings that cannot change the trained weights (epochs: unless poly; publish only picks the checkpoint to publish)
STREAM_ONLY_KEYS = ("epochs", "num_workers", "publish")


def read_history(path: Path) -> pd.DataFrame:
    """The training log so far, or an empty frame."""
    if path.is_file() and path.stat().st_size:
        return pd.read_csv(path, **EXACT_FLOATS)  # the callbacks' state is replayed from these values
    return pd.DataFrame(columns=list(HISTORY_COLUMNS))


def write_history(df: pd.DataFrame, path: Path) -> None:
    """Write the training log atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def save_checkpoint(model, path: Path, epoch: int) -> None:
    """Save the model with its optimizer state atomically, recording in the archive that it holds ``epoch`` epochs."""
    with atomic_path(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(CHECKPOINT_MEMBER, json.dumps({"epoch": int(epoch)}))


def checkpoint_epoch(path: Path) -> int | None:
    """The number of epochs a checkpoint holds (None: no such file, or not a checkpoint of ours)."""
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


def current_lr(model) -> float:
    """The optimizer's learning rate as a float."""
    import keras

    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


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
            self.t_steps = None

        def on_test_begin(self, logs=None):
            self.t_steps = time.perf_counter()  # fit's validation starts: the epoch's steps are done

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            end = time.perf_counter()
            row = {
                "epoch": epoch + 1,
                "lr": current_lr(self.model),
                "loss": logs.get("loss"),
                "val_loss": logs.get("val_loss"),
                "seconds": round(end - self.t0, 3),
                "train_seconds": round((self.t_steps or end) - self.t0, 3),
            }
            row.update({k: float(v) for k, v in logs.items() if k.startswith("val_dice_")})
            self.rows.append(row)
            write_history(pd.DataFrame(self.rows), state_dir / "history.csv")
            save_checkpoint(self.model, state_dir / "last.keras", epoch + 1)
            val = float(logs.get("val_loss", math.inf))
            if val < self.best or not (state_dir / "best.keras").exists():
                self.best = val
                with atomic_path(state_dir / "best.keras") as tmp:
                    shutil.copyfile(state_dir / "last.keras", tmp)
            log.info(
                "epoch %d: %s", epoch + 1, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            )

    return Checkpointer()


class _ReplayOptimizer:
    """Stands in for the optimizer while a ReduceLROnPlateau replays past epochs: holds a learning rate, no more."""

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate


class _ReplayModel:
    """Stands in for the model while a ReduceLROnPlateau replays past epochs."""

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


def code_digest(root: Path = SOURCE_ROOT) -> str:
    """SHA-256 of the library files that shape training, so edited code never resumes an old run.

    The files are those of :func:`kidney_seg.code_inputs.training_code`.
    """
    digest = hashlib.sha256()
    for path in training_code(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _cache_stamp(case_dir) -> list:
    """A slice cache's folder and the modification times of its files."""
    return [str(case_dir)] + [os.stat(Path(case_dir) / f).st_mtime_ns for f in ("image.npy", "label.npy", "meta.json")]


def weight_settings(train_cfg: dict) -> dict:
    """The training settings that shape the weights: all but STREAM_ONLY_KEYS, and ``epochs`` where it sets the rates.

    With ``lr_schedule: poly`` every epoch's rate depends on ``epochs``
    (:func:`kidney_seg.schedules.lr_depends_on_epochs`), so more epochs is another run.
    """
    from kidney_seg.schedules import lr_depends_on_epochs

    ignored = set(STREAM_ONLY_KEYS) - ({"epochs"} if lr_depends_on_epochs(train_cfg) else set())
    return {k: v for k, v in train_cfg.items() if k not in ignored}


def resume_key(
    train_dirs, val_dirs, model_cfg: dict, train_cfg: dict, plan: dict, seed: int, deterministic: bool
) -> dict:
    """What a checkpoint must match to be resumed: settings (:func:`weight_settings`), plan, cases, caches, code.

    ``epochs`` may grow (a longer run resumes a shorter one) except with the poly schedule.
    A deterministic run never resumes a checkpoint made without ``deterministic`` (nor the reverse).
    """
    return json.loads(
        json.dumps(
            {
                "model": model_cfg,
                "training": weight_settings(train_cfg),
                "plan": plan,
                "seed": seed,
                "train": [_cache_stamp(d) for d in train_dirs],
                "val": [_cache_stamp(d) for d in val_dirs],
                "code": code_digest(),
                "deterministic": bool(deterministic),
            }
        )
    )


def remove_partial_files(folder: Path, names) -> None:
    """Delete the temporary files a killed run left beside ``names`` (atomic writes never finished: ``.<name>.*``)."""
    for name in names:
        for partial in folder.glob(f".{name}.*"):
            log.info("removing %s, left by an interrupted run", partial)
            partial.unlink(missing_ok=True)


def discard_checkpoints(state_dir: Path) -> None:
    """Delete the checkpoints and their history (nothing in ``state_dir`` can be resumed)."""
    for name in CHECKPOINTS:
        (state_dir / name).unlink(missing_ok=True)


def reset_stale_state(state_dir: Path, key: dict) -> None:
    """Discard checkpoints left by a run with another resume key; record this run's key."""
    path = state_dir / RESUME_KEY_NAME
    if path.is_file() and json.loads(path.read_text()) != key:
        log.info("settings or inputs changed since the checkpoint in %s: starting afresh", state_dir)
        discard_checkpoints(state_dir)
    write_json_atomic(path, key)
