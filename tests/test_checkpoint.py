"""The checkpoint module: history files, epoch records, the best-checkpoint rule, plateau replay and the resume key."""

import json
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest

from kidney_seg.checkpoint import (
    CHECKPOINT_MEMBER,
    RESUME_KEY_NAME,
    best_so_far,
    checkpoint_epoch,
    code_digest,
    read_history,
    remove_partial_files,
    replay_plateau,
    reset_stale_state,
    resume_key,
    save_checkpoint,
    write_history,
)
from kidney_seg.code_inputs import SOURCE_ROOT, training_code
from tests.test_training import MODEL, TRAIN, make_cache, plan_for


@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path)


class _SavableModel:
    """Writes a .keras-like zip archive, as keras.Model.save does."""

    def save(self, path):
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", "{}")


def test_a_checkpoint_records_its_epoch(tmp_path):
    save_checkpoint(_SavableModel(), tmp_path / "last.keras", 7)
    assert checkpoint_epoch(tmp_path / "last.keras") == 7
    assert checkpoint_epoch(tmp_path / "missing.keras") is None
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    assert checkpoint_epoch(tmp_path / "junk.keras") is None
    with zipfile.ZipFile(tmp_path / "plain.keras", "w") as archive:  # a Keras file that is not one of our checkpoints
        archive.writestr("config.json", "{}")
    assert checkpoint_epoch(tmp_path / "plain.keras") is None
    with zipfile.ZipFile(tmp_path / "last.keras") as archive:
        assert json.loads(archive.read(CHECKPOINT_MEMBER)) == {"epoch": 7}


def test_the_resume_key_names_its_file_and_discards_stale_checkpoints(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    for name in ("last.keras", "best.keras", "history.csv"):
        (state / name).write_text("x")
    reset_stale_state(state, {"seed": 1})
    assert json.loads((state / RESUME_KEY_NAME).read_text()) == {"seed": 1} and RESUME_KEY_NAME == "resume_key.json"
    assert (state / "last.keras").exists(), "a first key never discards (nothing to compare with)"
    reset_stale_state(state, {"seed": 1})
    assert (state / "last.keras").exists()
    reset_stale_state(state, {"seed": 2})
    assert not any((state / n).exists() for n in ("last.keras", "best.keras", "history.csv"))
    assert json.loads((state / RESUME_KEY_NAME).read_text()) == {"seed": 2}


def test_partial_files_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / ".last.keras.abc123").write_text("half")
    (tmp_path / "last.keras").write_text("whole")
    remove_partial_files(tmp_path, ("last.keras",))
    assert [p.name for p in tmp_path.iterdir()] == ["last.keras"]


def test_the_resume_key_follows_what_shapes_the_weights(cache):
    key = resume_key(cache[:2], cache[2:], MODEL, TRAIN, plan_for(TRAIN), 1, False)
    assert key == resume_key(
        cache[:2], cache[2:], MODEL, {**TRAIN, "epochs": 9, "num_workers": 3}, plan_for(TRAIN), 1, False
    )
    other_plan = {**plan_for(TRAIN), "preprocessing": {**plan_for(TRAIN)["preprocessing"], "clip": [-100.0, 300.0]}}
    for changed in (
        resume_key(cache[:2], cache[2:], MODEL, {**TRAIN, "learning_rate": 0.5}, plan_for(TRAIN), 1, False),
        resume_key(cache[:2], cache[2:], MODEL, TRAIN, other_plan, 1, False),
        resume_key(cache[:2], cache[2:], MODEL, TRAIN, plan_for(TRAIN), 2, False),
        resume_key(cache[:1], cache[2:], MODEL, TRAIN, plan_for(TRAIN), 1, False),
        resume_key(cache[:2], cache[2:], MODEL, TRAIN, plan_for(TRAIN), 1, True),
    ):
        assert changed != key
    assert key["code"] == code_digest()


