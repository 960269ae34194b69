"""Fast whole-case inference: whole-slice prediction, the localised full pass and its two fallbacks."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kidney_seg.config import with_defaults
from kidney_seg.inference import (
    patch_divisor,
    predict_probabilities,
    predict_volume,
)
from kidney_seg.localization import cut_at_the_edge, foreground_box, large_components, sampled_slices, widened_to
from tests.test_inference import fake_plan, flip_equivariant_model, passthrough_model, threshold_model

SPACING = (2.5, 1.0, 1.0)


class Recorder:
    """A forward function that records the (N, H, W) of every batch it sees; ``divisor`` as a model's."""

    def __init__(self, fn, divisor: int | None = None):
        self.fn, self.shapes = fn, []
        if divisor:
            self.divisor = divisor

    def __call__(self, x):
        self.shapes.append(x.shape[:3])
        return self.fn(x)

    @property
    def pixels(self) -> int:
        return int(sum(np.prod(s) for s in self.shapes))


# ----------------------------------------------------------------------------- whole slices


def test_patch_divisor_is_the_power_of_two_of_the_patch():
    assert patch_divisor((224, 224)) == 32 and patch_divisor((128, 96)) == 32 and patch_divisor((30, 32)) == 2


@pytest.mark.parametrize("shape", [(3, 37, 50), (2, 64, 64), (1, 5, 90)])
@pytest.mark.parametrize("mirror_tta", [False, True])
def test_whole_slices_equal_the_sliding_window_for_a_pointwise_model(shape, mirror_tta):
    """Whole slices padded to the divisor, cropped back: the passthrough model gives its input back, as tiles do."""
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    fn = Recorder(passthrough_model, divisor=16)
    kw = {"num_classes": 2, "patch": (32, 32), "mirror_tta": mirror_tta, "batch_size": 4}
    whole = predict_probabilities(volume, fn, tiling="whole_slice", **kw)
    tiled = predict_probabilities(volume, passthrough_model, **kw)
    np.testing.assert_allclose(whole, tiled, atol=1e-6)
    assert all(h % 16 == 0 and w % 16 == 0 for _, h, w in fn.shapes)


def test_whole_slice_mirroring_is_flipped_back():
    """A flip-equivariant (symmetric) filter gives the same scores with and without mirror TTA."""
    volume = np.random.default_rng(1).normal(size=(2, 40, 44)).astype(np.float32)
    kw = {"num_classes": 2, "patch": (32, 32), "batch_size": 4, "tiling": "whole_slice"}
    on = predict_probabilities(volume, flip_equivariant_model, mirror_tta=True, **kw)
    off = predict_probabilities(volume, flip_equivariant_model, mirror_tta=False, **kw)
    np.testing.assert_allclose(on, off, atol=1e-6)


def test_a_real_models_divisor_is_its_downsampling():
    from kidney_seg.inference import Forward
    from kidney_seg.model import build_from_config

    model = build_from_config(
        with_defaults("model", {"base_filters": 2, "levels": 3, "blocks_per_level": 1}), 3, "softmax"
    )
    forward = Forward(model)
    assert forward.divisor == 4
    volume = np.random.default_rng(2).normal(size=(2, 30, 26)).astype(np.float32)
    probs = predict_probabilities(volume, forward, 3, (32, 32), tiling="whole_slice", mirror_tta=False)
    assert probs.shape == (3, 2, 30, 26) and np.allclose(probs.sum(axis=0), 1, atol=1e-5)


def test_an_unknown_tiling_is_refused():
    with pytest.raises(ValueError, match="unknown tiling"):
        predict_probabilities(np.zeros((1, 8, 8), np.float32), passthrough_model, 2, (8, 8), tiling="tiles")


# ----------------------------------------------------------------------------- the box


def test_sampled_slices_end_with_the_last():
    assert sampled_slices(10, 4) == [0, 4, 8, 9] and sampled_slices(9, 4) == [0, 4, 8] and sampled_slices(1, 3) == [0]


def test_foreground_box_widens_by_the_gap_and_the_margin():
    sampled = [0, 4, 8, 12]
    found = np.zeros((4, 50, 60), bool)
    found[1, 20:25, 30:32] = True  # slice 4
    found[2, 22:23, 28:29] = True  # slice 8
    box = foreground_box(found, sampled, (14, 50, 60), (3.0, 1.5, 2.0), every=4, margin_mm=6.0)
    # across slices: 3 unsampled + ceil(6 / 3) = 5 on each side of 4..8; in-plane ceil(6/1.5) = 4, ceil(6/2) = 3
    assert box == (slice(0, 14), slice(16, 29), slice(25, 35))
    assert foreground_box(np.zeros((4, 50, 60), bool), sampled, (14, 50, 60), (3, 1, 1), 4, 6.0) is None


