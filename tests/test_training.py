"""Training on a tiny slice cache: outputs, history, resume and stale checkpoints."""

import json

import numpy as np
import pandas as pd
import pytest

from kidney_seg.training import code_digest, compile_model, make_strategy, precision_policy, read_history, train

MODEL = {"base_filters": 2, "levels": 2, "blocks_per_level": 1, "block_order": "conv_act_norm", "leaky_alpha": 0.3,
         "upsampling": "bilinear", "bn_momentum": 0.9}
TRAIN = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 3, "foreground_per_batch": 2, "tumor_per_batch": 1, "patch_size": [16, 16],
         "learning_rate": 1e-3, "lr_factor": 0.8, "lr_patience": 30, "lr_min_delta": 0.005, "min_lr": 1e-6,
         "scale_range": [0.6, 1.25], "p_scale": 0.1, "p_mirror": 1.0, "dice_include_background": True, "val_slices": 4}
PRE = {"target_spacing": [3.0, 1.0, 1.0], "clip": [-75.76, 349.49], "normalization": "zscore_slice"}


@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path)


def make_cache(tmp_path):
    """Three tiny cases of a slice cache (also used by the distribute test's subprocess)."""
    rng = np.random.default_rng(0)
    dirs = []
    for i in range(3):
        d = tmp_path / "pre" / f"case_{i:05d}"
        d.mkdir(parents=True)
        label = np.zeros((4, 20, 20), np.uint8)
        label[1:3, 5:12, 5:12] = 1
        label[2, 7:9, 7:9] = 2
        image = (rng.normal(size=label.shape) + 2.0 * label).astype(np.float32)
        np.save(d / "image.npy", image)
        np.save(d / "label.npy", label)
        (d / "meta.json").write_text(json.dumps({"case_id": d.name, "slices": {"foreground": [1, 2], "class_2": [2]}}))
        dirs.append(d)
    return dirs


def run(cache, out, **train_overrides):
    return train(cache[:2], cache[2:], out, MODEL, {**TRAIN, **train_overrides}, PRE, (0, 1, 2), seed=1, threads=1)


def test_train_writes_model_history_and_settings(cache, tmp_path):
    history = run(cache, tmp_path / "model")
    assert list(history["epoch"]) == [1, 2]
    assert {"lr", "loss", "val_loss", "val_dice_kidney", "val_dice_tumor", "seconds"} <= set(history.columns)
    for name in ("model.keras", "history.csv", "inference.json", "curves.png", "checkpoint/last.keras", "checkpoint/best.keras"):
        assert (tmp_path / "model" / name).is_file(), name
    assert (tmp_path / "model" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "model").glob(".curves.png.*")), "temporary file left behind"
    settings = json.loads((tmp_path / "model" / "inference.json").read_text())
    assert settings["patch_size"] == [16, 16] and settings["num_classes"] == 3 and settings["output_activation"] == "softmax"
    environment = json.loads((tmp_path / "model" / "environment.json").read_text())
    assert environment["keras_backend"] == "tensorflow" and environment["accelerators"] == []  # trained on the CPU
    assert environment["cpu_model"] and "keras" in environment["packages"]


def test_resume_continues_from_the_last_epoch(cache, tmp_path):
    out = tmp_path / "model"
    run(cache, out, epochs=1)
    first = read_history(out / "checkpoint" / "history.csv")
    history = run(cache, out, epochs=3)
    assert list(history["epoch"]) == [1, 2, 3]
    pd.testing.assert_series_equal(history["loss"].iloc[:1], first["loss"], check_names=False)


def test_changed_settings_start_afresh(cache, tmp_path):
    out = tmp_path / "model"
    run(cache, out, epochs=2)
    history = run(cache, out, epochs=2, learning_rate=5e-4)
    assert list(history["epoch"]) == [1, 2]
    assert history["lr"].iloc[0] == pytest.approx(5e-4)


def test_code_digest_is_stable():
    assert code_digest() == code_digest() and len(code_digest()) == 64


