"""Optimizers and learning-rate schedules: the poly rates, torch-style SGD, resume with poly, the resume key."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kidney_seg.checkpoint import TIMING_COLUMNS, read_history, resume_key, weight_settings
from kidney_seg.config import with_defaults
from kidney_seg.schedules import (
    SGD_MOMENTUM,
    SGD_WEIGHT_DECAY,
    TorchSGD,
    lr_depends_on_epochs,
    make_optimizer,
    poly_lr,
)
from kidney_seg.training import make_lr_schedule, train
from tests.test_training import NEAREST_MODEL, make_cache, plan_for
from tests.test_training import TRAIN as PAPER_TRAIN

#: test_training's settings with nnU-Net v2's optimizer and schedule, for 3 epochs.
TRAIN = {
    **PAPER_TRAIN,
    "epochs": 3,
    "learning_rate": 0.01,
    "optimizer": "sgd",
    "lr_schedule": "poly",
    "gradient_clip_norm": 12.0,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Three tiny cases of a slice cache (read-only; test_training's)."""
    return make_cache(tmp_path_factory.mktemp("cache"))


def run(cache, out, **overrides) -> pd.DataFrame:
    """Train (or resume) in ``out`` with the module's settings and these overrides; the history."""
    train_cfg = {**TRAIN, **overrides}
    return train(cache[:2], cache[2:], out, NEAREST_MODEL, train_cfg, plan_for(train_cfg), seed=1, threads=1)


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    """(model folder, history) of one 3-epoch SGD + poly run that nothing interrupted (read-only)."""
    out = tmp_path_factory.mktemp("whole") / "model"
    return out, run(cache, out)


def poly_rates(train_cfg: dict) -> list[float]:
    """The rate of each epoch as the float32 optimizer variable holds it."""
    lr, epochs = train_cfg["learning_rate"], train_cfg["epochs"]
    return [float(np.float32(poly_lr(lr, e, epochs))) for e in range(epochs)]


def weights(path) -> list[bytes]:
    """The raw bytes of a saved model's weights."""
    from kidney_seg.model import load_model

    return [w.tobytes() for w in load_model(path).get_weights()]


def test_poly_is_nnunets_formula():
    assert poly_lr(0.01, 0, 1000) == 0.01
    assert poly_lr(0.01, 500, 1000) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 999, 1000) == pytest.approx(0.01 * 0.001**0.9) and poly_lr(0.01, 999, 1000) > 0
    assert lr_depends_on_epochs(TRAIN) and not lr_depends_on_epochs({**TRAIN, "lr_schedule": "plateau"})
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_depends_on_epochs({**TRAIN, "lr_schedule": "cosine"})


def test_the_config_picks_optimizer_and_callback():
    import keras

    paper = with_defaults("training", {})
    assert (paper["optimizer"], paper["lr_schedule"], paper["gradient_clip_norm"]) == ("adam", "plateau", None)
    adam = make_optimizer(paper)
    assert isinstance(adam, keras.optimizers.Adam) and adam.global_clipnorm is None
    assert isinstance(make_lr_schedule(paper, pd.DataFrame()), keras.callbacks.ReduceLROnPlateau)
    sgd = make_optimizer(TRAIN)
    assert isinstance(sgd, TorchSGD) and sgd.global_clipnorm == 12.0
    assert (sgd.momentum, sgd.nesterov, sgd.l2) == (SGD_MOMENTUM, True, SGD_WEIGHT_DECAY) == (0.99, True, 3e-5)
    assert isinstance(make_lr_schedule(TRAIN, pd.DataFrame()), keras.callbacks.LearningRateScheduler)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer({**TRAIN, "optimizer": "rmsprop"})


