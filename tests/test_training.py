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
