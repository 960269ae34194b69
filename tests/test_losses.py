import keras
import numpy as np
import pytest

from kidney_seg.losses import DiceCELoss, HardDice, SigmoidDiceBCELoss, hard_labels


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


def reference_sigmoid_loss(labels, logits, smooth=1e-5):
    """NumPy sigmoid counterpart: foreground soft Dice of sigmoids + binary CE from logits."""
    probs = 1 / (1 + np.exp(-logits))
    targets = np.stack([labels == c for c in range(1, logits.shape[-1] + 1)], axis=-1).astype(np.float64)
    axes = tuple(range(labels.ndim))
    dice = (2 * (targets * probs).sum(axes) + smooth) / (targets.sum(axes) + probs.sum(axes) + smooth)
    bce = -(targets * np.log(probs) + (1 - targets) * np.log(1 - probs)).mean()
    return 1 - dice.mean() + bce


def test_sigmoid_dice_bce_matches_numpy():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=(2, 8, 8))
    logits = rng.normal(size=(2, 8, 8, 2)).astype(np.float32) * 3
    loss = SigmoidDiceBCELoss(3)
    got = float(keras.ops.convert_to_numpy(loss(labels, logits)))
    assert got == pytest.approx(reference_sigmoid_loss(labels, logits.astype(np.float64)), rel=1e-4)
    got_channel = float(keras.ops.convert_to_numpy(loss(labels[..., None], logits)))
    assert got_channel == pytest.approx(got, rel=1e-6)
    half = float(
        keras.ops.convert_to_numpy(loss(labels, logits.astype(np.float16)))
    )  # mixed precision: computed in float32
    assert half == pytest.approx(got, rel=1e-2)


def test_sigmoid_loss_is_lower_for_the_right_answer_and_serialises():
    labels = np.random.default_rng(3).integers(0, 3, size=(1, 6, 6))
    good = (np.stack([labels == 1, labels == 2], -1).astype(np.float32) * 2 - 1) * 12
    loss = SigmoidDiceBCELoss(3)
    assert float(loss(labels, good)) < 0.01 < float(loss(labels, -good))
    again = keras.losses.deserialize(keras.losses.serialize(SigmoidDiceBCELoss(4, smooth=1e-3)))
    assert isinstance(again, SigmoidDiceBCELoss) and again.num_classes == 4 and again.smooth == 1e-3


def test_sigmoid_hard_labels_threshold_and_largest_foreground():
    # per pixel: (kidney, tumour) logits
    logits = np.array([[[[-1.0, -2.0], [0.5, -1.0], [0.5, 2.0], [3.0, 1.0], [0.0, 0.0], [-0.1, 0.2]]]], np.float32)
    got = keras.ops.convert_to_numpy(hard_labels(logits, "sigmoid"))
    np.testing.assert_array_equal(got, [[[0, 1, 2, 1, 0, 2]]])  # exactly 0.5 is background
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(hard_labels(logits, "softmax")), logits.argmax(-1))
    with pytest.raises(ValueError):
        hard_labels(logits, "tanh")


