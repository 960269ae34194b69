import keras
import numpy as np
import pytest

from kidney_seg.losses import DiceCELoss, HardDice


def reference_loss(labels, logits, include_background=True, smooth=1e-5):
    """NumPy Dice + CE from logits."""
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    onehot = np.eye(logits.shape[-1])[labels]
    axes = tuple(range(labels.ndim))
    dice = (2 * (onehot * probs).sum(axes) + smooth) / (onehot.sum(axes) + probs.sum(axes) + smooth)
    if not include_background:
        dice = dice[1:]
    ce = -np.log((onehot * probs).sum(-1)).mean()
    return 1 - dice.mean() + ce


@pytest.mark.parametrize("include_background", [True, False])
def test_dice_ce_matches_numpy(include_background):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(2, 8, 8))
    logits = rng.normal(size=(2, 8, 8, 3)).astype(np.float32) * 3
    loss = DiceCELoss(3, include_background=include_background)
    got = float(keras.ops.convert_to_numpy(loss(labels, logits)))
    assert got == pytest.approx(reference_loss(labels, logits.astype(np.float64), include_background), rel=1e-4)
    got_channel = float(keras.ops.convert_to_numpy(loss(labels[..., None], logits)))
    assert got_channel == pytest.approx(got, rel=1e-6)


def test_loss_is_lower_for_the_right_answer():
    labels = np.random.default_rng(1).integers(0, 3, size=(1, 6, 6))
    good = np.eye(3)[labels].astype(np.float32) * 10
    bad = np.roll(good, 1, axis=-1)
    loss = DiceCELoss(3)
    assert float(loss(labels, good)) < 0.01 < float(loss(labels, bad))


def test_loss_serialises():
    loss = DiceCELoss(4, include_background=False)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert again.num_classes == 4 and again.include_background is False


def test_hard_dice_metric():
    truth = np.array([[[0, 1, 1, 2]]])
    logits = np.eye(3)[np.array([[[0, 1, 0, 2]]])].astype(np.float32)
    metric = HardDice(1, "kidney")
    metric.update_state(truth, logits)
    assert metric.name == "dice_kidney"
    assert float(metric.result()) == pytest.approx(2 * 1 / (2 + 1))
    metric.reset_state()
    assert float(metric.result()) == 1.0
