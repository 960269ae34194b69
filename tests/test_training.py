"""Training on a tiny slice cache: outputs, history, resume and stale checkpoints.

The tests share one slice cache and one fresh 3-epoch training run (module fixtures,
read-only); a test that trains further trains a copy. Batches are made in-process (``num_workers`` 0)
but where the worker count is the subject: spawning a pool costs seconds per run.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from kidney_seg.checkpoint import TIMING_COLUMNS, read_history
from kidney_seg.config import with_defaults
from kidney_seg.plan import make_plan
from kidney_seg.training import compile_model, make_strategy, precision_policy, train

MODEL = with_defaults("model", {"base_filters": 2, "levels": 2, "blocks_per_level": 1, "bn_momentum": 0.9})
#: MODEL with nearest upsampling, for runs whose subject is not the model: its graph traces about 0.5-1 s faster
#: than the bilinear layer's. The default (bilinear) is trained by this module's shared run, the resume and bf16
#: tests and, under JAX, tests/test_backends.py.
NEAREST_MODEL = {**MODEL, "upsampling": "nearest"}
TRAIN = with_defaults(
    "training",
    {
        "epochs": 2,
        "steps_per_epoch": 2,
        "batch_size": 3,
        "foreground_per_batch": 2,
        "tumor_per_batch": 1,
        "patch_size": [16, 16],
        "learning_rate": 1e-3,
        "val_slices": 4,
        "num_workers": 0,
    },
)
PRE = with_defaults("preprocessing", {"target_spacing": [3.0, 1.0, 1.0], "clip": [-75.76, 349.49]})


def plan_for(train_cfg: dict) -> dict:
    """The plan of the tests' phantom config with these training settings."""
    return make_plan({"dataset": {"source": "phantom"}, "preprocessing": PRE, "training": train_cfg}, None)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The module's slice cache (read-only)."""
    return make_cache(tmp_path_factory.mktemp("cache"))


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


def run(cache, out, model_cfg=MODEL, **train_overrides):
    """Train (or resume) in ``out`` with the module's settings and these overrides; the history."""
    train_cfg = {**TRAIN, **train_overrides}
    return train(cache[:2], cache[2:], out, model_cfg, train_cfg, plan_for(train_cfg), seed=1, threads=1)


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """(model folder, history, {epoch: copy of the checkpoint folder as that epoch's commit left it}) of one fresh,
    uninterrupted 3-epoch run with the module's settings (read-only: train on a copy)."""
    import kidney_seg.training

    root = tmp_path_factory.mktemp("trained")
    snapshots = {}
    make_checkpointer = kidney_seg.training.make_checkpointer

    def snapshotting_checkpointer(state_dir, history):
        checkpointer = make_checkpointer(state_dir, history)
        commit = checkpointer.on_epoch_end

        def on_epoch_end(epoch, logs=None):
            commit(epoch, logs)
            snapshots[epoch + 1] = shutil.copytree(state_dir, root / f"after_epoch_{epoch + 1}")

        checkpointer.on_epoch_end = on_epoch_end
        return checkpointer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kidney_seg.training, "make_checkpointer", snapshotting_checkpointer)
        history = run(cache, root / "model", epochs=3)
    assert sorted(snapshots) == [1, 2, 3]
    return root / "model", history, snapshots


def copy_of(trained, tmp_path):
    """A copy of the shared run's model folder (checkpoint included) to resume or restart."""
    return shutil.copytree(trained[0], tmp_path / "model")