def test_sigmoid_counterpart_trains_and_predicts(cache, tmp_path):
    import nibabel as nib

    from kidney_seg.inference import load_predictor, predict_case
    from kidney_seg.model import load_model
    from tests.conftest import kits_affine, write_nifti

    out = tmp_path / "model"
    history = run(cache, out, epochs=1, output_activation="sigmoid")
    assert list(history["epoch"]) == [1]
    assert {"val_dice_kidney", "val_dice_tumor"} <= set(history.columns)
    assert np.isfinite(history[["loss", "val_loss", "val_dice_kidney", "val_dice_tumor"]].to_numpy(float)).all()
    settings = json.loads((out / "inference.json").read_text())
    assert settings["output_activation"] == "sigmoid" and settings["num_classes"] == 3
    model = load_model(out / "model.keras")
    assert model.output_shape[-1] == 2 and type(model.loss).__name__ == "SigmoidDiceBCELoss"
    predictor = load_predictor(out)
    assert predictor[0][0](np.zeros((1, 16, 16, 1), np.float32)).shape == (1, 16, 16, 2)
    data = np.random.default_rng(0).normal(0, 20, (5, 22, 19)).astype(np.float32)
    data[1:4, 6:14, 5:12] = 250
    path = write_nifti(tmp_path / "scan.nii.gz", data, kits_affine((2.5, 0.9, 0.8)))
    cfg = {"step": 0.5, "gaussian": True, "mirror_tta": True, "batch_size": 4}
    labels = predict_case("scan", path, out, tmp_path / "pred.nii.gz", cfg, predictor=predictor)
    written = nib.load(str(tmp_path / "pred.nii.gz"))
    assert written.shape == data.shape and written.get_data_dtype() == np.uint8
    assert labels.shape == data.shape and labels.max() <= 2


def test_worker_count_does_not_change_training(cache, tmp_path):
    in_process = run(cache, tmp_path / "a", epochs=1, num_workers=0)
    two_workers = run(cache, tmp_path / "b", epochs=1, num_workers=2)
    pd.testing.assert_series_equal(in_process["loss"], two_workers["loss"])
    pd.testing.assert_series_equal(in_process["val_loss"], two_workers["val_loss"])


def test_bfloat16_policy_computes_convs_in_bfloat16_with_float32_logits():
    import keras

    from kidney_seg.model import build_from_config

    before = keras.config.dtype_policy().name
    with precision_policy("bfloat16"):
        model = build_from_config(MODEL, 3, "softmax")
    assert keras.config.dtype_policy().name == before, "the global policy leaked"
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.compute_dtype for layer in convs if layer.name != "logits"] == ["bfloat16"] * (len(convs) - 1)
    assert all(layer.variable_dtype == "float32" for layer in convs)
    assert model.get_layer("logits").compute_dtype == "float32"
    out = model(np.zeros((1, 16, 16, 1), np.float32))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


def test_one_epoch_under_mixed_bfloat16(cache, tmp_path):
    import keras

    before = keras.config.dtype_policy().name
    try:
        history = run(cache, tmp_path / "model", epochs=1, num_workers=0, mixed_precision="bfloat16")
    except Exception as err:  # noqa: BLE001
        if "bfloat16" in str(err) and ("kernel" in str(err).lower() or "not supported" in str(err).lower()):
            pytest.skip(f"no bfloat16 CPU kernel in this TensorFlow build: {err}")
        raise
    assert keras.config.dtype_policy().name == before
    assert list(history["epoch"]) == [1]
    assert np.isfinite(history[["loss", "val_loss", "val_dice_kidney", "val_dice_tumor"]].to_numpy(float)).all()


def test_jit_compile_reaches_the_model():
    from kidney_seg.model import build_from_config

    model = build_from_config(MODEL, 3, "softmax")
    compile_model(model, 3, TRAIN)
    assert model.jit_compile is False
    compile_model(model, 3, {**TRAIN, "jit_compile": True})
    assert model.jit_compile is True


def test_strategy_choice_on_a_single_cpu():
    assert make_strategy("none") is None
    assert make_strategy("auto") is None  # no GPUs here
    assert make_strategy("mirrored") is None  # one CPU device: falls back with a warning
    with pytest.raises(ValueError):
        make_strategy("tpu")


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

    from kidney_seg.training import make_lr_schedule, replay_plateau

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
        plain = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_delta=0.005, min_lr=2e-4,
                                                  cooldown=cooldown)
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
    from kidney_seg.training import write_history

    values = np.random.default_rng(0).random(1000).astype(np.float32).astype(float).tolist() + [0.1, 1 / 3, 2e-7]
    write_history(pd.DataFrame({"epoch": range(len(values)), "val_loss": values}), tmp_path / "h.csv")
    assert read_history(tmp_path / "h.csv")["val_loss"].tolist() == values


