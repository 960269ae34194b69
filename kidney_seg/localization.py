"""Where the full-resolution pass of a fast whole-case prediction runs, and when it must cover everything.

A cheap first pass (:func:`kidney_seg.inference.predict_localized`) predicts every
``every``-th slice of the preprocessed volume (whole slices, one mirroring, the first
model of an ensemble). :func:`foreground_box` turns the voxels it calls foreground (class
scores whose background score is below 0.5) into a box: the sampled slices with foreground,
widened by the ``every - 1`` slices that were not looked at plus a margin in millimetres,
and the in-plane extent of all that foreground, widened by the margin. The full pass then
runs inside the box only, and everything outside is background.

Two misses fall back to the full pass over the whole volume: no foreground in any sampled
slice (:func:`foreground_box` gives None), and foreground of the full pass reaching a face
of the box that is not a face of the volume (:func:`touches_inner_face`: the box cut
something off). The functions here are NumPy only.
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


def touches_inner_face(mask: np.ndarray, box: Box3, shape: Sequence[int]) -> bool:
    """Whether the foreground ``mask`` (the box's own voxels) reaches a face of ``box`` inside the volume."""
    for axis, (cut, n) in enumerate(zip(box, shape)):
        if cut.start > 0 and np.take(mask, 0, axis=axis).any():
            return True
        if cut.stop < n and np.take(mask, -1, axis=axis).any():
            return True
    return False


def box_fraction(box: Box3, shape: Sequence[int]) -> float:
    """The share of the volume's voxels inside ``box``."""
    return float(np.prod([s.stop - s.start for s in box]) / np.prod(shape))
