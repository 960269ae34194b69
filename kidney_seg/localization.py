"""Where the full-resolution pass of a fast whole-case prediction runs, and when it must cover everything.

A cheap first pass (:func:`kidney_seg.inference.predict_localized`) predicts every
``every``-th slice of the preprocessed volume (whole slices, one mirroring, the first
model of an ensemble). :func:`foreground_box` turns the voxels it calls foreground (class
scores whose background score is below 0.5) into a box. Components of that foreground
smaller than a volume (``min_ml``, :func:`large_components`; each sampled slice standing
for ``every`` slices) are specks, not kidneys, and do not widen it. The box is the sampled
slices with foreground, widened by the ``every - 1`` slices that were not looked at plus a
margin in millimetres, and the in-plane extent of that foreground, widened by the margin.
The full pass then runs on the box's slices only, cropped in-plane to the box widened to at
least one training patch (:func:`widened_to`), with the configured tiling (tiles of the crop,
or the crop whole). Everything it does not predict is background.

Two misses fall back to the full pass over the whole volume: no component of at least
``min_ml`` in any sampled slice (:func:`foreground_box` gives None), and a component of the
full pass's foreground of at least ``min_ml`` reaching the edge of what it predicted where
the volume goes on (:func:`cut_at_the_edge`: the box cut something off). NumPy and SciPy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Box3 = tuple[slice, slice, slice]


def sampled_slices(n_slices: int, every: int) -> list[int]:
    """Every ``every``-th slice from the first, and the last one."""
    picked = list(range(0, n_slices, every))
    if picked[-1] != n_slices - 1:
        picked.append(n_slices - 1)
    return picked


def large_components(mask: np.ndarray, voxel_ml: float, min_ml: float) -> np.ndarray:
    """The voxels of ``mask`` (3D bool) in face-connected components of at least ``min_ml`` (``voxel_ml`` each)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if min_ml <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    big = np.bincount(labels.ravel(), minlength=n + 1) * voxel_ml >= min_ml
    big[0] = False
    return big[labels]


def foreground_box(
    found: np.ndarray,
    sampled: Sequence[int],
    shape: Sequence[int],
    spacing: Sequence[float],
    every: int,
    margin_mm: float,
    min_ml: float = 0.0,
) -> Box3 | None:
    """The box (slices of the volume) around the foreground ``found`` (bool, one plane per ``sampled`` slice),
    its components under ``min_ml`` left out; None when nothing is left."""
    found = large_components(found, float(np.prod(spacing)) * every / 1000.0, min_ml)
    hit = [z for z, plane in zip(sampled, found) if plane.any()]
    if not hit:
        return None
    rows, cols = np.nonzero(found.any(axis=0))
    margins = [every - 1 + math.ceil(margin_mm / spacing[0])] + [math.ceil(margin_mm / s) for s in spacing[1:]]
    lows, highs = (min(hit), rows.min(), cols.min()), (max(hit), rows.max(), cols.max())
    return tuple(
        slice(max(0, int(lo) - m), min(int(n), int(hi) + m + 1)) for lo, hi, m, n in zip(lows, highs, margins, shape)
    )


def widened_to(planes: Sequence[slice], size: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """In-plane ``planes`` widened about their centre to at least ``size`` pixels each, kept inside ``shape``."""
    out = []
    for sl, s, n in zip(planes, size, shape):
        want = min(max(sl.stop - sl.start, int(s)), int(n))
        start = min(max(0, sl.start - (want - (sl.stop - sl.start)) // 2), int(n) - want)
        out.append(slice(start, start + want))
    return tuple(out)


def cut_at_the_edge(
    foreground: np.ndarray,
    slices: slice,
    covered: np.ndarray,
    n_slices: int,
    voxel_ml: float = 0.0,
    min_ml: float = 0.0,
) -> bool:
    """Whether ``foreground`` (the predicted slices' voxels; its components under ``min_ml`` left out) reaches the
    edge of what was predicted inside the volume: the first or last predicted slice where the volume goes on, or
    the border of the ``covered`` pixels (2D) where uncovered pixels lie beyond it."""
    from scipy import ndimage

    foreground = large_components(foreground, voxel_ml, min_ml)

    if slices.start > 0 and foreground[0].any():
        return True
    if slices.stop < n_slices and foreground[-1].any():
        return True
    border = covered & ndimage.binary_dilation(~covered)  # covered pixels next to uncovered ones in the slice
    return bool(foreground[:, border].any())
