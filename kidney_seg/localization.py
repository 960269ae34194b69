"""Where the full-resolution pass of a fast whole-case prediction runs, and when it must cover everything.

A cheap first pass (:func:`kidney_seg.inference.predict_localized`) predicts every
``every``-th slice of the preprocessed volume (whole slices, one mirroring, the first
model of an ensemble). :func:`foreground_box` turns the voxels it calls foreground (class
scores whose background score is below 0.5) into a box: the sampled slices with foreground,
widened by the ``every - 1`` slices that were not looked at plus a margin in millimetres,
and the in-plane extent of all that foreground, widened by the margin. The full pass then
runs on the box's slices only, and in them (sliding window) only the tiles of the full
tiling that overlap the box, so that inside the box its scores are exactly the full pass's;
everything it does not predict is background.

Two misses fall back to the full pass over the whole volume: no foreground in any sampled
slice (:func:`foreground_box` gives None), and foreground of the full pass reaching the
edge of what it predicted where the volume goes on (:func:`cut_at_the_edge`: the box cut
something off). NumPy and SciPy only.
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


def foreground_box(
    found: np.ndarray,
    sampled: Sequence[int],
    shape: Sequence[int],
    spacing: Sequence[float],
    every: int,
    margin_mm: float,
) -> Box3 | None:
    """The box (slices of the volume) around the foreground ``found`` (bool, one plane per ``sampled`` slice);
    None when nothing was found."""
    found = np.asarray(found, dtype=bool)
    hit = [z for z, plane in zip(sampled, found) if plane.any()]
    if not hit:
        return None
    rows, cols = np.nonzero(found.any(axis=0))
    margins = [every - 1 + math.ceil(margin_mm / spacing[0])] + [math.ceil(margin_mm / s) for s in spacing[1:]]
    lows, highs = (min(hit), rows.min(), cols.min()), (max(hit), rows.max(), cols.max())
    return tuple(
        slice(max(0, int(lo) - m), min(int(n), int(hi) + m + 1)) for lo, hi, m, n in zip(lows, highs, margins, shape)
    )


def cut_at_the_edge(foreground: np.ndarray, slices: slice, covered: np.ndarray, n_slices: int) -> bool:
    """Whether ``foreground`` (the predicted slices' voxels) reaches the edge of what was predicted inside the
    volume: the first or last predicted slice where the volume goes on, or the border of the ``covered`` pixels
    (2D) where uncovered pixels lie beyond it."""
    from scipy import ndimage

    if slices.start > 0 and foreground[0].any():
        return True
    if slices.stop < n_slices and foreground[-1].any():
        return True
    border = covered & ndimage.binary_dilation(~covered)  # covered pixels next to uncovered ones in the slice
    return bool(foreground[:, border].any())