def check_torch_sgd() -> None:
    """TorchSGD against torch.optim.SGD's rule in numpy, with L2 and a rate that changes between steps."""
    import keras

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    grads = rng.normal(size=(5, 3, 4)).astype(np.float32)
    rates = [0.1, 0.1, 0.05, 0.05, 0.02]
    for nesterov in (True, False):
        var = keras.Variable(w0)
        opt = TorchSGD(learning_rate=rates[0], momentum=0.9, nesterov=nesterov, l2=0.01)
        w, buf = w0.astype(np.float64), np.zeros_like(w0, np.float64)
        for g, lr in zip(grads, rates):
            opt.learning_rate = lr
            opt.apply([keras.ops.convert_to_tensor(g)], [var])
            d = g + 0.01 * w
            buf = 0.9 * buf + d
            w = w - lr * (d + 0.9 * buf if nesterov else buf)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(var), w, rtol=1e-5, atol=1e-6)


def check_poly_in_fit() -> None:
    """model.fit with the poly callback runs each epoch at its poly rate."""
    import keras

    from kidney_seg.schedules import poly_callback

    cfg = {**TRAIN, "epochs": 4}
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=make_optimizer(cfg), loss="mse")
    seen = []
    probe = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(float(logs["learning_rate"])))
    x = np.ones((4, 2), np.float32)
    model.fit(x, x[:, :1], epochs=4, batch_size=2, callbacks=[poly_callback(cfg), probe], verbose=0)
    assert seen == poly_rates(cfg), seen


def test_torch_sgd_follows_pytorchs_update_rule():
    check_torch_sgd()  # under JAX too: tests/test_backends.py runs both checks in its JAX subprocess
    check_poly_in_fit()


def test_poly_sets_each_epochs_rate(uninterrupted):
    _, history = uninterrupted
    assert history["lr"].tolist() == poly_rates(TRAIN)
    assert np.isfinite(history[["loss", "val_loss"]].to_numpy(float)).all()


class Killed(Exception):
    """Stands for the process being killed."""


def test_a_killed_sgd_poly_run_resumes_bitwise(cache, uninterrupted, tmp_path, monkeypatch, caplog):
    import logging

    import kidney_seg.checkpoint as checkpoint

    ref, reference = uninterrupted
    save = checkpoint.save_checkpoint

    def killed_at_epoch_2(model, path, epoch):
        if epoch == 2:  # after epoch 2's history row, before its last.keras: epoch 2 is trained again
            raise Killed
        save(model, path, epoch)

    monkeypatch.setattr(checkpoint, "save_checkpoint", killed_at_epoch_2)
    out = tmp_path / "model"
    with pytest.raises(Killed):
        run(cache, out)
    assert list(read_history(out / "checkpoint" / "history.csv")["epoch"]) == [1, 2]
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    with caplog.at_level(logging.INFO, logger="kidney_seg.training"):
        resumed = run(cache, out)
    assert "after epoch 1" in caplog.text, "the run started afresh instead of resuming"
    pd.testing.assert_frame_equal(
        resumed.drop(columns=list(TIMING_COLUMNS)), reference.drop(columns=list(TIMING_COLUMNS))
    )
    for name in ("model.keras", "checkpoint/last.keras", "checkpoint/best.keras"):
        assert weights(out / name) == weights(ref / name), name


def test_poly_puts_epochs_in_the_resume_key(cache, uninterrupted, tmp_path):
    def key(**overrides):
        cfg = {**TRAIN, **overrides}
        return resume_key(cache[:2], cache[2:], NEAREST_MODEL, cfg, plan_for(cfg), 1, False)

    assert key()["training"]["epochs"] == 3 and key() != key(epochs=4)
    assert "epochs" not in key(lr_schedule="plateau")["training"]
    assert key(lr_schedule="plateau") == key(lr_schedule="plateau", epochs=4)  # plateau: more epochs extend a run
    assert "num_workers" not in weight_settings(TRAIN)
    # with poly, a longer run starts afresh: every epoch runs at the rates of the new length
    import shutil

    out = shutil.copytree(uninterrupted[0], tmp_path / "model")
    longer = run(cache, out, epochs=4)
    assert longer["lr"].tolist() == poly_rates({**TRAIN, "epochs": 4})
