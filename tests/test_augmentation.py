"""The training augmentation: each configured transform acts, the label follows the image, p 0 removes a transform."""

import random

import numpy as np
import pytest
import yaml

from kidney_seg.augmentation import Augmentation, augment, make_augmenter, seeded_globals
from kidney_seg.config import deep_merge, load_config, with_defaults
from tests.conftest import REPO

PATCH = (32, 32)
#: Every intensity transform at p 1 with a range that surely changes a two-level slice.
INTENSITY = {
    "noise": {"range": [0.5, 0.5]},
    "blur": {"p_per_channel": 1.0, "range": [1.5, 1.5]},
    "brightness": {"range": [1.5, 1.5]},
    "contrast": {"range": [0.5, 0.5]},
    "low_resolution": {"p_per_channel": 1.0, "range": [0.5, 0.5]},
    "gamma_inverted": {"range": [2.0, 2.0]},
    "gamma": {"range": [2.0, 2.0]},
}


def settings(**steps) -> Augmentation:
    """The augmentation block with the schema's defaults and ``steps`` merged in."""
    return Augmentation.from_config(with_defaults("training", {"augmentation": steps})["augmentation"])


def marker() -> tuple[np.ndarray, np.ndarray]:
    """A 48 x 48 slice whose intensity encodes its label: 0 background, 8-12 in an off-centre block (label 1)."""
    label = np.zeros((48, 48), np.uint8)
    label[12:22, 26:38] = 1
    ramp = np.linspace(8.0, 12.0, 48, dtype=np.float32)[None, :]  # not two levels: gamma keeps mean and std
    return np.where(label == 1, ramp, 0.0).astype(np.float32), label


def centred(aug: Augmentation | None, seed: int = 0, p_scale: float = 0.0, scale=(0.7, 1.4), p_mirror: float = 0.0):
    """The centred 32 x 32 crop of the marker slice after the transforms."""
    image, label = marker()
    return augment(make_augmenter(PATCH, scale, p_scale, p_mirror, aug), image, label, seed, centred=True)


def test_the_default_block_is_the_papers_augmentation():
    image, label = marker()
    paper, block = (
        make_augmenter(PATCH, (0.6, 1.25), 0.5, 1.0),
        make_augmenter(PATCH, (0.6, 1.25), 0.5, 1.0, settings()),
    )
    assert [type(t).__name__ for t in block.rest.transforms] == ["MirrorTransform"]
    assert not block.random_crop.do_rotation
    for seed in range(8):
        for a, b in zip(augment(paper, image, label, seed), augment(block, image, label, seed)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(INTENSITY))
def test_each_intensity_transform_acts_and_leaves_the_label(name):
    x0, y0 = centred(None)
    x, y = centred(settings(**{name: {**INTENSITY[name], "p": 1.0}}))
    assert np.abs(x - x0).max() > 0.1, f"{name} did not change the image"
    np.testing.assert_array_equal(y, y0)
    off, y_off = centred(settings(**{name: {**INTENSITY[name], "p": 0.0}}))
    np.testing.assert_array_equal(off, x0)  # switched off: no effect, no random numbers drawn
    np.testing.assert_array_equal(y_off, y0)


@pytest.mark.parametrize("label_order", [0, 1])
def test_rotation_moves_the_marker_with_its_label(label_order):
    x0, y0 = centred(None)
    x, y = centred(settings(rotation={"p": 1.0, "range": [90.0, 90.0]}, label_order=label_order))
    turns = [k for k in (1, -1) if np.array_equal(y, np.rot90(y0, k))]
    assert turns, "a quarter turn about the patch centre maps the label grid onto itself"
    np.testing.assert_allclose(x, np.rot90(x0, turns[0]), atol=1e-3)  # the image turned the same way
    assert not np.array_equal(y, y0)
    off, _ = centred(settings(rotation={"p": 0.0, "range": [90.0, 90.0]}))
    np.testing.assert_array_equal(off, x0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks."""
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("label_order", [0, 1])
def test_the_label_follows_the_image_through_every_transform(label_order):
    preset = yaml.safe_load((REPO / "presets" / "nnunet-augmentation.yaml").read_text())["training"]
    cfg = with_defaults("training", deep_merge(preset, {"augmentation": {"label_order": label_order}}))
    spatial_only = settings(rotation={"p": 1.0}, label_order=label_order)
    for seed in range(6):
        x, y = centred(spatial_only, seed, p_scale=1.0, p_mirror=1.0)
        assert iou(x > 5, y == 1) > 0.9
        x, y = centred(Augmentation.from_config(cfg["augmentation"]), seed, 1.0, cfg["scale_range"], 1.0)
        assert iou(x > np.median(x[y == 1]) / 2 + np.median(x[y == 0]) / 2, y == 1) > 0.85


def test_scaling_zooms_image_and_label_together():
    x, y = centred(None, p_scale=1.0, scale=(0.5, 0.5))  # sample half the extent: the block looks twice as big
    assert (y == 1).sum() > 1.3 * (centred(None)[1] == 1).sum()  # (and partly leaves the patch)
    assert iou(x > 5, y == 1) > 0.95


def test_a_centred_region_covers_all_that_scaling_and_rotation_reach():
    aug = settings(rotation={"p": 1.0, "range": [45.0, 45.0]})  # the diagonal reaches farthest
    augmenter = make_augmenter(PATCH, (1.4, 1.4), 1.0, 0.0, aug)
    region = np.ones(augmenter.region(), np.float32)
    out, _ = augment(augmenter, region, np.zeros(region.shape, np.uint8), seed=0, centred=True, pad=0.0)
    np.testing.assert_allclose(out, 1.0, atol=1e-4)  # nothing from outside the region (0) reaches the patch


def test_augmentation_is_a_function_of_the_seed_and_leaves_the_global_generators_alone():
    aug = settings(noise={"p": 1.0, "range": [0.0, 1.0]}, blur={"p": 1.0, "p_per_channel": 1.0})
    image, label = marker()
    augmenter = make_augmenter(PATCH, (0.7, 1.4), 0.5, 1.0, aug)
    first = augment(augmenter, image, label, seed=3)
    random.seed(99)  # noise variances and blur sigmas come from Python's random
    np.random.seed(99)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    again = augment(augmenter, image, label, seed=3)
    np.testing.assert_array_equal(first[0], again[0])
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist() and random.getstate() == python_state
    assert not np.array_equal(first[0], augment(augmenter, image, label, seed=4)[0])


def test_seeded_globals_restores_on_error():
    state = random.getstate()
    with pytest.raises(RuntimeError), seeded_globals(1):
        random.random()
        raise RuntimeError
    assert random.getstate() == state


def test_the_nnunet_preset_validates_and_switches_every_transform_on():
    cfg = load_config(REPO / "config.yaml", REPO / "presets" / "nnunet-augmentation.yaml")["training"]
    augmenter = make_augmenter(
        cfg["patch_size"],
        cfg["scale_range"],
        cfg["p_scale"],
        cfg["p_mirror"],
        Augmentation.from_config(cfg["augmentation"]),
    )
    assert augmenter.random_crop.do_rotation and augmenter.centred.order_seg == 1
    names = [type(t).__name__ for t in augmenter.rest.transforms]
    assert names == [
        "GaussianNoiseTransform",
        "GaussianBlurTransform",
        "BrightnessMultiplicativeTransform",
        "ContrastAugmentationTransform",
        "SimulateLowResolutionTransform",
        "GammaTransform",
        "GammaTransform",
        "MirrorTransform",
    ]
    assert [t.invert_image for t in augmenter.rest.transforms if type(t).__name__ == "GammaTransform"] == [True, False]