def test_components_under_min_ml_do_not_place_the_box():
    sampled = [0, 4, 8, 12]
    found = np.zeros((4, 50, 60), bool)
    found[1:3, 20:30, 30:40] = True  # 200 sampled voxels x 4 slices x 1 mm3 = 0.8 ml
    found[3, 2, 2] = True  # a speck: 0.004 ml
    kw = {"shape": (14, 50, 60), "spacing": (1.0, 1.0, 1.0), "every": 4, "margin_mm": 0.0}
    assert foreground_box(found, sampled, **kw, min_ml=0.5) == (slice(1, 12), slice(20, 30), slice(30, 40))
    assert foreground_box(found, sampled, **kw, min_ml=0.0) == (slice(1, 14), slice(2, 30), slice(2, 40))
    assert foreground_box(found, sampled, **kw, min_ml=1.0) is None
    kept = large_components(found, 0.004, 0.5)
    assert kept.sum() == 200 and not kept[3, 2, 2]


def test_a_cut_is_foreground_at_an_edge_of_the_prediction_inside_the_volume():
    covered = np.zeros((20, 20), bool)
    covered[5:15, 5:20] = True  # its right edge is the slice's own
    fg = np.zeros((5, 20, 20), bool)
    fg[2, 8, 19] = True  # on the slice's edge: not a cut
    assert not cut_at_the_edge(fg, slice(0, 5), covered, 10)
    fg[0, 8, 8] = True  # the first predicted slice, and the volume starts there: not a cut
    assert not cut_at_the_edge(fg, slice(0, 5), covered, 10)
    assert cut_at_the_edge(fg, slice(3, 8), covered, 10)  # the volume goes on before slice 3
    fg[0, 8, 8] = False
    fg[-1, 8, 8] = True  # the last predicted slice, 5 < 10
    assert cut_at_the_edge(fg, slice(0, 5), covered, 10)
    fg[-1, 8, 8] = False
    fg[2, 5, 9] = True  # the first covered row, uncovered rows above it
    assert cut_at_the_edge(fg, slice(0, 5), covered, 10)
    assert not cut_at_the_edge(fg, slice(0, 5), covered, 10, voxel_ml=0.001, min_ml=0.002)  # a one-voxel speck
    fg[2, 5:8, 9] = True
    assert cut_at_the_edge(fg, slice(0, 5), covered, 10, voxel_ml=0.001, min_ml=0.002)  # three voxels: a component


def test_the_crop_is_widened_to_a_patch_inside_the_slice():
    assert widened_to((slice(40, 50), slice(10, 20)), (32, 32), (90, 100)) == (slice(29, 61), slice(0, 32))
    assert widened_to((slice(0, 60), slice(95, 100)), (32, 32), (90, 100)) == (slice(0, 60), slice(68, 100))
    assert widened_to((slice(3, 5), slice(3, 5)), (32, 32), (20, 40)) == (slice(0, 20), slice(0, 32))


# ----------------------------------------------------------------------------- the localised pass


def block_scan(shape=(24, 60, 70), block=((9, 15), (25, 35), (30, 40))) -> np.ndarray:
    """A 40 HU body (no air, so no crop) with a bright 250 HU block that the threshold model calls class 1."""
    image = np.full(shape, 40.0, np.float32)
    image[tuple(slice(a, b) for a, b in block)] = 250
    return image


def localized_cfg(**over) -> dict:
    return with_defaults(
        "inference",
        {
            "mirror_tta": False,
            "batch_size": 8,
            "tiling": "whole_slice",
            "localize": True,
            "localize_every": 4,
            "localize_min_ml": 0.0,
            **over,
        },
    )


def plan(**training) -> dict:
    """A plan on the scan's own grid (no resampling, no crop), with these training settings."""
    return fake_plan({"target_spacing": None, "clip": [-100, 300], "crop_to_body": False}, **training)


@pytest.mark.parametrize("tiling", ["sliding_window", "whole_slice"])
def test_the_localised_pass_equals_the_full_pass_on_fewer_pixels(caplog, tiling):
    image = block_scan(shape=(24, 100, 110))
    full_fn, fast_fn = Recorder(threshold_model), Recorder(threshold_model)
    full = predict_volume(image, SPACING, plan(), full_fn, localized_cfg(localize=False, tiling=tiling))
    with caplog.at_level(logging.INFO, logger="kidney_seg.inference"):
        fast = predict_volume(image, SPACING, plan(), fast_fn, localized_cfg(localize_margin_mm=5.0, tiling=tiling))
    np.testing.assert_array_equal(fast, full)
    assert (full == 1).sum() == 6 * 10 * 10  # the block, nothing else
    assert fast_fn.pixels < 0.8 * full_fn.pixels, (fast_fn.pixels, full_fn.pixels)  # the cheap pass included
    assert any("full pass on" in r.getMessage() for r in caplog.records)