def test_best_so_far_follows_the_checkpoint_rule():
    from kidney_seg.training import best_so_far

    assert best_so_far(pd.DataFrame({"val_loss": []})) == (0, float("inf"))
    assert best_so_far(pd.DataFrame({"val_loss": [0.5, 0.4, 0.4, 0.45, 0.3, 0.31]})) == (5, 0.3)
    epoch, best = best_so_far(pd.DataFrame({"val_loss": [float("nan"), 0.2]}))  # Python's comparisons: NaN stays
    assert epoch == 1 and np.isnan(best)


def _weights(path):
    from kidney_seg.model import load_model

    return [w.tobytes() for w in load_model(path).get_weights()]


def _without_seconds(df):
    return df.drop(columns="seconds")


def test_a_run_killed_at_any_point_of_an_epoch_commit_resumes_bitwise(cache, tmp_path):
    import shutil

    from kidney_seg.training import best_so_far, checkpoint_epoch

    reference = run(cache, tmp_path / "ref", epochs=3, num_workers=0)
    assert checkpoint_epoch(tmp_path / "ref" / "checkpoint" / "last.keras") == 3
    out, state = tmp_path / "model", tmp_path / "model" / "checkpoint"
    run(cache, out, epochs=1, num_workers=0)
    shutil.copyfile(state / "last.keras", tmp_path / "epoch1.keras")
    run(cache, out, epochs=2, num_workers=0)
    history = read_history(state / "history.csv")
    # killed after epoch 3's history row was written, before last.keras was (and before any best.keras copy) ...
    extra = {**history.iloc[-1].to_dict(), "epoch": 3, "val_loss": -1.0}
    pd.concat([history, pd.DataFrame([extra])]).to_csv(state / "history.csv", index=False)
    if best_so_far(history)[0] == 2:  # ... and, if epoch 2 was the best, killed before best.keras caught up with it
        shutil.copyfile(tmp_path / "epoch1.keras", state / "best.keras")
    resumed = run(cache, out, epochs=3, num_workers=0)
    pd.testing.assert_frame_equal(_without_seconds(resumed), _without_seconds(reference))
    for name in ("model.keras", "checkpoint/last.keras", "checkpoint/best.keras"):
        assert _weights(out / name) == _weights(tmp_path / "ref" / name), name


def test_a_checkpoint_without_its_epoch_record_still_resumes(cache, tmp_path):
    import zipfile

    from kidney_seg.training import CHECKPOINT_MEMBER, checkpoint_epoch

    out = tmp_path / "model"
    run(cache, out, epochs=1, num_workers=0)
    last = out / "checkpoint" / "last.keras"
    with zipfile.ZipFile(last) as src, zipfile.ZipFile(tmp_path / "old.keras", "w") as dst:  # as older versions saved it
        for item in src.infolist():
            if item.filename != CHECKPOINT_MEMBER:
                dst.writestr(item, src.read(item))
    (tmp_path / "old.keras").replace(last)
    assert checkpoint_epoch(last) is None
    history = run(cache, out, epochs=2, num_workers=0)
    assert list(history["epoch"]) == [1, 2] and checkpoint_epoch(last) == 2


DETERMINISM_SCRIPT = r"""
import json, os, sys
from kidney_seg.training import configure_threads
configure_threads(2)
from kidney_seg.determinism import enable
backend = enable(3)
import numpy as np, tensorflow as tf
from tensorflow.python.framework import config as tf_config
print("RESULT", json.dumps({"backend": backend, "op_determinism": tf_config.is_op_determinism_enabled(),
      "intra": tf.config.threading.get_intra_op_parallelism_threads(),
      "inter": tf.config.threading.get_inter_op_parallelism_threads(),
      "xla_flags": os.environ["XLA_FLAGS"], "numpy": float(np.random.random())}))
"""


def test_enable_makes_tensorflow_deterministic_and_single_threaded():
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": "--xla_dump_to=/dev/null"}
    proc = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["backend"] == "tensorflow" and result["op_determinism"] is True
    assert result["intra"] == 1 and result["inter"] == 2  # one compute thread; the scheduler's inter-op count stays
    assert result["xla_flags"] == "--xla_dump_to=/dev/null --xla_gpu_deterministic_ops=true"
    assert result["numpy"] == np.random.RandomState(3).random_sample()  # keras.utils.set_random_seed(3) ran


def test_prepare_environment_adds_flags_once():
    from kidney_seg.determinism import prepare_environment

    env = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false --foo=1", "CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    prepare_environment(env)
    assert env == {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false --foo=1", "CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    env = {}
    prepare_environment(env)
    prepare_environment(env)
    assert env == {"XLA_FLAGS": "--xla_gpu_deterministic_ops=true", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
