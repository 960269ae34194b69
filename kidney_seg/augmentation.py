"""Training augmentation: the batchgenerators transforms built from the ``training`` config, and their use.

The paper's augmentation is a random crop, a rare scaling (``p_scale``, ``scale_range``)
and mirroring of both in-plane axes (``p_mirror``); it is all a default config does. The
``augmentation`` block adds the other transforms of nnU-Net v2's 2D training
(``nnUNetTrainer.get_training_transforms`` in MIC-DKFZ/nnUNet, nnunetv2/training/nnUNetTrainer/
nnUNetTrainer.py, its batchgenerators version; the batchgeneratorsv2 version that replaced it
keeps the probabilities and ranges), in its order: spatial (rotation,
scaling), Gaussian noise, Gaussian blur, multiplicative brightness, contrast, low-resolution
simulation, gamma of the inverted image, gamma, mirroring. A transform whose probability is
0 is left out of the pipeline, so it draws no random numbers and the paper's stream is
unchanged. presets/nnunet-augmentation.yaml sets nnU-Net's probabilities and ranges.

Every slice is augmented with NumPy's and Python's global generators seeded from its own
seed (batchgenerators draws from both: noise variances and blur sigmas come from Python's
``random``); :func:`seeded_globals` restores both afterwards.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from kidney_seg.preprocessing import padding_value

#: The optional transforms of the ``augmentation`` block, rotation first, then nnU-Net's intensity order.
STEPS = ("rotation", "noise", "blur", "brightness", "contrast", "low_resolution", "gamma_inverted", "gamma")
#: The steps with a per-channel probability (nnU-Net sets 0.5 for both).
PER_CHANNEL_STEPS = ("blur", "low_resolution")
#: Extra context (pixels) on each side of a centred crop beyond what scaling and rotation can reach.
SPLINE_MARGIN = 4


@dataclass(frozen=True)
class Step:
    """One optional transform: probability per slice, its range, and its probability per channel."""

    p: float
    range: tuple[float, float]
    p_per_channel: float


@dataclass(frozen=True)
class Augmentation:
    """The ``augmentation`` block of the training config, picklable."""

    rotation: Step
    noise: Step
    blur: Step
    brightness: Step
    contrast: Step
    low_resolution: Step
    gamma_inverted: Step
    gamma: Step
    label_order: int

    @classmethod
    def from_config(cls, block: dict) -> Augmentation:
        """The settings of a validated ``training.augmentation`` block."""
        steps = {name: _step(block[name], name in PER_CHANNEL_STEPS) for name in STEPS}
        return cls(**steps, label_order=int(block["label_order"]))


def _step(sub: dict, per_channel: bool) -> Step:
    """One sub-block as a Step (steps without a per-channel probability act on every channel)."""
    return Step(
        float(sub["p"]), (float(sub["range"][0]), float(sub["range"][1])), sub["p_per_channel"] if per_channel else 1.0
    )


@dataclass(frozen=True)
class Augmenter:
    """The transforms of one stream: a spatial transform per crop kind, then everything after it."""

    patch_size: tuple[int, ...]
    random_crop: SpatialTransform
    centred: SpatialTransform
    rest: Compose
    margin: tuple[int, ...]

    def region(self) -> tuple[int, ...]:
        """Size of the region a centred crop is cut from: the patch plus ``margin`` on each side."""
        return tuple(p + 2 * m for p, m in zip(self.patch_size, self.margin))

    def centre_index(self) -> tuple[int, ...]:
        """Where in that region the patch's centre pixel (``patch_size // 2``) lies: the centred transform's crop."""
        return tuple(m + p // 2 for p, m in zip(self.patch_size, self.margin))


def spatial_transform(
    patch_size, scale_range, p_scale: float, rotation: Step | None, label_order: int, random_crop: bool
) -> SpatialTransform:
    """Scaling and rotation, then a random crop (``random_crop``) or the centre of the input.

    Data outside the input reads 0 (``border_mode_data="constant"``; batchgenerators' random
    crop pads with 0 too): :func:`augment` shifts each slice by its padding value first.
    """
    patch = tuple(int(p) for p in patch_size)
    rotate = rotation is not None and rotation.p > 0
    angles = tuple(math.radians(a) for a in rotation.range) if rotate else (0.0, 0.0)
    return SpatialTransform(
        patch,
        patch_center_dist_from_border=[p // 2 for p in patch],
        do_elastic_deform=False,
        do_rotation=rotate,
        angle_x=angles,
        p_rot_per_sample=rotation.p if rotate else 0.0,
        do_scale=p_scale > 0,
        scale=tuple(scale_range),
        border_mode_data="constant",
        border_cval_data=0.0,
        order_data=3,
        border_mode_seg="constant",
        border_cval_seg=0,
        order_seg=label_order,
        random_crop=random_crop,
        p_scale_per_sample=p_scale,
    )


def intensity_transforms(aug: Augmentation) -> list[AbstractTransform]:
    """nnU-Net v2's intensity transforms with the configured probabilities and ranges; those with p 0 left out."""
    built = {
        "noise": lambda s: GaussianNoiseTransform(noise_variance=s.range, p_per_sample=s.p),
        "blur": lambda s: GaussianBlurTransform(
            s.range, different_sigma_per_channel=True, p_per_sample=s.p, p_per_channel=s.p_per_channel
        ),
        "brightness": lambda s: BrightnessMultiplicativeTransform(multiplier_range=s.range, p_per_sample=s.p),
        "contrast": lambda s: ContrastAugmentationTransform(contrast_range=s.range, p_per_sample=s.p),
        "low_resolution": lambda s: SimulateLowResolutionTransform(
            zoom_range=s.range,
            per_channel=True,
            p_per_channel=s.p_per_channel,
            order_downsample=0,
            order_upsample=3,
            p_per_sample=s.p,
        ),
        "gamma_inverted": lambda s: GammaTransform(s.range, True, True, retain_stats=True, p_per_sample=s.p),
        "gamma": lambda s: GammaTransform(s.range, False, True, retain_stats=True, p_per_sample=s.p),
    }
    return [make(getattr(aug, name)) for name, make in built.items() if getattr(aug, name).p > 0]


