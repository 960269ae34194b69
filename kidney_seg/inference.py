"""Sliding-window inference and fold ensembles (as nnU-Net v2 does them), mapped back to each scan's own grid.

Per slice: tiles of the training patch size, a step of ``step * patch`` with the tiles
spread so that the last one ends flush with the edge; each tile's logits are weighted by
a Gaussian importance map (sigma = patch / 8) or a constant and summed, then divided by
the summed weights. Slices smaller than a tile are padded and the padding removed; the
padding is the slice's :func:`kidney_seg.preprocessing.padding_value` (what normalised
background reads as, the value training and validation crops pad with too; nnU-Net pads
with 0). Mirror test-time augmentation averages the logits of the 4 mirrorings over both
in-plane axes, each flipped back. The scan is first cropped to the body and preprocessed
exactly as in training (:func:`kidney_seg.preprocessing.preprocess_image`, settings from
the model's inference.json, a copy of the plan it was trained with: :mod:`kidney_seg.plan`).

A fold ensemble (``results/model/fold_*``) predicts each slab with every fold and averages
their logits, as nnU-Net v2 does; the averaged logits become class scores once (softmax
probabilities; for a sigmoid model the foreground sigmoids with background 1 - their
maximum, :func:`sigmoid_scores`; for a region model :func:`region_scores`).

Two grids come out. On the plan's grid (the crop box at the target spacing,
:class:`PlanGrid`) the labels are the argmax of the class scores, no resampling
(:func:`scores_to_labels`; the workflow scores them as the ``plan_grid_*`` metrics). On
the scan's own grid the class scores are resampled to the cropped region's original shape
(:func:`probabilities_to_labels`: linear in-plane, and linear across slices, where
nnU-Net resamples its scores with nearest neighbour; linear was chosen on the round-trip
ceiling of the real KiTS19 labels, docs/metrics.md) a slab of slices at a time, one class
after the other, keeping a running argmax, and pasted into a full-size label volume that
is 0 outside the crop box: at the original resolution only the uint8 labels and a few
slab-sized arrays exist.

Memory stays bounded: tiles are built a slab of slices at a time (about one batch), the
class scores are float32 at the preprocessed resolution only, and no full-size float64 or
4D array at the original resolution is ever made. The decided post-processing
(``results/model/postprocessing.json``) is applied by the workflow's ``postprocess`` rule
(to both grids), or by the command line (:func:`predict_case` takes the steps as a function).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from kidney_seg.localization import cut_at_the_edge, foreground_box, sampled_slices, widened_to
from kidney_seg.plan import OUTPUT_ACTIVATIONS, read_plan
from kidney_seg.preprocessing import (
    Box,
    ResampledScan,
    box_from_list,
    box_to_list,
    nearest_indices,
    padding_value,
    prepare_image,
    preprocess_image,
)
from kidney_seg.quality import kidney_intensity, normalised_entropy, strict_json, uncertainty_summary
from kidney_seg.volume import Geometry, from_internal, read_image, save_like, save_nifti

log = logging.getLogger(__name__)

PredictFn = Callable[[np.ndarray], np.ndarray]
MIRRORS = ((), (1,), (2,), (1, 2))  # flips of the (B, H, W, C) batch axes
#: How class scores cross slices on the way back to a scan's grid (chosen on the round-trip ceiling: docs/metrics.md).
SCORES_ACROSS_SLICES = "linear"


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
    """Pad a stack of 2D slices to at least ``patch`` in-plane, each slice with its
    :func:`~kidney_seg.preprocessing.padding_value`; return the padded stack and the original region."""
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(stack.shape[1:], patch)]
    region = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, stack.shape[1:]))
    if not any(lo or hi for lo, hi in pads):
        return stack, region
    shape = (len(stack),) + tuple(s + lo + hi for s, (lo, hi) in zip(stack.shape[1:], pads))
    padded = np.empty(shape, dtype=stack.dtype)
    for k, plane in enumerate(stack):
        padded[k] = padding_value(plane)
        padded[k][region] = plane
    return padded, region


def _run_batches(tiles: np.ndarray, predict_fn: PredictFn, batch_size: int) -> np.ndarray:
    """Logits of (N, H, W, 1) tiles, ``batch_size`` at a time."""
    return np.concatenate(
        [np.asarray(predict_fn(tiles[i : i + batch_size]), dtype=np.float32) for i in range(0, len(tiles), batch_size)]
    )


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
    tiles = np.stack([padded[k, y : y + patch[0], x : x + patch[1]] for k in range(len(padded)) for y, x in corners])[
        ..., None
    ]
    mirrors = MIRRORS if mirror_tta else ((),)
    batch = np.concatenate([np.flip(tiles, axis=axes) if axes else tiles for axes in mirrors])
    out = _run_batches(np.ascontiguousarray(batch), predict_fn, batch_size).reshape(
        (len(mirrors),) + tiles.shape[:3] + (num_classes,)
    )
    logits = sum(np.flip(o, axis=axes) if axes else o for o, axes in zip(out, mirrors)) / len(mirrors)
    total = np.zeros(padded.shape + (num_classes,), dtype=np.float32)
    norm = np.zeros(padded.shape[1:], dtype=np.float32)
    for i, tile_logits in enumerate(logits):
        k, (y, x) = i // len(corners), corners[i % len(corners)]
        total[k, y : y + patch[0], x : x + patch[1]] += tile_logits * weights[..., None]
    for y, x in corners:
        norm[y : y + patch[0], x : x + patch[1]] += weights
    return (total / norm[..., None])[(slice(None),) + region]


def predict_slice_logits(
    image: np.ndarray, predict_fn: PredictFn, num_classes: int, patch: tuple[int, int], **kwargs
) -> np.ndarray:
    """Aggregated logits (H, W, C) of one normalised 2D slice."""
    return predict_slab_logits(np.asarray(image)[None], predict_fn, num_classes, patch, **kwargs)[0]


def patch_divisor(patch: Sequence[int]) -> int:
    """The largest power of two dividing every patch side: an input size any model trained on the patch accepts."""
    divisor = 1
    while all(p % (2 * divisor) == 0 for p in patch):
        divisor *= 2
    return divisor


def padded_to_multiple(shape: Sequence[int], divisor: int) -> tuple[int, int]:
    """The in-plane ``shape`` rounded up to multiples of ``divisor``."""
    return tuple(-(-int(s) // divisor) * divisor for s in shape)


def predict_slab_logits_whole(
    slab: np.ndarray,
    predict_fn: PredictFn,
    num_classes: int,
    divisor: int,
    mirror_tta: bool = True,
    batch_size: int = 4,
) -> np.ndarray:
    """Logits (K, H, W, C) of a stack of K normalised slices, each predicted whole (the network is fully
    convolutional): padded to multiples of ``divisor`` as :func:`pad_to` pads, mirrored, cropped back."""
    padded, region = pad_to(np.asarray(slab, dtype=np.float32), padded_to_multiple(slab.shape[1:], divisor))
    mirrors = MIRRORS if mirror_tta else ((),)
    batch = np.concatenate([np.flip(padded, axis=axes) if axes else padded for axes in mirrors])
    out = _run_batches(np.ascontiguousarray(batch[..., None]), predict_fn, batch_size)
    out = out.reshape((len(mirrors), len(padded)) + padded.shape[1:] + (num_classes,))
    logits = sum(np.flip(o, axis=axes) if axes else o for o, axes in zip(out, mirrors)) / len(mirrors)
    return logits[(slice(None),) + region]


def whole_slices_per_batch(shape: Sequence[int], patch: Sequence[int], divisor: int, batch_size: int) -> int:
    """Whole slices per forward call holding about as many pixels as ``batch_size`` tiles of ``patch``."""
    padded = padded_to_multiple(shape, divisor)
    return max(1, (batch_size * int(np.prod(patch))) // int(np.prod(padded)))


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


def sigmoid_scores(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Class scores of sigmoid logits (one per foreground class along ``axis``), with the
    background score prepended: p_c = sigmoid(logit_c), p_0 = 1 - max_c p_c.

    An argmax over these (ties to the lower class) gives the foreground class of highest
    probability where it exceeds 0.5, else background.
    """
    from scipy.special import expit

    fg = expit(np.asarray(logits, dtype=np.float32)).astype(np.float32)
    background = 1.0 - fg.max(axis=axis, keepdims=True)
    return np.concatenate([background, fg], axis=axis)