def test_the_code_digest_changes_when_training_code_changes(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(SOURCE_ROOT / "kidney_seg", copy / "kidney_seg", ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest(copy)
    assert before == code_digest(SOURCE_ROOT) and len(before) == 64
    names = {str(p.relative_to(copy)) for p in training_code(copy)}
    assert {
        "kidney_seg/training.py",
        "kidney_seg/checkpoint.py",
        "kidney_seg/model.py",
        "kidney_seg/losses.py",
        "kidney_seg/sampling.py",
    } <= names
    assert not any(n.startswith("kidney_seg/report/") for n in names), "training must not import the report layer"
    with open(copy / "kidney_seg" / "losses.py", "a") as fh:
        fh.write("\n# an edit\n")
    assert code_digest(copy) != before
    (copy / "kidney_seg" / "losses.py").write_text((SOURCE_ROOT / "kidney_seg" / "losses.py").read_text())
    assert code_digest(copy) == before
    with open(copy / "kidney_seg" / "report" / "html.py", "a") as fh:  # not training code: the key stays
        fh.write("\n# an edit\n")
    assert code_digest(copy) == before


def test_a_checkpoint_without_its_epoch_record_is_not_resumed(cache, tmp_path):
    from kidney_seg.training import restore_or_build

    state = tmp_path / "state"
    state.mkdir()
    with zipfile.ZipFile(
        state / "last.keras", "w"
    ) as archive:  # a .keras file that does not say how many epochs it holds
        archive.writestr("config.json", "{}")
    (state / "best.keras").write_bytes((state / "last.keras").read_bytes())
    write_history(
        pd.DataFrame({"epoch": [1], "lr": [1e-3], "loss": [1.0], "val_loss": [1.0], "seconds": [0.1]}),
        state / "history.csv",
    )
    model, history, epochs = restore_or_build(state, MODEL, TRAIN, 3, read_history(state / "history.csv"))
    assert epochs == 0 and history.empty and model is not None
    assert not any((state / n).exists() for n in ("last.keras", "best.keras", "history.csv"))


class _Optimizer:
    """The part of a Keras optimizer ReduceLROnPlateau touches; the rate is float32, as in a Keras variable."""

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate

    @property
    def learning_rate(self) -> float:
        return self._lr

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self._lr = float(np.float32(value))


class _Model:
    def __init__(self, learning_rate: float):
        self.optimizer = _Optimizer(learning_rate)


# val_loss per epoch: improvements, plateaus long enough to cut the rate, improvements smaller than min_delta
VAL_LOSSES = [1.0, 0.9, 0.91, 0.92, 0.93, 0.8, 0.799, 0.798, 0.797, 0.5, 0.6, 0.6, 0.6, 0.6, 0.49, 0.7, 0.7, 0.7]
PLATEAU = {**TRAIN, "learning_rate": 1e-3, "lr_factor": 0.5, "lr_patience": 2, "lr_min_delta": 0.005, "min_lr": 2e-4}


def _schedule(callback, model, first_epoch: int):
    """Feed the remaining VAL_LOSSES to a callback as fit would; the history rows it gives (epoch, lr, val_loss)."""
    callback.set_model(model)
    callback.on_train_begin()
    rows = []
    for epoch in range(first_epoch, len(VAL_LOSSES)):
        callback.on_epoch_end(epoch, {"val_loss": VAL_LOSSES[epoch]})
        rows.append({"epoch": epoch + 1, "lr": model.optimizer.learning_rate, "val_loss": VAL_LOSSES[epoch]})
    return rows


@pytest.mark.parametrize("cooldown", [0, 2])
def test_a_resumed_plateau_schedule_is_the_uninterrupted_one(cooldown):
    import keras

    from kidney_seg.training import make_lr_schedule

    def fresh(history):
        callback = make_lr_schedule(PLATEAU, history)
        callback.cooldown = cooldown
        return callback

    whole = pd.DataFrame(_schedule(fresh(pd.DataFrame(columns=["epoch", "lr", "val_loss"])), _Model(1e-3), 0))
    assert whole["lr"].nunique() > 2 and whole["lr"].iloc[-1] == pytest.approx(2e-4)  # the rate was cut, down to min_lr
    differs = False
    for k in range(1, len(VAL_LOSSES)):
        done = whole.iloc[:k]
        rest = _schedule(fresh(done), _Model(done["lr"].iloc[-1]), k)
        pd.testing.assert_frame_equal(pd.DataFrame(rest), whole.iloc[k:].reset_index(drop=True))
        plain = keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=2, min_delta=0.005, min_lr=2e-4, cooldown=cooldown
        )
        differs |= [r["lr"] for r in _schedule(plain, _Model(done["lr"].iloc[-1]), k)] != whole["lr"].iloc[k:].tolist()
    assert differs, "Keras' own callback, reset on resume, should give another schedule somewhere"
    # the state itself, not only the rates: replaying a history equals having lived through it
    lived, replayed = fresh(pd.DataFrame()), fresh(pd.DataFrame())
    _schedule(lived, _Model(1e-3), 0)
    replayed.set_model(_Model(whole["lr"].iloc[-1]))
    replayed.on_train_begin()
    replay_plateau(replayed, whole, 1e-3)
    assert (replayed.best, replayed.wait, replayed.cooldown_counter) == (lived.best, lived.wait, lived.cooldown_counter)
    assert isinstance(replayed.model, _Model)  # the real model is given back after the replay


def test_history_floats_round_trip_exactly(tmp_path):

    values = np.random.default_rng(0).random(1000).astype(np.float32).astype(float).tolist() + [0.1, 1 / 3, 2e-7]
    write_history(pd.DataFrame({"epoch": range(len(values)), "val_loss": values}), tmp_path / "h.csv")
    assert read_history(tmp_path / "h.csv")["val_loss"].tolist() == values


def test_best_so_far_follows_the_checkpoint_rule():

    assert best_so_far(pd.DataFrame({"val_loss": []})) == (0, float("inf"))
    assert best_so_far(pd.DataFrame({"val_loss": [0.5, 0.4, 0.4, 0.45, 0.3, 0.31]})) == (5, 0.3)
    epoch, best = best_so_far(pd.DataFrame({"val_loss": [float("nan"), 0.2]}))  # Python's comparisons: NaN stays
    assert epoch == 1 and np.isnan(best)