def centred_margin(patch_size, scale_range, rotation: Step | None) -> tuple[int, ...]:
    """Context on each side of a centred patch that scaling (up to ``scale_range[1]``) and rotation can sample.

    nnU-Net sizes its larger initial patch with ``get_patch_size(..., (0.85, 1.25))`` in
    ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``, whose own comment says it
    "doesn't even use the correct scale range" (it scales in (0.7, 1.4)); this margin is
    computed from the configured range and rotation, so a centred crop never samples
    outside the region it was cut from.
    """
    reach = max(float(scale_range[1]), 1.0) * (math.sqrt(2.0) if rotation is not None and rotation.p > 0 else 1.0)
    return tuple(math.ceil(int(p) / 2 * (reach - 1.0)) + SPLINE_MARGIN for p in patch_size)


def make_augmenter(
    patch_size, scale_range, p_scale: float, p_mirror: float, aug: Augmentation | None = None
) -> Augmenter:
    """The stream's transforms: the paper's (``aug`` None or all probabilities 0) plus the configured extra ones."""
    rotation = aug.rotation if aug is not None else None
    label_order = aug.label_order if aug is not None else 0
    rest = intensity_transforms(aug) if aug is not None else []
    return Augmenter(
        patch_size=tuple(int(p) for p in patch_size),
        random_crop=spatial_transform(patch_size, scale_range, p_scale, rotation, label_order, random_crop=True),
        centred=spatial_transform(patch_size, scale_range, p_scale, rotation, label_order, random_crop=False),
        rest=Compose([*rest, MirrorTransform(axes=(0, 1), p_per_sample=p_mirror)]),
        margin=centred_margin(patch_size, scale_range, rotation),
    )


@contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Seed NumPy's and Python's global generators (batchgenerators draws from both); restore them after."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def augment(
    augmenter: Augmenter,
    image: np.ndarray,
    label: np.ndarray,
    seed: int,
    centred: bool = False,
    pad: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one 2D slice with a given seed: a random crop, or the centre of the input (``centred``).

    Outside the input reads ``pad`` (None: the slice's
    :func:`~kidney_seg.preprocessing.padding_value`). The spatial transform pads with 0, so
    the slice goes through it minus the padding value and gets it back after (spline
    interpolation reproduces constants, so only the padding changes); the intensity
    transforms and mirroring then see the normalised values.
    """
    pad = np.float32(padding_value(image) if pad is None else pad)
    spatial = augmenter.centred if centred else augmenter.random_crop
    with seeded_globals(seed):
        out = spatial(data=image[None, None].astype(np.float32) - pad, seg=label[None, None].astype(np.float32))
        out = augmenter.rest(data=out["data"] + pad, seg=out["seg"])
    return out["data"][0, 0].astype(np.float32, copy=False), np.rint(out["seg"][0, 0]).astype(np.uint8)