def test_the_localised_pass_resamples_only_the_slices_it_predicts(monkeypatch):
    """On a plan that resamples in-plane: the sampled slices and the box's are resampled, the labels those of the
    full pass."""
    from kidney_seg import preprocessing

    image = block_scan(shape=(24, 100, 110))
    resampled = fake_plan({"target_spacing": [2.5, 1.6, 1.6], "clip": [-100, 300], "crop_to_body": False})
    full = predict_volume(image, SPACING, resampled, threshold_model, localized_cfg(localize=False))
    zoomed = []
    real = preprocessing._zoom2d
    monkeypatch.setattr(preprocessing, "_zoom2d", lambda plane, *a, **k: zoomed.append(1) or real(plane, *a, **k))
    fast = predict_volume(image, SPACING, resampled, threshold_model, localized_cfg(localize_margin_mm=5.0))
    np.testing.assert_array_equal(fast, full)
    assert (full == 1).any() and 6 <= len(zoomed) < 24, len(zoomed)  # 7 sampled slices, the box's 6 and its margin


def test_nothing_found_by_the_cheap_pass_falls_back_to_every_slice(caplog):
    """A 2-slice block between the sampled slices (0, 4, 8, ...): the cheap pass misses it, the full pass does not."""
    image = block_scan(block=((9, 11), (25, 35), (30, 40)))
    with caplog.at_level(logging.WARNING, logger="kidney_seg.inference"):
        labels = predict_volume(image, SPACING, plan(), threshold_model, localized_cfg())
    assert (labels == 1).sum() == 2 * 10 * 10
    assert any("no foreground of 0 ml in 7 sampled slices; every slice" in r.getMessage() for r in caplog.records)


def test_foreground_at_the_edge_of_the_box_falls_back_to_every_slice(caplog):
    """A box with no margin cuts the block at its faces: the full pass runs everywhere and finds all of it."""
    image = block_scan(block=((6, 18), (25, 35), (30, 40)))
    fn = Recorder(threshold_model)
    with caplog.at_level(logging.WARNING, logger="kidney_seg.inference"):
        labels = predict_volume(image, SPACING, plan(), fn, localized_cfg(localize_every=1, localize_margin_mm=0.0))
    assert (labels == 1).sum() == 12 * 10 * 10
    assert any("foreground reaches the edge" in r.getMessage() for r in caplog.records)
    assert sum(s[0] for s in fn.shapes) == 24 + 12 + 24  # the cheap pass, the box's slices, then every slice


def test_outside_the_box_is_background_for_sigmoid_models_too():
    from tests.test_inference import sigmoid_threshold_model

    image = block_scan()
    cfg = localized_cfg(localize_margin_mm=5.0)
    labels = predict_volume(image, SPACING, plan(output_activation="sigmoid"), sigmoid_threshold_model, cfg)
    full = predict_volume(
        image, SPACING, plan(output_activation="sigmoid"), sigmoid_threshold_model, {**cfg, "localize": False}
    )
    np.testing.assert_array_equal(labels, full)
    assert (labels == 1).sum() == 6 * 10 * 10


def test_a_speck_of_the_cheap_pass_neither_widens_the_box_nor_forces_the_fallback(caplog):
    """Whole slices: a bright one-voxel speck far from the block is dropped by localize_min_ml; the block is found."""
    image = block_scan(shape=(24, 100, 110))
    image[12, 90, 100] = 250  # a sampled slice: the cheap pass sees it
    full = predict_volume(image, SPACING, plan(), threshold_model, localized_cfg(localize=False))
    fn = Recorder(threshold_model)
    with caplog.at_level(logging.INFO, logger="kidney_seg.inference"):
        fast = predict_volume(image, SPACING, plan(), fn, localized_cfg(localize_margin_mm=5.0, localize_min_ml=0.5))
    assert (full == 1).sum() == 6 * 10 * 10 + 1
    assert (fast == 1).sum() == 6 * 10 * 10 and fast[12, 90, 100] == 0  # the speck is outside the box
    np.testing.assert_array_equal(fast[:, :80, :80], full[:, :80, :80])
    assert not any("every slice" in r.getMessage() for r in caplog.records)
    _, h, w = fn.shapes[-1]  # the full pass's last call
    assert h * w < 0.25 * 100 * 110  # an in-plane crop, not the whole slice