def region_scores(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Class scores of nested-region logits (region c = "label >= c", c = 1..C-1, along ``axis``).

    With s_c the region sigmoids: p_c = min(s_c, 1 - s_d for every d > c), p_0 = min_c (1 - s_c).
    Their argmax (ties to the lower class) is the highest region whose sigmoid exceeds 0.5,
    else background: nnU-Net v2's rule for regions (each region in order overwrites the
    label where its probability exceeds 0.5).
    """
    from scipy.special import expit

    s = np.moveaxis(expit(np.asarray(logits, dtype=np.float32)).astype(np.float32), axis, -1)
    above = np.minimum.accumulate((1.0 - s)[..., ::-1], axis=-1)[..., ::-1]  # above[c] = min(1 - s_d, d >= c)
    fg = np.concatenate([np.minimum(s[..., :-1], above[..., 1:]), s[..., -1:]], axis=-1)
    return np.moveaxis(np.concatenate([above[..., :1], fg], axis=-1), -1, axis)


def class_scores(logits: np.ndarray, output_activation: str = "softmax", axis: int = -1) -> np.ndarray:
    """Per-class scores (num_classes along ``axis``) of a model's aggregated logits."""
    if output_activation == "softmax":
        return softmax(logits, axis=axis)
    if output_activation == "sigmoid":
        return sigmoid_scores(logits, axis=axis)
    if output_activation == "regions":
        return region_scores(logits, axis=axis)
    raise ValueError(f"unknown output_activation {output_activation!r}")


