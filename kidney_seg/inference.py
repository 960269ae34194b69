"""Sliding-window inference as nnU-Net does it, mapped back to each scan's own grid.

Per slice: tiles of the training patch size, a step of ``step * patch`` with the tiles
spread so that the last one ends flush with the edge; each tile's logits are weighted by
a Gaussian importance map (sigma = patch / 8) or a constant and summed, then divided by
the summed weights. Slices smaller than a tile are padded and the padding removed.
Mirror test-time augmentation averages the logits of the 4 mirrorings over both in-plane
axes, each flipped back. The softmax probabilities are resampled (linearly) to the
original spacing one class at a time, keeping a running argmax, so memory stays at a few
arrays of the original volume's size.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from kidney_seg.io import from_internal, load_image, save_like
from kidney_seg.preprocessing import preprocess_image

log = logging.getLogger(__name__)

PredictFn = Callable[[np.ndarray], np.ndarray]
MIRRORS = ((), (1,), (2,), (1, 2))  # flips of the (B, H, W, C) batch axes


def gaussian_importance_map(patch: tuple[int, int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """nnU-Net's Gaussian tile weights, peak 1, no zeros."""
    tmp = np.zeros(patch, dtype=np.float64)
    tmp[tuple(p // 2 for p in patch)] = 1
    weights = ndimage.gaussian_filter(tmp, [p * sigma_scale for p in patch], mode="constant", cval=0)
    weights = weights / weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return weights.astype(np.float32)


def tile_starts(size: int, patch: int, step: float) -> list[int]:
    """Tile start offsets along one axis; the last tile ends flush with the edge."""
    if size <= patch:
        return [0]
    n = int(math.ceil((size - patch) / (patch * step))) + 1
    return [int(round(v)) for v in np.linspace(0, size - patch, n)]


def pad_to(stack: np.ndarray, patch: tuple[int, int]) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Pad a stack of 2D slices (edge values) to at least ``patch`` in-plane; return the original region."""
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(stack.shape[1:], patch)]
    padded = np.pad(stack, [(0, 0)] + pads, mode="edge")
    region = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, stack.shape[1:]))
    return padded, region


def _run_batches(tiles: np.ndarray, predict_fn: PredictFn, batch_size: int) -> np.ndarray:
    """Logits of (N, H, W, 1) tiles, ``batch_size`` at a time."""
    return np.concatenate([np.asarray(predict_fn(tiles[i : i + batch_size]), dtype=np.float32)
                           for i in range(0, len(tiles), batch_size)])


def tile_corners(shape: tuple[int, int], patch: tuple[int, int], step: float) -> list[tuple[int, int]]:
    """Top-left corners of the tiles covering a (padded) slice."""
    return [(y, x) for y in tile_starts(shape[0], patch[0], step) for x in tile_starts(shape[1], patch[1], step)]


def predict_slab_logits(
    slab: np.ndarray,
    predict_fn: PredictFn,
    num_classes: int,
    patch: tuple[int, int],
    step: float = 0.5,
    gaussian: bool = True,
    mirror_tta: bool = True,
    batch_size: int = 16,
) -> np.ndarray:
    """Aggregated logits (K, H, W, C) of a stack of K normalised slices, all tiles batched together."""
    padded, region = pad_to(np.asarray(slab, dtype=np.float32), patch)
    weights = gaussian_importance_map(patch) if gaussian else np.ones(patch, dtype=np.float32)
    corners = tile_corners(padded.shape[1:], patch, step)
    tiles = np.stack([padded[k, y : y + patch[0], x : x + patch[1]] for k in range(len(padded)) for y, x in corners])[..., None]
    mirrors = MIRRORS if mirror_tta else ((),)
    batch = np.concatenate([np.flip(tiles, axis=axes) if axes else tiles for axes in mirrors])
    out = _run_batches(np.ascontiguousarray(batch), predict_fn, batch_size).reshape((len(mirrors),) + tiles.shape[:3] + (num_classes,))
    logits = sum(np.flip(o, axis=axes) if axes else o for o, axes in zip(out, mirrors)) / len(mirrors)
    total = np.zeros(padded.shape + (num_classes,), dtype=np.float32)
    norm = np.zeros(padded.shape[1:], dtype=np.float32)
    for i, tile_logits in enumerate(logits):
        k, (y, x) = i // len(corners), corners[i % len(corners)]
        total[k, y : y + patch[0], x : x + patch[1]] += tile_logits * weights[..., None]
    for y, x in corners:
        norm[y : y + patch[0], x : x + patch[1]] += weights
    return (total / norm[..., None])[(slice(None),) + region]


def predict_slice_logits(image: np.ndarray, predict_fn: PredictFn, num_classes: int, patch: tuple[int, int], **kwargs) -> np.ndarray:
    """Aggregated logits (H, W, C) of one normalised 2D slice."""
    return predict_slab_logits(np.asarray(image)[None], predict_fn, num_classes, patch, **kwargs)[0]


def slab_size(shape: tuple[int, int], patch: tuple[int, int], step: float, mirror_tta: bool, batch_size: int) -> int:
    """Slices per slab so that one slab fills about one batch of tiles."""
    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    per_slice = len(tile_corners(padded, patch, step)) * (len(MIRRORS) if mirror_tta else 1)
    return max(1, batch_size // per_slice)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def predict_probabilities(volume: np.ndarray, predict_fn: PredictFn, num_classes: int, patch, step: float = 0.5,
                          gaussian: bool = True, mirror_tta: bool = True, batch_size: int = 16) -> np.ndarray:
    """Softmax probabilities (C, Z, Y, X) of a preprocessed volume, a slab of slices at a time."""
    probs = np.empty((num_classes,) + volume.shape, dtype=np.float32)
    k = slab_size(volume.shape[1:], tuple(patch), step, mirror_tta, batch_size)
    for z in range(0, volume.shape[0], k):
        logits = predict_slab_logits(volume[z : z + k], predict_fn, num_classes, tuple(patch), step=step, gaussian=gaussian,
                                     mirror_tta=mirror_tta, batch_size=batch_size)
        probs[:, z : z + k] = np.moveaxis(softmax(logits), -1, 0)
    return probs


def probabilities_to_labels(probs: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample each class's probability linearly to ``shape``; keep a running argmax."""
    best = np.full(shape, -np.inf, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    for c, prob in enumerate(probs):
        if prob.shape != tuple(shape):
            prob = ndimage.zoom(prob, [n / o for n, o in zip(shape, prob.shape)], order=1, mode="nearest", grid_mode=True)
        better = prob > best
        labels[better] = c
        best[better] = prob[better]
    return labels


def predict_volume(image: np.ndarray, spacing, settings: dict, predict_fn: PredictFn, inference_cfg: dict) -> np.ndarray:
    """Labels on the original internal grid of a raw (HU) internal-orientation volume."""
    volume = preprocess_image(image, spacing, settings["target_spacing"], settings["clip"], settings["normalization"])
    probs = predict_probabilities(
        volume, predict_fn, settings["num_classes"], tuple(settings["patch_size"]), step=inference_cfg["step"],
        gaussian=inference_cfg["gaussian"], mirror_tta=inference_cfg["mirror_tta"], batch_size=inference_cfg["batch_size"],
    )
    return probabilities_to_labels(probs, image.shape)


def load_predictor(model_dir: str | os.PathLike) -> tuple[PredictFn, dict]:
    """The trained model's forward function and its inference settings."""
    import keras

    from kidney_seg.model import load_model

    model_dir = Path(model_dir)
    settings = json.loads((model_dir / "inference.json").read_text())
    model = load_model(model_dir / "model.keras", compile=False)
    return (lambda x: keras.ops.convert_to_numpy(model.predict_on_batch(x))), settings


def predict_case(case_id: str, image_path: str | os.PathLike, model_dir: str | os.PathLike, out_path: str | os.PathLike,
                 inference_cfg: dict, predictor: tuple[PredictFn, dict] | None = None) -> np.ndarray:
    """Segment one scan and write uint8 labels on its exact input grid."""
    predict_fn, settings = predictor or load_predictor(model_dir)
    image, geometry = load_image(image_path, case_id)
    labels = predict_volume(image, geometry.spacing, settings, predict_fn, inference_cfg)
    out = from_internal(labels, geometry)
    save_like(out_path, out, reference=image_path)
    log.info("%s: predicted %s voxels, labels %s", case_id, out.shape, np.unique(out).tolist())
    return out
