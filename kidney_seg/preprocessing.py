"""From a raw CT case to the cached, normalised 2D slices the model trains on.

Steps, shared by training and inference (``preprocess_image``):
1. clip HU to a window (the paper's [-75.76, 349.49] by default);
2. per-slice z-score (the paper's normalisation);
3. resample to the target spacing, nnU-Net's way for anisotropic data: in-plane cubic
   (order 3) slice by slice, then nearest (order 0) across slices. Labels are resampled
   as one-hot maps with linear interpolation in-plane, then argmax.

The cache per case is ``image.npy`` (float32, slices x rows x cols, memory-mappable),
``label.npy`` (uint8) and ``meta.json`` (geometry, spacing and per-class slice lists).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from kidney_seg.errors import CaseDataError
from kidney_seg.io import load_image, load_label, save_npy_atomic, write_json_atomic

log = logging.getLogger(__name__)


def clip_hu(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip intensities to ``[low, high]`` HU."""
    low, high = float(window[0]), float(window[1])
    if not low < high:
        raise ValueError(f"clip window {window} must have low < high")
    return np.clip(image, low, high).astype(np.float32, copy=False)


def zscore_slices(image: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Normalise each slice (axis 0) to zero mean and unit variance."""
    mean = image.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    std = image.std(axis=(1, 2), keepdims=True, dtype=np.float64)
    return ((image - mean) / np.maximum(std, eps)).astype(np.float32)


def normalize(image: np.ndarray, method: str) -> np.ndarray:
    """Apply the configured intensity normalisation."""
    if method == "zscore_slice":
        return zscore_slices(image)
    raise ValueError(f"unknown normalization {method!r}")


def resampled_shape(shape: tuple[int, ...], spacing, target_spacing) -> tuple[int, int, int]:
    """Shape of a volume after resampling from ``spacing`` to ``target_spacing``."""
    return tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target_spacing))


def _zoom_to(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resize ``array`` to exactly ``shape`` with pixel-extent alignment."""
    if tuple(array.shape) == tuple(shape):
        return array
    factors = [n / o for n, o in zip(shape, array.shape)]
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if out.shape != tuple(shape):  # zoom rounds; guard the contract
        raise AssertionError(f"zoom produced {out.shape}, expected {shape}")
    return out


def resample_image(image: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Cubic in-plane, nearest across slices (nnU-Net's anisotropic scheme)."""
    inplane = np.stack([_zoom_to(s, shape[1:], order=3) for s in image]) if image.shape[1:] != shape[1:] else image
    return _zoom_to(inplane, (shape[0],) + tuple(inplane.shape[1:]), order=0).astype(np.float32, copy=False)


def resample_label(label: np.ndarray, shape: tuple[int, int, int], num_classes: int) -> np.ndarray:
    """One-hot, linear in-plane, nearest across slices, then argmax."""
    best = np.full(shape, -1.0, dtype=np.float32)
    out = np.zeros(shape, dtype=np.uint8)
    for c in range(num_classes):
        onehot = (label == c).astype(np.float32)
        inplane = np.stack([_zoom_to(s, shape[1:], order=1) for s in onehot]) if label.shape[1:] != shape[1:] else onehot
        prob = _zoom_to(inplane, shape, order=0)
        better = prob > best
        out[better] = c
        best[better] = prob[better]
    return out


def preprocess_image(image: np.ndarray, spacing, target_spacing, clip, normalization: str) -> np.ndarray:
    """Clip, normalise and resample an internal-orientation CT volume."""
    normed = normalize(clip_hu(image, clip), normalization)
    return resample_image(normed, resampled_shape(image.shape, spacing, target_spacing))


def slice_index(label: np.ndarray, num_classes: int) -> dict[str, list[int]]:
    """Slices (axis 0) that contain each foreground class, and any foreground."""
    present = {"foreground": np.flatnonzero(label.reshape(label.shape[0], -1).max(axis=1) > 0).tolist()}
    for c in range(1, num_classes):
        present[f"class_{c}"] = np.flatnonzero((label == c).reshape(label.shape[0], -1).any(axis=1)).tolist()
    return present


def preprocess_case(
    case_id: str,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    target_spacing,
    clip,
    normalization: str,
    valid_labels: tuple[int, ...],
) -> dict:
    """Load one labelled case, preprocess it and write the slice cache; returns meta."""
    image, geometry = load_image(image_path, case_id)
    label = load_label(label_path, case_id, valid_labels, geometry)
    if image.shape[0] < 1 or min(image.shape) < 2:
        raise CaseDataError(case_id, image_path, f"volume too small: {image.shape}")
    num_classes = len(valid_labels)
    data = preprocess_image(image, geometry.spacing, target_spacing, clip, normalization)
    seg = resample_label(label, data.shape, num_classes)
    out = Path(out_dir)
    save_npy_atomic(out / "image.npy", data)
    save_npy_atomic(out / "label.npy", seg)
    meta = {
        "case_id": case_id,
        "geometry": geometry.to_dict(),
        "spacing": list(geometry.spacing),
        "target_spacing": [float(t) for t in target_spacing],
        "shape": list(data.shape),
        "num_classes": num_classes,
        "slices": slice_index(seg, num_classes),
    }
    write_json_atomic(out / "meta.json", meta)
    log.info("%s: %s at %s mm -> %s at %s mm", case_id, geometry.internal_shape, geometry.spacing, data.shape, target_spacing)
    return meta