def as_predict_fns(predict_fn: PredictFn | Sequence[PredictFn]) -> list[PredictFn]:
    """One forward function or an ensemble of them, as a non-empty list."""
    fns = [predict_fn] if callable(predict_fn) else list(predict_fn)
    if not fns:
        raise ValueError("no model to predict with (empty ensemble)")
    return fns


def predict_probabilities(
    volume: np.ndarray,
    predict_fn: PredictFn | Sequence[PredictFn],
    num_classes: int,
    patch,
    step: float = 0.5,
    gaussian: bool = True,
    mirror_tta: bool = True,
    batch_size: int = 16,
    output_activation: str = "softmax",
    tiling: str = "sliding_window",
) -> np.ndarray:
    """Class scores (C, Z, Y, X) of a preprocessed volume, a slab of slices at a time.

    softmax: ``predict_fn`` gives C logits, the scores are softmax probabilities; sigmoid:
    it gives C-1 logits (one per foreground class), the scores are :func:`sigmoid_scores`;
    regions: C-1 logits (one per nested region), the scores are :func:`region_scores`.
    Logits are averaged over tiles and mirrors before either conversion. A sequence of
    forward functions is a fold ensemble: their aggregated logits are averaged too, slab
    by slab, and converted once, as nnU-Net v2 does (``predict_logits_from_preprocessed_data``
    sums the folds' sliding-window logits and divides by their number).

    ``tiling``: ``sliding_window`` (the above) or ``whole_slice``: each slice in one forward
    pass (:func:`predict_slab_logits_whole`; ``step`` and ``gaussian`` unused), padded to a
    multiple of the forward function's ``divisor`` attribute (:class:`Forward`), else of
    :func:`patch_divisor`, with about ``batch_size`` tiles' worth of pixels per call.
    """
    fns = as_predict_fns(predict_fn)
    if output_activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"unknown output_activation {output_activation!r}")
    channels = num_classes if output_activation == "softmax" else num_classes - 1
    probs = np.empty((num_classes,) + volume.shape, dtype=np.float32)
    if tiling not in ("sliding_window", "whole_slice"):
        raise ValueError(f"unknown tiling {tiling!r}")
    divisors = [getattr(fn, "divisor", None) or patch_divisor(patch) for fn in fns]
    if tiling == "whole_slice":
        per_call = whole_slices_per_batch(volume.shape[1:], patch, max(divisors), batch_size)
        k = max(1, per_call // (len(MIRRORS) if mirror_tta else 1))
    else:
        k = slab_size(volume.shape[1:], tuple(patch), step, mirror_tta, batch_size)
    for z in range(0, volume.shape[0], k):
        logits = None
        for fn, divisor in zip(fns, divisors):
            if tiling == "whole_slice":
                fold = predict_slab_logits_whole(volume[z : z + k], fn, channels, divisor, mirror_tta, per_call)
            else:
                fold = predict_slab_logits(
                    volume[z : z + k],
                    fn,
                    channels,
                    tuple(patch),
                    step=step,
                    gaussian=gaussian,
                    mirror_tta=mirror_tta,
                    batch_size=batch_size,
                )
            logits = fold if logits is None else logits + fold
        probs[:, z : z + k] = np.moveaxis(class_scores(logits / len(fns), output_activation), -1, 0)
    return probs


def linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper source index and weight of the upper one, per output position, for linear resizing
    along one axis with pixel-extent alignment and edge clamping (``ndimage.zoom(order=1,
    mode="nearest", grid_mode=True)``)."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (x - lo).astype(np.float32)


def _zoom_plane_linear(
    plane: np.ndarray, shape: tuple[int, int], rows: slice = slice(None), cols: slice = slice(None)
) -> np.ndarray:
    """``plane`` resized linearly to ``shape`` (float32), output ``rows`` x ``cols`` only: separable
    (:func:`linear_weights`), equal to ``ndimage.zoom(order=1, mode="nearest", grid_mode=True)`` to float32
    rounding and about 5x faster. Each output pixel is computed alone, so a window equals that part of the whole."""
    if tuple(plane.shape) == tuple(shape):
        return plane[rows, cols]
    (ly, hy, wy), (lx, hx, wx) = (linear_weights(n_in, n_out) for n_in, n_out in zip(plane.shape, shape))
    ly, hy, wy, lx, hx, wx = ly[rows], hy[rows], wy[rows, None], lx[cols], hx[cols], wx[cols]
    blended = plane[ly] * (1 - wy) + plane[hy] * wy
    return blended[:, lx] * (1 - wx) + blended[:, hx] * wx


#: How class scores are resampled across slices on the way back to a scan's grid.
ACROSS_SLICES: tuple[str, ...] = ("linear", "nearest")


def slice_weights(n_in: int, n_out: int, across_slices: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper source slice and weight of the upper one per output slice: linear
    (:func:`linear_weights`) or nearest (:func:`kidney_seg.preprocessing.nearest_indices`, weight 0)."""
    if across_slices == "linear":
        return linear_weights(n_in, n_out)
    if across_slices == "nearest":
        idx = nearest_indices(n_in, n_out)
        return idx, idx, np.zeros(n_out, dtype=np.float32)
    raise ValueError(f"across_slices must be one of {ACROSS_SLICES}, got {across_slices!r}")


def resample_linear_slab(
    volume: np.ndarray,
    shape: tuple[int, int, int],
    start: int,
    stop: int,
    across_slices: str = "linear",
    rows: slice = slice(None),
    cols: slice = slice(None),
) -> np.ndarray:
    """Output slices ``start:stop`` of ``volume`` (Z, Y, X) resized to ``shape`` (float32): linear
    in-plane, linear or nearest (``across_slices``) across slices; output ``rows`` x ``cols`` only.

    Linear resizing is separable: each needed source slice is resized in-plane, then
    neighbouring slices are blended, which equals a full 3D ``ndimage.zoom(order=1,
    grid_mode=True, mode="nearest")`` but touches only the slab's slices.
    """
    lo, hi, w = slice_weights(volume.shape[0], shape[0], across_slices)
    lo, hi, w = lo[start:stop], hi[start:stop], w[start:stop, None, None]
    first = int(lo.min())
    planes = np.stack(
        [
            _zoom_plane_linear(np.asarray(volume[i], dtype=np.float32), shape[1:], rows, cols)
            for i in range(first, int(hi.max()) + 1)
        ]
    )
    out = planes[lo - first] * (1 - w)
    out += planes[hi - first] * w
    return out


def uncertain_boxes(probs: np.ndarray) -> list[tuple[int, int, int, int] | None]:
    """Per slice of class scores (C, Z, Y, X): the (row, row end, col, col end) box of the pixels that are not
    certain background (background 1, every other class 0, as localised inference fills what it does not
    predict), or None where the whole slice is. Any linear blend of certain background is background."""
    uncertain = (probs[0] != 1) | probs[1:].any(axis=0)
    boxes: list[tuple[int, int, int, int] | None] = []
    for plane in uncertain:
        rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
        boxes.append(None if rows.size == 0 else (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
    return boxes


def _outputs_reading(lo: np.ndarray, hi: np.ndarray, start: int, stop: int) -> slice:
    """The output positions whose linear sources (``lo``/``hi``, non-decreasing) touch source ``start:stop``."""
    return slice(int(np.searchsorted(hi, start, side="left")), int(np.searchsorted(lo, stop - 1, side="right")))


def _uncertain_window(
    boxes: list[tuple[int, int, int, int] | None], sources: range, in_plane: tuple[int, int], shape: tuple[int, int]
) -> tuple[slice, slice] | None:
    """The output rows x cols that read a pixel outside certain background in any of ``sources``' slices, or
    None where all of them are certain background."""
    found = [boxes[i] for i in sources if boxes[i] is not None]
    if not found:
        return None
    r0, r1 = min(b[0] for b in found), max(b[1] for b in found)
    c0, c1 = min(b[2] for b in found), max(b[3] for b in found)
    (ly, hy, _), (lx, hx, _) = (linear_weights(n_in, n_out) for n_in, n_out in zip(in_plane, shape))
    return _outputs_reading(ly, hy, r0, r1), _outputs_reading(lx, hx, c0, c1)


def probabilities_to_labels(
    probs: np.ndarray,
    shape: tuple[int, int, int],
    out: np.ndarray | None = None,
    slab: int = 16,
    across_slices: str = SCORES_ACROSS_SLICES,
) -> np.ndarray:
    """Resample each class's score to ``shape`` (linear in-plane, ``across_slices`` across); running argmax (uint8).

    Works ``slab`` output slices at a time, one class after the other, so beyond the
    uint8 labels only a few slab-sized float32 arrays exist at the original resolution. Only the
    window of a slab that reads a pixel outside certain background (:func:`uncertain_boxes`) is
    resampled; the rest is background, exactly as resampling it would give.
    Ties go to the lower class. ``out`` (uint8, ``shape``) receives the labels if given.
    """
    shape = tuple(int(s) for s in shape)
    labels = np.zeros(shape, dtype=np.uint8) if out is None else out
    if labels.shape != shape:
        raise ValueError(f"out has shape {labels.shape}, expected {shape}")
    boxes = uncertain_boxes(probs)
    lo, hi, _ = slice_weights(probs.shape[1], shape[0], across_slices)
    for start in range(0, shape[0], slab):
        stop = min(start + slab, shape[0])
        sources = range(int(lo[start:stop].min()), int(hi[start:stop].max()) + 1)
        window = _uncertain_window(boxes, sources, probs.shape[2:], shape[1:])
        labels[start:stop] = 0  # what reads only certain background (background 1, the rest 0) is background
        if window is None:
            continue
        best = None
        chunk = np.zeros((stop - start, window[0].stop - window[0].start, window[1].stop - window[1].start), np.uint8)
        for c in range(len(probs)):
            prob = resample_linear_slab(probs[c], shape, start, stop, across_slices, *window)
            if best is None:
                best = prob
                chunk[...] = c
                continue
            better = prob > best
            chunk[better] = c
            np.copyto(best, prob, where=better)
        labels[(slice(start, stop), *window)] = chunk
    return labels


def scores_to_labels(probs: np.ndarray) -> np.ndarray:
    """Argmax (uint8, ties to the lower class) of class scores (C, Z, Y, X) on their own grid."""
    return np.argmax(probs, axis=0).astype(np.uint8)


@dataclass(frozen=True)
class PlanGrid:
    """The grid a model predicts on: the scan's crop box (internal grid), resampled to ``shape`` at ``spacing`` mm."""

    crop_box: Box
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def to_dict(self) -> dict:
        """A JSON-serialisable form (for prediction records)."""
        return {"crop_box": box_to_list(self.crop_box), "shape": list(self.shape), "spacing": list(self.spacing)}

    @classmethod
    def from_dict(cls, d: dict) -> PlanGrid:
        """Inverse of :meth:`to_dict`."""
        shape, spacing = tuple(int(n) for n in d["shape"]), tuple(float(v) for v in d["spacing"])
        return cls(box_from_list(d["crop_box"]), shape, spacing)

    def affine(self, geometry: Geometry) -> np.ndarray:
        """The world affine of an internal-layout array on this grid of the scan of ``geometry``.

        Index j along an axis sits at scan index ``start + (j + 0.5) * r - 0.5``, r the
        size ratio (the pixel-extent alignment the resampling uses).
        """
        internal = geometry.internal_world_affine
        scale = np.eye(4)
        for axis, (sl, n) in enumerate(zip(self.crop_box, self.shape)):
            ratio = (sl.stop - sl.start) / n
            scale[axis, axis] = ratio
            scale[axis, 3] = sl.start + 0.5 * ratio - 0.5
        return internal @ scale


def plan_grid_of(box: Box, shape: tuple[int, ...], spacing) -> PlanGrid:
    """The plan grid of a scan of ``spacing`` cropped to ``box`` and resampled to ``shape``."""
    size = [sl.stop - sl.start for sl in box]
    return PlanGrid(
        tuple(box), tuple(int(n) for n in shape), tuple(float(m * s / n) for m, s, n in zip(size, spacing, shape))
    )


def predict_scores(
    image: np.ndarray, spacing, plan: dict, predict_fn: PredictFn | Sequence[PredictFn], inference_cfg: dict
) -> tuple[np.ndarray, PlanGrid]:
    """Class scores (C, Z, Y, X) on the plan's grid of a raw (HU) internal-orientation volume, and that grid.

    ``plan`` is the model's plan (its inference.json, checked by
    :func:`kidney_seg.plan.read_plan`): its ``preprocessing``, ``num_classes``,
    ``patch_size`` and ``output_activation``; ``inference_cfg`` is the validated
    ``inference`` config section. The volume is cropped to the body (if
    ``crop_to_body``), preprocessed and predicted. ``predict_fn`` may be a sequence (a
    fold ensemble, logits averaged).
    """
    if inference_cfg["localize"]:  # slices resampled as the passes need them
        scan, box = prepare_image(image, spacing, plan["preprocessing"])
        grid = plan_grid_of(box, scan.shape, spacing)
        return predict_localized(scan, predict_fn, plan, inference_cfg, grid.spacing), grid
    volume, box = preprocess_image(image, spacing, plan["preprocessing"])
    grid = plan_grid_of(box, volume.shape, spacing)
    return predict_probabilities(volume, predict_fn, **_probability_settings(plan, inference_cfg)), grid


def _probability_settings(plan: dict, inference_cfg: dict) -> dict:
    """The keyword arguments of :func:`predict_probabilities` that the plan and the inference config set."""
    return {
        "num_classes": plan["num_classes"],
        "patch": tuple(plan["patch_size"]),
        "step": inference_cfg["step"],
        "gaussian": inference_cfg["gaussian"],
        "mirror_tta": inference_cfg["mirror_tta"],
        "batch_size": inference_cfg["batch_size"],
        "output_activation": plan["output_activation"],
        "tiling": inference_cfg["tiling"],
    }


def predict_localized(
    volume: np.ndarray | ResampledScan,
    predict_fn: PredictFn | Sequence[PredictFn],
    plan: dict,
    inference_cfg: dict,
    spacing: Sequence[float],
) -> np.ndarray:
    """Class scores (C, Z, Y, X) of a preprocessed volume, the full pass run only where a cheap pass found
    foreground (:mod:`kidney_seg.localization`); background elsewhere. A miss runs the full pass everywhere.

    The full pass predicts the box's slices, cropped in-plane to the box (widened to at least one
    training patch, so that the network sees as much real context as it did in training), with the
    configured tiling: tiles of the crop, or the crop whole. A :class:`ResampledScan` resamples only
    the slices these passes read.
    """
    scan = volume if isinstance(volume, ResampledScan) else ResampledScan(volume, volume.shape)
    settings = _probability_settings(plan, inference_cfg)
    fns = as_predict_fns(predict_fn)
    every, min_ml = inference_cfg["localize_every"], inference_cfg["localize_min_ml"]
    sampled = sampled_slices(len(scan), every)
    cheap = {**settings, "tiling": "whole_slice", "mirror_tta": False}  # one model, one mirroring, whole slices
    coarse = predict_probabilities(scan.slices(sampled), fns[:1], **cheap)
    margin = inference_cfg["localize_margin_mm"]
    box = foreground_box(coarse[0] < 0.5, sampled, scan.shape, spacing, every, margin, min_ml)
    if box is None:
        log.warning("localisation: no foreground of %g ml in %d sampled slices; every slice", min_ml, len(sampled))
        return predict_probabilities(scan.volume(), fns, **settings)
    z, plane = box[0], widened_to(box[1:], settings["patch"], scan.shape[1:])
    probs = np.zeros((plan["num_classes"],) + scan.shape, dtype=np.float32)
    probs[0] = 1.0  # background outside the predicted slices and pixels
    probs[(slice(None), z) + plane] = predict_probabilities(scan.slices(z)[(slice(None),) + plane], fns, **settings)
    covered = np.zeros(scan.shape[1:], dtype=bool)
    covered[plane] = True
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if cut_at_the_edge(probs[0][z] < 0.5, z, covered, len(scan), voxel_ml, min_ml):
        log.warning("localisation: foreground reaches the edge of what was predicted (box %s); every slice", box)
        return predict_probabilities(scan.volume(), fns, **settings)
    share = (z.stop - z.start) * covered.mean() / len(scan)
    log.info(
        "localisation: %d sampled slices; full pass on %.1f%% of the volume (box %s)", len(sampled), 100 * share, box
    )
    return probs


def labels_on_scan_grid(probs: np.ndarray, grid: PlanGrid, shape: tuple[int, int, int]) -> np.ndarray:
    """Labels (uint8) of ``shape``: scores resampled into the crop box (:func:`probabilities_to_labels`), 0 outside."""
    labels = np.zeros(shape, dtype=np.uint8)
    region = labels[grid.crop_box]
    probabilities_to_labels(probs, region.shape, out=region)
    return labels


def predict_volume(
    image: np.ndarray, spacing, plan: dict, predict_fn: PredictFn | Sequence[PredictFn], inference_cfg: dict
) -> np.ndarray:
    """Labels (uint8) on the full internal grid of a raw (HU) internal-orientation volume.

    :func:`predict_scores`, then the scores resampled to the cropped region's original
    shape and pasted into a volume of ``image.shape`` that is 0 (background) outside the
    crop box (:func:`labels_on_scan_grid`).
    """
    probs, grid = predict_scores(image, spacing, plan, predict_fn, inference_cfg)
    return labels_on_scan_grid(probs, grid, image.shape)


def model_folders(model_dir: str | os.PathLike) -> list[Path]:
    """The trained model folders under ``model_dir``: itself when it holds a model, else its fold_* folders."""
    model_dir = Path(model_dir)
    if (model_dir / "model.keras").is_file():
        folders = [model_dir]
    else:
        folders = sorted(
            (p for p in model_dir.glob("fold_*") if (p / "model.keras").is_file()), key=lambda p: (len(p.name), p.name)
        )
    if not folders:
        raise FileNotFoundError(f"{model_dir} is not a trained model folder (no model.keras, no fold_*/model.keras)")
    for folder in folders:
        if not (folder / "inference.json").is_file():
            raise FileNotFoundError(f"{folder} is not a trained model folder (missing inference.json)")
    return folders


def _differing_keys(a: dict, b: dict) -> list[str]:
    """The keys whose values differ between two plans."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def ensemble_plan(model_dirs: Sequence[str | os.PathLike], expected: dict | None = None) -> dict:
    """The plan shared by all members of an ensemble (and equal to ``expected``, if given); a difference is an error."""
    plans = [read_plan(Path(d) / "inference.json") for d in model_dirs]
    reference, name = (expected, "the plan") if expected is not None else (plans[0], f"{model_dirs[0]}/inference.json")
    for d, other in zip(model_dirs, plans):
        if other != reference:
            raise ValueError(
                f"{d}/inference.json differs from {name} in {_differing_keys(other, reference)}: "
                "the models cannot predict with it"
            )
    return plans[0]


class Forward:
    """A model's forward pass on (N, H, W, 1) batches, as NumPy; inputs must be multiples of ``divisor`` in-plane."""

    def __init__(self, model):
        from kidney_seg.model import input_divisor

        self.model = model
        self.divisor = input_divisor(model)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The model's logits of ``batch``."""
        import keras

        return keras.ops.convert_to_numpy(self.model.predict_on_batch(batch))


def load_predictor(
    model_dir: str | os.PathLike | Sequence[str | os.PathLike], plan: dict | None = None
) -> tuple[list[PredictFn], dict]:
    """Forward functions of a trained model (one per fold of an ensemble) and their shared plan.

    ``model_dir`` is one model folder (holding model.keras and inference.json), a folder of
    ``fold_*`` model folders, or a list of model folders. With ``plan`` (the workflow's
    plans.json), every model must have been trained with exactly that plan.
    """
    from kidney_seg.model import load_model

    if isinstance(model_dir, (str, os.PathLike)):
        dirs = model_folders(model_dir)
    else:
        dirs = [Path(d) for d in model_dir]
    shared = ensemble_plan(dirs, plan)
    fns = [Forward(load_model(d / "model.keras", compile=False)) for d in dirs]
    log.info("loaded %d model(s): %s", len(dirs), ", ".join(str(d) for d in dirs))
    return fns, shared


@dataclass(frozen=True)
class CasePrediction:
    """One segmented scan: its labels (file layout), the plan's grid, its uncertainty and kidney HU summary."""

    labels: np.ndarray
    plan_grid: PlanGrid
    summary: dict[str, float | None]


def uncertainty_on_scan_grid(probs: np.ndarray, grid: PlanGrid, shape: tuple[int, int, int]) -> np.ndarray:
    """The normalised entropy of class scores resampled (linear) into the crop box of a ``shape`` volume; 0 outside."""
    entropy = normalised_entropy(probs)
    out = np.zeros(shape, dtype=np.float32)
    region = out[grid.crop_box]
    for start in range(0, region.shape[0], 16):
        stop = min(start + 16, region.shape[0])
        region[start:stop] = resample_linear_slab(entropy, region.shape, start, stop, SCORES_ACROSS_SLICES)
    return out


def segment_case(
    case_id: str,
    image_path: str | os.PathLike,
    out_path: str | os.PathLike,
    predictor: tuple[Sequence[PredictFn], dict],
    inference_cfg: dict,
    postprocess: Callable[[np.ndarray, tuple[float, ...]], np.ndarray] | None = None,
    uncertainty_path: str | os.PathLike | None = None,
    plan_grid_path: str | os.PathLike | None = None,
) -> CasePrediction:
    """:func:`predict_case` returning the labels (file layout) with the plan grid and the case's summary.

    With ``uncertainty_path``, the normalised entropy of the class scores (0 certain, 1
    uniform; :func:`kidney_seg.quality.normalised_entropy`) is written there as float32 on
    the scan's grid (resampled like the scores, 0 outside the crop box); with
    ``plan_grid_path``, the plan-grid labels (see :func:`predict_case`).
    """
    predict_fn, model_plan = predictor
    image, geometry = read_image(image_path, case_id)
    probs, grid = predict_scores(image, geometry.spacing, model_plan, predict_fn, inference_cfg)
    if plan_grid_path is not None:
        plan_labels = scores_to_labels(probs)
        if postprocess is not None:
            plan_labels = postprocess(plan_labels, grid.spacing)
        save_nifti(plan_grid_path, plan_labels, grid.affine(geometry), dtype=np.uint8)
    if uncertainty_path is not None:
        entropy = from_internal(uncertainty_on_scan_grid(probs, grid, image.shape), geometry)
        save_like(uncertainty_path, entropy, reference=image_path, dtype=np.float32)
        del entropy
    labels = labels_on_scan_grid(probs, grid, image.shape)
    summary = {**uncertainty_summary(probs, grid.spacing), **kidney_intensity(image, labels)}
    del probs, image
    if postprocess is not None:
        labels = postprocess(labels, geometry.spacing)
    out = from_internal(labels, geometry)
    save_like(out_path, out, reference=image_path)
    log.info("%s: predicted %s voxels, labels %s; summary %s", case_id, out.shape, np.unique(out).tolist(), summary)
    return CasePrediction(out, grid, summary)


def predict_case(
    case_id: str,
    image_path: str | os.PathLike,
    model_dir,
    out_path: str | os.PathLike,
    inference_cfg: dict,
    predictor: tuple[Sequence[PredictFn], dict] | None = None,
    postprocess: Callable[[np.ndarray, tuple[float, ...]], np.ndarray] | None = None,
    plan: dict | None = None,
    plan_grid_path: str | os.PathLike | None = None,
) -> np.ndarray:
    """Segment one scan and write uint8 labels on its exact input grid; return them (file layout).

    ``postprocess(labels, spacing)``, given internal-layout labels and their spacing, is
    applied before writing (e.g. :func:`kidney_seg.postprocessing.decided_steps`); None
    writes the raw argmax. ``plan``: the plan the models must have been trained with
    (see :func:`load_predictor`). With ``plan_grid_path``, the labels on the plan's grid
    (the argmax of the class scores there, no round trip; post-processed with that grid's
    spacing) are written there too, in the internal layout with the affine of that grid
    (:meth:`PlanGrid.affine`).
    """
    predictor = predictor or load_predictor(model_dir, plan)
    return segment_case(
        case_id, image_path, out_path, predictor, inference_cfg, postprocess, None, plan_grid_path
    ).labels


def predict_case_on_both_grids(
    case_id: str,
    image_path: str | os.PathLike,
    model_dir,
    out_path: str | os.PathLike,
    plan_grid_path: str | os.PathLike,
    inference_cfg: dict,
    plan: dict | None = None,
    uncertainty_path: str | os.PathLike | None = None,
) -> dict:
    """:func:`predict_case` writing the plan-grid labels too; returns the plan grid and uncertainty for the record."""
    predictor = load_predictor(model_dir, plan)
    result = segment_case(
        case_id, image_path, out_path, predictor, inference_cfg, None, uncertainty_path, plan_grid_path
    )
    return {"plan_grid": result.plan_grid.to_dict(), **strict_json(result.summary)}
