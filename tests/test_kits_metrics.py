"""Our surface Dice and HD95 against DeepMind's surface-distance called directly, on the real KiTS19 labels.

The KiTS21/23 scorer (neheller/kits23, kits23/evaluation/metrics.py) calls
``compute_surface_distances(mask_gt, mask_pred, spacing)`` and
``compute_surface_dice_at_tolerance`` per HEC region, with both masks empty scoring 1 and
exactly one empty scoring 0. Each test perturbs a real label volume (cropped to its
foreground box plus a margin, to stay fast) and compares ``case_metrics`` with that
recipe within 1e-6. The labels live in ../shared/data; without them these tests skip.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import pytest
from scipy import ndimage
from surface_distance import metrics as sd

from kidney_seg import evaluation as ev
from kidney_seg.volume import read_label

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the library's scipy.ndimage.filters calls

#: The two tolerances, written out here as the challenge repositories give them (kits23/configuration/labels.py).
KITS23_TOLERANCES = {"tk": 1.0330772532390826, "tu": 1.1498198361434828}
CASES = ("case_00054", "case_00002")  # 5 mm slices; 1 mm slices
MARGIN = 3  # voxels of background kept around the foreground: every shift below stays inside
PERTURBATIONS = ("one_slice_shift", "two_pixel_shift", "erosion", "missing_component", "empty")
#: Every perturbation on the 5 mm case; on the 1 mm case (3-4 s a perturbation) the shift through slices, which
#: lies within the TK tolerance there, a lost kidney and the empty prediction.
CASE_PERTURBATIONS = [("case_00054", kind) for kind in PERTURBATIONS] + [
    ("case_00002", kind) for kind in ("one_slice_shift", "missing_component", "empty")
]


def _cropped(*volumes: np.ndarray) -> tuple[np.ndarray, ...]:
    """The volumes cut to the box of their foreground and zero-padded by MARGIN voxels on every side."""
    found = np.argwhere(np.any([v > 0 for v in volumes], axis=0))
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(found.min(axis=0), found.max(axis=0)))
    return tuple(np.pad(v[box], MARGIN) for v in volumes)


@functools.cache
def _load(path: str, case: str) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """(labels cropped to the foreground plus a margin, spacing, full labels) of one label file, read once."""
    labels, geometry = read_label(path, case, (0, 1, 2))
    full = np.asarray(labels)
    (cut,) = _cropped(full)
    return cut, geometry.spacing, full


@pytest.fixture
def real_cases(kits_labels_dir):
    """{case: (labels cropped to the foreground plus a margin, spacing, full labels)} of the CASES."""
    out = {}
    for case in CASES:
        path = kits_labels_dir / case / "segmentation.nii.gz"
        if not path.is_file():
            pytest.skip(f"{path} is absent from ../shared/data")
        out[case] = _load(str(path), case)
    return out


def _perturbed(labels: np.ndarray, kind: str) -> np.ndarray:
    """A prediction made from the truth by one perturbation."""
    if kind == "one_slice_shift":
        return np.roll(labels, 1, axis=0)
    if kind == "two_pixel_shift":
        return np.roll(labels, 2, axis=2)
    if kind == "erosion":
        kept = ndimage.binary_erosion(labels > 0, iterations=2)
        return np.where(kept, labels, 0).astype(labels.dtype)
    if kind == "missing_component":
        components, n = ndimage.label(labels > 0)
        assert n >= 2, "the chosen cases have two kidneys"
        sizes = np.bincount(components.ravel())[1:]
        return np.where(components == 1 + int(np.argmin(sizes)), 0, labels).astype(labels.dtype)
    if kind == "empty":
        return np.zeros_like(labels)
    raise ValueError(kind)


def _official(pred: np.ndarray, truth: np.ndarray, spacing, tolerance: float) -> tuple[float, float]:
    """(surface Dice, HD95) the way the KiTS21/23 scorer computes them: the library, empties by convention."""
    digest = [hashlib.sha256(np.packbits(m)).hexdigest() for m in (pred, truth)]
    key = (pred.shape, *digest, tuple(spacing), tolerance)
    if key not in _OFFICIAL:  # several tests score the same masks (every source's): the library runs once for them
        _OFFICIAL[key] = _official_uncached(pred, truth, spacing, tolerance)
    return _OFFICIAL[key]


_OFFICIAL: dict[tuple, tuple[float, float]] = {}


def _official_uncached(pred: np.ndarray, truth: np.ndarray, spacing, tolerance: float) -> tuple[float, float]:
    if not pred.any() and not truth.any():
        return 1.0, 0.0
    if not pred.any() or not truth.any():
        return 0.0, math.nan
    d = sd.compute_surface_distances(truth, pred, tuple(spacing))
    return float(sd.compute_surface_dice_at_tolerance(d, tolerance)), float(sd.compute_robust_hausdorff(d, 95))


@pytest.mark.parametrize("case, kind", CASE_PERTURBATIONS)
def test_surface_dice_and_hd95_equal_the_library_called_directly(real_cases, case, kind):
    truth, spacing, _ = real_cases[case]
    pred = _perturbed(truth, kind)
    ours = ev.case_metrics(pred, truth, spacing, source="kits19")
    for region, masks in (("tk", lambda a: a > 0), ("tu", lambda a: a == 2)):
        want_sd, want_hd = _official(masks(pred), masks(truth), spacing, KITS23_TOLERANCES[region])
        assert ours[f"{region}_surface_dice"] == pytest.approx(want_sd, abs=1e-6), (region, kind)
        if math.isnan(want_hd):
            assert math.isnan(ours[f"{region}_hd95"]) and ours[f"{region}_missed"], (region, kind)
            assert ours[f"{region}_penalised_hd95"] == pytest.approx(ev.scan_diagonal_mm(truth.shape, spacing))
        else:
            assert ours[f"{region}_hd95"] == pytest.approx(want_hd, abs=1e-6), (region, kind)
            assert ours[f"{region}_penalised_hd95"] == ours[f"{region}_hd95"]
    if kind != "empty":  # a real perturbation, not a miss (a 1 mm shift lies within the TK tolerance, though)
        assert ours["tk_dice"] < 1.0 and not ours["tk_missed"]


def test_one_slice_shift_of_a_5mm_case_scores_as_the_issue_measured(real_cases):
    """case_00054 shifted one 5 mm slice: TK surface Dice 0.683 by surfel area (0.382 counting border voxels)."""
    truth, spacing, _ = real_cases["case_00054"]
    m = ev.case_metrics(np.roll(truth, 1, axis=0), truth, spacing)
    assert m["tk_surface_dice"] == pytest.approx(0.683, abs=5e-4)
    assert m["tu_surface_dice"] == pytest.approx(0.565, abs=5e-4)


def test_cropping_to_the_foreground_box_changes_no_number(real_cases):
    """case_metrics crops to the foreground box: on the whole scan it gives exactly the numbers of a cropped copy."""
    _, spacing, full = real_cases["case_00054"]
    pred = np.roll(full, 1, axis=0)
    assert not full[0].any() and not full[-1].any()  # the roll wraps nothing around
    on_full = ev.case_metrics(pred, full, spacing)
    on_cut = ev.case_metrics(*_cropped(pred, full), spacing)
    assert on_full == on_cut  # HD95 defined for both regions, so no penalty (the scan diagonal) differs
    want_sd, want_hd = _official(pred > 0, full > 0, spacing, KITS23_TOLERANCES["tk"])  # the library, uncropped
    assert on_full["tk_surface_dice"] == want_sd and on_full["tk_hd95"] == want_hd


@pytest.mark.parametrize("source", ["kits19", "kits21", "kits23", "phantom", "local"])
def test_every_source_uses_its_challenges_tolerances(real_cases, source):
    """kits21 takes KiTS21's tolerances, every other source KiTS23's (today the same numbers)."""
    truth, spacing, _ = real_cases["case_00054"]
    pred = _perturbed(truth, "two_pixel_shift")
    m = ev.case_metrics(pred, truth, spacing, source=source)
    want, _ = _official(pred > 0, truth > 0, spacing, KITS23_TOLERANCES["tk"])
    assert m["tk_surface_dice"] == pytest.approx(want, abs=1e-6)