def test_region_loss_targets_nested_regions():
    """regions: output 1 is kidney+tumour (label >= 1), output 2 tumour (label >= 2): the sigmoid loss on those."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=(2, 8, 8))
    logits = rng.normal(size=(2, 8, 8, 2)).astype(np.float32) * 3
    got = float(keras.ops.convert_to_numpy(SigmoidDiceBCELoss(3, regions=True)(labels, logits)))
    # the reference's targets are label == c; labels remapped so that == c means >= c
    nested = np.stack([labels >= 1, labels >= 2], -1).astype(np.float32)
    perfect = (nested * 2 - 1) * 12
    assert float(SigmoidDiceBCELoss(3, regions=True)(labels, perfect)) < 0.01
    assert float(SigmoidDiceBCELoss(3)(labels, perfect)) > 0.1  # not the per-class targets
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    dice = (2 * (nested * probs).sum((0, 1, 2)) + 1e-5) / (nested.sum((0, 1, 2)) + probs.sum((0, 1, 2)) + 1e-5)
    bce = -(nested * np.log(probs) + (1 - nested) * np.log(1 - probs)).mean()
    assert got == pytest.approx(1 - dice.mean() + bce, rel=1e-4)
    again = keras.losses.deserialize(keras.losses.serialize(SigmoidDiceBCELoss(3, regions=True)))
    assert again.regions is True


def test_region_hard_labels_take_the_highest_region_above_one_half():
    # per pixel: (kidney+tumour, tumour) logits; nnU-Net: each region in order overwrites where p > 0.5
    logits = np.array([[[[-1.0, -2.0], [0.5, -1.0], [0.5, 2.0], [-3.0, 1.0], [0.0, 0.0], [2.0, 0.0]]]], np.float32)
    got = keras.ops.convert_to_numpy(hard_labels(logits, "regions"))
    np.testing.assert_array_equal(got, [[[0, 1, 2, 2, 0, 1]]])


def test_hard_dice_metric_sigmoid():
    truth = np.array([[[0, 1, 1, 2, 2]]])
    logits = np.array([[[[-5, -5], [5, -5], [-5, -5], [-5, 5], [1, 2]]]], np.float32)  # predicts 0 1 0 2 2
    kidney = HardDice(1, "kidney", activation="sigmoid")
    tumor = HardDice(2, "tumor", activation="sigmoid")
    kidney.update_state(truth, logits)
    tumor.update_state(truth[..., None], logits)
    assert kidney.name == "dice_kidney" and tumor.name == "dice_tumor"
    assert float(kidney.result()) == pytest.approx(2 * 1 / (2 + 1))
    assert float(tumor.result()) == pytest.approx(1.0)
    again = HardDice.from_config(kidney.get_config())
    assert again.activation == "sigmoid" and again.name == "dice_kidney"
    with pytest.raises(ValueError):
        HardDice(1, "kidney", activation="relu")


def _packed(full: np.ndarray, coarse: dict[int, np.ndarray]) -> np.ndarray:
    """A deep-supervised model's output: the full-resolution logits, then each 1/s grid's repeated s times (nearest)."""
    parts = [full] + [np.repeat(np.repeat(c, s, axis=1), s, axis=2) for s, c in coarse.items()]
    return np.concatenate(parts, axis=-1)


@pytest.mark.parametrize("base", [DiceCELoss(3), SigmoidDiceBCELoss(3, regions=True)])
def test_deep_supervision_loss_scores_each_grid_against_nearest_exact_labels(base):
    from kidney_seg.losses import DeepSupervisionLoss

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=(2, 16, 16))
    channels = 3 if isinstance(base, DiceCELoss) else 2
    full = rng.normal(size=(2, 16, 16, channels)).astype(np.float32)
    coarse = {s: rng.normal(size=(2, 16 // s, 16 // s, channels)).astype(np.float32) for s in (2, 4)}
    weights = (4 / 7, 2 / 7, 1 / 7)
    loss = DeepSupervisionLoss(base, channels, (2, 4), weights)
    got = float(keras.ops.convert_to_numpy(loss(labels, _packed(full, coarse))))
    # PyTorch's interpolate(mode="nearest-exact") to 1/s takes source pixel floor((i + 0.5) * s) = s * i + s // 2
    want = weights[0] * float(base(labels, full))
    for w, (s, c) in zip(weights[1:], coarse.items()):
        want += w * float(base(labels[:, s // 2 :: s, s // 2 :: s], c))
    assert got == pytest.approx(want, rel=1e-5)
    again = DeepSupervisionLoss.from_config(loss.get_config())  # as a checkpoint stores and restores it
    assert type(again.loss) is type(base) and again.scales == (2, 4) and again.weights == weights
    assert float(keras.ops.convert_to_numpy(again(labels, _packed(full, coarse)))) == pytest.approx(got, rel=1e-6)
    with pytest.raises(ValueError, match="weights"):
        DeepSupervisionLoss(base, channels, (2, 4), (1.0,))


def test_hard_dice_reads_only_the_full_resolution_logits_of_a_packed_output():
    labels = np.random.default_rng(5).integers(0, 3, size=(1, 8, 8))
    right = np.eye(3)[labels].astype(np.float32) * 10
    packed = np.concatenate([right, np.roll(right, 1, axis=-1)], axis=-1)  # a wrong auxiliary output after it
    metric = HardDice(1, "kidney", channels=3)
    metric.update_state(labels, packed)
    assert float(metric.result()) == pytest.approx(1.0)
    assert HardDice.from_config(metric.get_config()).channels == 3