def test_train_writes_model_history_and_settings(trained):
    model_dir, history, _ = trained
    assert list(history["epoch"]) == [1, 2, 3]
    assert {"lr", "loss", "val_loss", "val_dice_kidney", "val_dice_tumor", *TIMING_COLUMNS} <= set(history.columns)
    assert (history["train_seconds"] > 0).all() and (history["train_seconds"] < history["seconds"]).all()
    for name in (
        "model.keras",
        "history.csv",
        "inference.json",
        "curves.png",
        "checkpoint/last.keras",
        "checkpoint/best.keras",
    ):
        assert (model_dir / name).is_file(), name
    assert (model_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(model_dir.glob(".curves.png.*")), "temporary file left behind"
    assert json.loads((model_dir / "inference.json").read_text()) == plan_for(TRAIN)  # a copy of the plan
    key = json.loads((model_dir / "checkpoint" / "resume_key.json").read_text())
    assert key["plan"] == plan_for(TRAIN) and key["seed"] == 1 and "epochs" not in key["training"]
    assert not (model_dir / "checkpoint" / "fingerprint.json").exists()
    environment = json.loads((model_dir / "environment.json").read_text())
    assert environment["keras_backend"] == "tensorflow" and environment["accelerators"] == []  # trained on the CPU
    assert environment["cpu_model"] and "keras" in environment["packages"]


def test_resume_continues_from_the_last_epoch(cache, trained, tmp_path):
    out = copy_of(trained, tmp_path)
    first = read_history(out / "checkpoint" / "history.csv")
    assert list(first["epoch"]) == [1, 2, 3]
    history = run(cache, out, epochs=4)
    assert list(history["epoch"]) == [1, 2, 3, 4]
    pd.testing.assert_series_equal(history["loss"].iloc[:3], first["loss"], check_names=False)


def test_changed_settings_start_afresh(cache, trained, tmp_path):
    out = copy_of(trained, tmp_path)  # 3 epochs at learning rate 1e-3: a resume would train none
    history = run(cache, out, epochs=1, learning_rate=5e-4)
    assert list(history["epoch"]) == [1]
    assert history["lr"].iloc[0] == pytest.approx(5e-4)


def test_a_plan_that_disagrees_with_the_training_config_is_refused(cache, tmp_path):
    with pytest.raises(ValueError, match="training.patch_size"):
        train(
            cache[:2], cache[2:], tmp_path / "model", MODEL, TRAIN, plan_for({**TRAIN, "patch_size": [32, 32]}), seed=1
        )


@pytest.mark.parametrize("activation", ["sigmoid", "regions"])
def test_sigmoid_outputs_train_and_predict(cache, tmp_path, activation):
    """The sigmoid counterpart and the nested regions: two logits, the sigmoid loss, labels 0-2 on the scan's grid."""
    import nibabel as nib

    from kidney_seg.inference import load_predictor, predict_case
    from kidney_seg.model import load_model
    from tests.conftest import kits_affine, write_nifti

    out = tmp_path / "model"
    history = run(cache, out, NEAREST_MODEL, epochs=1, output_activation=activation)
    assert list(history["epoch"]) == [1]
    assert {"val_dice_kidney", "val_dice_tumor"} <= set(history.columns)
    assert np.isfinite(history[["loss", "val_loss", "val_dice_kidney", "val_dice_tumor"]].to_numpy(float)).all()
    settings = json.loads((out / "inference.json").read_text())
    assert settings["output_activation"] == activation and settings["num_classes"] == 3
    model = load_model(out / "model.keras")
    assert model.output_shape[-1] == 2 and type(model.loss).__name__ == "SigmoidDiceBCELoss"
    assert model.loss.regions == (activation == "regions")
    predictor = load_predictor(out)
    assert predictor[0][0](np.zeros((1, 16, 16, 1), np.float32)).shape == (1, 16, 16, 2)
    data = np.random.default_rng(0).normal(0, 20, (5, 22, 19)).astype(np.float32)
    data[1:4, 6:14, 5:12] = 250
    path = write_nifti(tmp_path / "scan.nii.gz", data, kits_affine((2.5, 0.9, 0.8)))
    cfg = with_defaults("inference", {"step": 0.5, "gaussian": True, "mirror_tta": True, "batch_size": 4})
    labels = predict_case("scan", path, out, tmp_path / "pred.nii.gz", cfg, predictor=predictor)
    written = nib.load(str(tmp_path / "pred.nii.gz"))
    assert written.shape == data.shape and written.get_data_dtype() == np.uint8
    assert labels.shape == data.shape and labels.max() <= 2


def test_worker_count_does_not_change_training(cache, trained, tmp_path):
    assert TRAIN["num_workers"] == 0
    in_process = trained[1].iloc[:1]  # its first epoch
    two_workers = run(cache, tmp_path / "model", epochs=1, num_workers=2)
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


def cpu_has_bfloat16() -> bool:
    """Whether the CPU has bfloat16 instructions (x86 AVX512_BF16 or AMX_BF16; Arm BF16), used by oneDNN kernels."""
    try:
        flags = {
            word for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features")) for word in line.split()
        }
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@pytest.mark.skipif(
    not cpu_has_bfloat16(), reason="the CPU has no bfloat16 instructions (avx512_bf16, amx_bf16 or bf16)"
)
def test_one_epoch_under_mixed_bfloat16(cache, tmp_path):
    import keras

    before = keras.config.dtype_policy().name
    history = run(cache, tmp_path / "model", epochs=1, num_workers=0, mixed_precision="bfloat16")
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


def _weights(path):
    from kidney_seg.model import load_model

    return [w.tobytes() for w in load_model(path).get_weights()]


def _without_seconds(df):
    return df.drop(columns=list(TIMING_COLUMNS))


def test_a_run_killed_at_any_point_of_an_epoch_commit_resumes_bitwise(cache, trained, tmp_path):
    from kidney_seg.checkpoint import best_so_far, checkpoint_epoch

    ref, reference, snapshots = trained  # fresh, 3 epochs, num_workers 0, uninterrupted
    assert TRAIN["num_workers"] == 0
    assert checkpoint_epoch(ref / "checkpoint" / "last.keras") == 3
    out, state = tmp_path / "model", tmp_path / "model" / "checkpoint"
    shutil.copytree(snapshots[2], state)  # the run as epoch 2's commit left it ...
    assert checkpoint_epoch(state / "last.keras") == 2 and checkpoint_epoch(snapshots[1] / "last.keras") == 1
    shutil.copyfile(snapshots[1] / "last.keras", tmp_path / "epoch1.keras")
    history = read_history(state / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    # ... then killed after epoch 3's history row was written, before last.keras was (and before any best.keras copy)
    extra = {**history.iloc[-1].to_dict(), "epoch": 3, "val_loss": -1.0}
    pd.concat([history, pd.DataFrame([extra])]).to_csv(state / "history.csv", index=False)
    if best_so_far(history)[0] == 2:  # ... and, if epoch 2 was the best, killed before best.keras caught up with it
        shutil.copyfile(tmp_path / "epoch1.keras", state / "best.keras")
    resumed = run(cache, out, epochs=3, num_workers=0)
    pd.testing.assert_frame_equal(_without_seconds(resumed), _without_seconds(reference))
    for name in ("model.keras", "checkpoint/last.keras", "checkpoint/best.keras"):
        assert _weights(out / name) == _weights(ref / name), name


#: Settings that must precede TensorFlow's start-up, checked in one fresh process (one TensorFlow import):
#: two logical CPU devices for MirroredStrategy, then the thread counts and op determinism of
#: kidney_seg.determinism.enable; then one epoch under MirroredStrategy on the two devices.
FRESH_TENSORFLOW_SCRIPT = r"""
import json, logging, os, sys
from pathlib import Path
from kidney_seg.environment import import_framework
import_framework()  # Keras and TensorFlow, as a job imports them
import tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from kidney_seg.environment import configure_threads
from kidney_seg.training import train
configure_threads(2)
from kidney_seg.determinism import enable
backend = enable(3)
import numpy as np
from tensorflow.python.framework import config as tf_config
result = {"backend": backend, "op_determinism": tf_config.is_op_determinism_enabled(),
          "intra": tf.config.threading.get_intra_op_parallelism_threads(),
          "inter": tf.config.threading.get_inter_op_parallelism_threads(),
          "xla_flags": os.environ["XLA_FLAGS"], "numpy": float(np.random.random())}
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
from tests.test_training import NEAREST_MODEL, TRAIN, make_cache, plan_for
tmp = Path(sys.argv[1])
dirs = make_cache(tmp)
cfg = {**TRAIN, "epochs": 1, "batch_size": 4, "distribute": "mirrored", "num_workers": 0}
result["epochs"] = list(train(dirs[:2], dirs[2:], tmp / "model", NEAREST_MODEL, cfg, plan_for(cfg), seed=1)["epoch"])
print("RESULT", json.dumps(result))
"""


def test_settings_made_before_tensorflow_starts(tmp_path):
    """Determinism (op determinism, one compute thread, the seeds) and MirroredStrategy on two logical CPUs."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "XLA_FLAGS": "--xla_dump_to=/dev/null",
    }
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_TENSORFLOW_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["backend"] == "tensorflow" and result["op_determinism"] is True
    assert result["intra"] == 1 and result["inter"] == 2  # one compute thread; the scheduler's inter-op count stays
    assert result["xla_flags"] == "--xla_dump_to=/dev/null --xla_gpu_deterministic_ops=true"
    assert result["numpy"] == np.random.RandomState(3).random_sample()  # keras.utils.set_random_seed(3) ran
    # MirroredStrategy over the two logical CPU devices
    assert "MirroredStrategy with num_replicas_in_sync == 2" in out, out[-4000:]
    assert result["epochs"] == [1]
    history = pd.read_csv(tmp_path / "model" / "history.csv")
    assert list(history["epoch"]) == [1] and history["loss"].notna().all()
    assert (tmp_path / "model" / "model.keras").is_file()


def test_prepare_environment_adds_flags_once():
    from kidney_seg.determinism import prepare_environment

    env = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false --foo=1", "CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    prepare_environment(env)
    assert env == {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false --foo=1", "CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    env = {}
    prepare_environment(env)
    prepare_environment(env)
    assert env == {"XLA_FLAGS": "--xla_gpu_deterministic_ops=true", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def test_deep_supervision_trains_and_publishes_the_plain_unet(cache, tmp_path):
    """The checkpoint keeps the heads and the loss (a resume loads it as any other); model.keras is the U-Net alone."""
    from kidney_seg.model import load_model, supervision_scales

    model_cfg = {**NEAREST_MODEL, "levels": 4, "deep_supervision": True}
    out = tmp_path / "model"
    history = train(cache[:2], cache[2:], out, model_cfg, {**TRAIN, "epochs": 1}, plan_for(TRAIN), seed=1, threads=1)
    assert np.isfinite(history[["loss", "val_loss", "val_dice_kidney", "val_dice_tumor"]].to_numpy(float)).all()
    best = load_model(out / "checkpoint" / "best.keras")
    assert supervision_scales(best) == (2,) and type(best.loss).__name__ == "DeepSupervisionLoss"
    published = load_model(out / "model.keras")
    assert not supervision_scales(published) and published.output_shape[-1] == 3
    x = np.random.default_rng(3).normal(size=(2, 16, 16, 1)).astype(np.float32)
    assert np.array_equal(np.asarray(published(x, training=False)), np.asarray(best(x, training=False))[..., :3])


def test_publish_final_takes_the_last_epoch_without_training_again(cache, trained, tmp_path):
    from kidney_seg.checkpoint import best_so_far, checkpoint_epoch

    ref, reference, _ = trained  # published with the default, publish: best
    assert checkpoint_epoch(ref / "model.keras") == best_so_far(reference)[0]
    out = copy_of(trained, tmp_path)
    history = run(cache, out, epochs=3, publish="final")  # the same weights' run: resumed as complete, published
    pd.testing.assert_frame_equal(history, reference)
    assert checkpoint_epoch(out / "model.keras") == 3
    assert (out / "model.keras").read_bytes() == (out / "checkpoint" / "last.keras").read_bytes()
