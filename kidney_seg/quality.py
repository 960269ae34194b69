"""Quality control per case: uncertainty from the class scores inference computes, and flags with their reasons.

Uncertainty (on the plan's grid, from the averaged class scores of the mirrors and folds,
so it costs no extra forward pass):

* ``uncertainty_entropy``: the mean normalised predictive entropy, ``-sum_c p_c log p_c / log C``
  (0 = certain, 1 = uniform), over the voxels predicted as foreground (kidney or tumour);
  NaN when no foreground is predicted.
* ``uncertainty_tk`` and ``uncertainty_tu``: how far the scores are from the hard
  prediction of a region, ``1 - (2 sum(p h) + s) / (sum p + sum h + s)``, with p the
  region's score (tk: 1 - p_background; tu: p_tumour), h its predicted mask and s the
  voxels of 1 ml (so that a few stray low scores around an empty prediction read as
  certain, while a millilitre of undecided tumour reads as uncertain). It is 0 when the
  scores are 0 or 1 where the mask says so, and it estimates the Dice the prediction
  loses if the scores are calibrated.

Flags (each with its reason, :func:`qc_flags`), from the final labels on the scan's grid
and the training cases' range (:func:`build_reference`, ``model/qc_reference.json``):

* the number of kidney components (connected kidney + tumour, face connectivity as
  post-processing counts them) is not 2;
* kidney or tumour reaches a face of the scan (the field of view may cut a kidney);
* a tumour component has no kidney voxel among its face neighbours;
* the kidney or tumour volume lies outside the training cases' range;
* the median HU or the noise inside the predicted kidney (:func:`kidney_intensity`) lies outside
  the training range (measured in the training cases' true kidney): a shifted HU scale, a
  different contrast phase, a noisy scan;
* a voxel spacing or the field of view (mm, per axis) lies outside the training range;
* ``uncertainty_entropy`` above ``qc.max_uncertainty``, or ``uncertainty_tu`` above
  ``qc.max_tumor_uncertainty``; by default each threshold is the highest value among the
  validation cases' predictions, widened by the margin (:func:`uncertainty_thresholds`).

Ranges are widened by ``qc.range_margin`` (a fraction of each end) on both sides.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from kidney_seg.atomic import atomic_path, read_json, write_json_atomic
from kidney_seg.vocabulary import KIDNEY, TUMOR

if TYPE_CHECKING:  # pandas is imported where a table is made: the preprocess and predict jobs import this module
    import pandas as pd

#: Per-case uncertainty columns (prediction records, per_case.csv, the command line's qc.csv).
UNCERTAINTY_COLUMNS: tuple[str, ...] = ("uncertainty_entropy", "uncertainty_tk", "uncertainty_tu")
#: Per-case intensity columns: the CT values inside the predicted (or, for training cases, true) kidney.
INTENSITY_COLUMNS: tuple[str, ...] = ("kidney_hu_median", "kidney_hu_noise")
#: What inference summarises of a case besides its labels (prediction records).
SUMMARY_COLUMNS: tuple[str, ...] = (*UNCERTAINTY_COLUMNS, *INTENSITY_COLUMNS)
#: Per-case QC columns.
QC_COLUMNS: tuple[str, ...] = (
    "qc_flagged",
    "qc_reasons",
    "kidney_components",
    "kidney_component_ml",
    "detached_tumors",
    *SUMMARY_COLUMNS,
)
#: Internal axes in words (axis 0 is the slice axis, then rows and columns).
AXIS_NAMES: tuple[str, str, str] = ("slice", "row", "column")
_SLAB = 16  # slices of class scores handled at a time
#: Face connectivity (6 neighbours), as post-processing labels its components.
_FACES = ndimage.generate_binary_structure(3, 1)


# ---------------------------------------------------------------- uncertainty


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy over the class axis (axis 0) divided by log C: float32 in [0, 1], one class's shape."""
    out = np.empty(probs.shape[1:], dtype=np.float32)
    scale = np.float32(1.0 / math.log(len(probs)))
    for z in range(0, probs.shape[1], _SLAB):
        p = np.clip(probs[:, z : z + _SLAB], 1e-12, 1.0)
        out[z : z + _SLAB] = -(p * np.log(p)).sum(axis=0) * scale
    return out


def soft_disagreement(score_sum: float, mask_sum: float, overlap: float, smooth: float) -> float:
    """``1 - (2 overlap + smooth) / (score_sum + mask_sum + smooth)`` (0 = the scores agree with the mask)."""
    return float(1.0 - (2.0 * overlap + smooth) / (score_sum + mask_sum + smooth))


def uncertainty_summary(probs: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """The per-case uncertainty columns of class scores (C, Z, Y, X) on a grid of ``spacing`` mm.

    The hard prediction is the argmax of the scores (ties to the lower class), as inference makes it.
    """
    smooth = 1000.0 / float(np.prod(spacing))  # voxels in 1 ml
    sums = dict.fromkeys(("tk_p", "tk_h", "tk_ph", "tu_p", "tu_h", "tu_ph", "entropy", "fg"), 0.0)
    tumour = TUMOR < len(probs)
    for z in range(0, probs.shape[1], _SLAB):
        slab = probs[:, z : z + _SLAB]
        labels = np.argmax(slab, axis=0)
        fg = labels > 0
        p_tk = 1.0 - slab[0]
        sums["tk_p"] += float(p_tk.sum(dtype=np.float64))
        sums["tk_h"] += float(np.count_nonzero(fg))
        sums["tk_ph"] += float(p_tk[fg].sum(dtype=np.float64))
        if tumour:
            tu = labels == TUMOR
            sums["tu_p"] += float(slab[TUMOR].sum(dtype=np.float64))
            sums["tu_h"] += float(np.count_nonzero(tu))
            sums["tu_ph"] += float(slab[TUMOR][tu].sum(dtype=np.float64))
        sums["entropy"] += float(normalised_entropy(slab)[fg].sum(dtype=np.float64))
        sums["fg"] += float(np.count_nonzero(fg))
    return {
        "uncertainty_entropy": sums["entropy"] / sums["fg"] if sums["fg"] else math.nan,
        "uncertainty_tk": soft_disagreement(sums["tk_p"], sums["tk_h"], sums["tk_ph"], smooth),
        "uncertainty_tu": soft_disagreement(sums["tu_p"], sums["tu_h"], sums["tu_ph"], smooth) if tumour else 0.0,
    }


# ---------------------------------------------------------------- what a prediction shows


def kidney_intensity(image: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Median HU of the voxels labelled kidney, and the noise there: a robust sigma of neighbour differences.

    The noise is (p75 - p25) / 1.349 of the differences between column neighbours that are
    both kidney, divided by sqrt 2: white noise of sigma s gives s, while the kidney's own
    texture (cortex, medulla), smooth at the voxel scale, adds little. ``image`` and
    ``labels`` share one shape; None for both when no voxel is kidney.
    """
    values, steps = [], []
    for z in range(0, labels.shape[0], _SLAB):
        mask = labels[z : z + _SLAB] == KIDNEY
        if not mask.any():
            continue
        hu = np.asarray(image[z : z + _SLAB], dtype=np.float32)
        values.append(hu[mask])
        pairs = mask[..., 1:] & mask[..., :-1]
        steps.append((hu[..., 1:] - hu[..., :-1])[pairs])
    if not values:
        return dict.fromkeys(INTENSITY_COLUMNS)
    diffs = np.concatenate(steps)
    q25, q75 = np.percentile(diffs, [25, 75]) if diffs.size else (np.nan, np.nan)
    return {
        "kidney_hu_median": float(np.median(np.concatenate(values))),
        "kidney_hu_noise": float((q75 - q25) / 1.349 / math.sqrt(2)) if diffs.size else None,
    }


def voxel_ml(spacing: Sequence[float]) -> float:
    """Millilitres per voxel."""
    return float(np.prod([float(s) for s in spacing])) / 1000.0


def component_volumes_ml(mask: np.ndarray, spacing: Sequence[float]) -> list[float]:
    """Volumes (ml, largest first) of the face-connected components of a mask."""
    components, n = ndimage.label(mask, structure=_FACES)
    if n == 0:
        return []
    counts = np.bincount(components.ravel())[1:]
    return sorted((float(c) * voxel_ml(spacing) for c in counts), reverse=True)


def detached_tumour_volumes_ml(labels: np.ndarray, spacing: Sequence[float]) -> list[float]:
    """Volumes (ml, largest first) of the tumour components with no kidney voxel among their face neighbours."""
    components, n = ndimage.label(labels == TUMOR, structure=_FACES)
    volumes = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        own = components[grown] == index
        if not np.any(ndimage.binary_dilation(own, structure=_FACES) & (labels[grown] == KIDNEY)):
            volumes.append(float(np.count_nonzero(own)) * voxel_ml(spacing))
    return sorted(volumes, reverse=True)


def case_findings(labels: np.ndarray, spacing: Sequence[float]) -> dict:
    """What QC looks at in internal-orientation labels: components, volumes, spacing and field of view."""
    box = _foreground_box(labels)
    inside = labels[box] if box is not None else np.zeros((1, 1, 1), np.uint8)
    ml = voxel_ml(spacing)
    return {
        "cut_faces": cut_faces(box, labels.shape),
        "kidney_component_ml": component_volumes_ml(inside > 0, spacing),
        "detached_tumor_ml": detached_tumour_volumes_ml(inside, spacing),
        "kidney_ml": float(np.count_nonzero(inside == KIDNEY)) * ml,
        "tumor_ml": float(np.count_nonzero(inside == TUMOR)) * ml,
        "spacing_mm": [float(s) for s in spacing],
        "field_of_view_mm": [float(n) * float(s) for n, s in zip(labels.shape, spacing)],
    }


def cut_faces(box: tuple[slice, ...] | None, shape: Sequence[int]) -> list[str]:
    """The faces of the scan that the foreground box (grown by one voxel) reaches, e.g. ``["first slice"]``."""
    if box is None:
        return []
    faces = []
    for axis, (sl, n) in enumerate(zip(box, shape)):
        faces += [f"first {AXIS_NAMES[axis]}"] if sl.start == 0 else []
        faces += [f"last {AXIS_NAMES[axis]}"] if sl.stop >= n else []
    return faces


def _foreground_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """The box of the non-zero labels grown by one voxel (None when there are none)."""
    boxes = ndimage.find_objects((labels > 0).astype(np.uint8))
    if not boxes:
        return None
    return tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(boxes[0], labels.shape))


# ---------------------------------------------------------------- the training range


def training_findings(meta: Mapping) -> dict:
    """Volumes, kidney HU, spacing and field of view of one training case, from its slice cache's meta.json."""
    spacing = [float(s) for s in meta["spacing"]]
    volumes = [float(v) for v in meta["class_volumes_ml"]]
    return {
        **{k: meta.get("kidney_hu", {}).get(k) for k in INTENSITY_COLUMNS},
        "kidney_ml": volumes[KIDNEY] if len(volumes) > KIDNEY else 0.0,
        "tumor_ml": volumes[TUMOR] if len(volumes) > TUMOR else 0.0,
        "spacing_mm": spacing,
        "field_of_view_mm": [float(n) * s for n, s in zip(meta["original_shape"], spacing)],
    }


def _span(values: Iterable[float]) -> list[float] | None:
    """[min, max] of some values (None when there are none)."""
    values = [float(v) for v in values]
    return [min(values), max(values)] if values else None


#: The uncertainty columns that flag a case, the ``qc`` setting of each threshold, and the reason's words.
FLAGGING_UNCERTAINTY: dict[str, tuple[str, str]] = {
    "uncertainty_entropy": ("max_uncertainty", "high uncertainty in the predicted foreground (entropy"),
    "uncertainty_tu": ("max_tumor_uncertainty", "uncertain tumour, a miss or a false positive? (uncertainty_tu"),
}


def uncertainty_thresholds(settings: Mapping, validation: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
    """Per flagging column: its ``qc`` setting, or when null the highest validation value widened by the margin."""
    thresholds = {}
    for column, (key, _) in FLAGGING_UNCERTAINTY.items():
        values = validation.get(column, [])
        if settings[key] is not None:
            thresholds[column] = float(settings[key])
        else:
            thresholds[column] = max(values) * (1 + float(settings["range_margin"])) if values else None
    return thresholds


def validation_uncertainty(record_paths: Sequence[str | os.PathLike]) -> dict[str, list[float]]:
    """The uncertainty columns of some prediction records (values missing from a record left out)."""
    records = [read_json(p) for p in record_paths]
    return {c: [float(r[c]) for r in records if r.get(c) is not None] for c in UNCERTAINTY_COLUMNS}


def build_reference(
    meta_paths: Sequence[str | os.PathLike],
    settings: Mapping,
    out_json: str | os.PathLike,
    validation_records: Sequence[str | os.PathLike] = (),
) -> dict:
    """The training cases' range (their slice caches' meta.json), the QC settings and the uncertainty thresholds.

    A threshold set to null comes from the validation predictions' records
    (:func:`uncertainty_thresholds`). Written atomically.
    """
    cases = [training_findings(read_json(p)) for p in meta_paths]
    if not cases:
        raise ValueError("qc reference: no usable training cases")
    validation = validation_uncertainty(validation_records)
    reference = {
        "n_cases": len(cases),
        "kidney_ml": _span(c["kidney_ml"] for c in cases if c["kidney_ml"] > 0),
        "tumor_ml": _span(c["tumor_ml"] for c in cases if c["tumor_ml"] > 0),
        "spacing_mm": [_span(c["spacing_mm"][a] for c in cases) for a in range(3)],
        "field_of_view_mm": [_span(c["field_of_view_mm"][a] for c in cases) for a in range(3)],
        **{k: _span(c[k] for c in cases if c[k] is not None) for k in INTENSITY_COLUMNS},
        "range_margin": float(settings["range_margin"]),
        "validation_uncertainty": validation,
        "thresholds": uncertainty_thresholds(settings, validation),
    }
    write_json_atomic(out_json, reference)
    return reference


def read_reference(path: str | os.PathLike) -> dict:
    """A QC reference file, checked for its keys."""
    reference = read_json(path)
    keys = ("kidney_ml", "tumor_ml", "spacing_mm", "field_of_view_mm", "range_margin", "thresholds")
    missing = [k for k in keys if not isinstance(reference, dict) or k not in reference]
    if missing:
        raise ValueError(f"{path}: not a QC reference (missing {missing})")
    return reference


# ---------------------------------------------------------------- flags


def _outside(value: float, span: Sequence[float] | None, margin: float) -> bool:
    """Whether ``value`` lies outside ``span`` widened on both sides by ``margin`` (a fraction of each end's size)."""
    return span is not None and not (span[0] - margin * abs(span[0]) <= value <= span[1] + margin * abs(span[1]))


def _range_text(span: Sequence[float], unit: str) -> str:
    """A training range in words."""
    return f"{span[0]:.4g}-{span[1]:.4g} {unit}"


def _ml_list(volumes: Sequence[float]) -> str:
    """Volumes in words, e.g. ``151.2, 3.4 ml``."""
    return ", ".join(f"{v:.3g}" for v in volumes) + " ml"


def range_reasons(findings: Mapping, reference: Mapping) -> list[str]:
    """Reasons for the volumes, kidney HU, spacing and field of view outside the training range."""
    margin, reasons = float(reference["range_margin"]), []
    for key, name in (("kidney_ml", "kidney volume"), ("tumor_ml", "tumour volume")):
        value, span = findings[key], reference[key]
        if value > 0 and _outside(value, span, margin):
            reasons.append(f"{name} {value:.3g} ml outside the training range {_range_text(span, 'ml')}")
    for key, name in (("kidney_hu_median", "kidney HU median"), ("kidney_hu_noise", "kidney HU noise")):
        value, span = findings.get(key), reference.get(key)
        if value is not None and _outside(value, span, margin):
            reasons.append(f"{name} {value:.4g} outside the training range {_range_text(span, 'HU')}")
    for key, name in (("spacing_mm", "spacing"), ("field_of_view_mm", "field of view")):
        for axis, (value, span) in enumerate(zip(findings[key], reference[key])):
            if _outside(value, span, margin):
                where = f"{AXIS_NAMES[axis]} {name}"
                reasons.append(f"{where} {value:.4g} mm outside the training range {_range_text(span, 'mm')}")
    return reasons


def uncertainty_reasons(uncertainty: Mapping, thresholds: Mapping[str, float | None]) -> list[str]:
    """Reasons for the uncertainty columns above their thresholds (a missing value or threshold flags nothing)."""
    reasons = []
    for column, (_, words) in FLAGGING_UNCERTAINTY.items():
        value, threshold = uncertainty.get(column), thresholds.get(column)
        if threshold is not None and value is not None and not math.isnan(value) and value > threshold:
            reasons.append(f"{words} {value:.3f} > {threshold:.3g})")
    return reasons


def qc_flags(findings: Mapping, summary: Mapping, reference: Mapping | None) -> list[str]:
    """Every reason to distrust a prediction (empty: nothing flagged); ranges and thresholds need ``reference``.

    ``summary``: the case's uncertainty and intensity columns (:data:`SUMMARY_COLUMNS`).
    """
    reasons = []
    components = findings["kidney_component_ml"]
    if len(components) != 2:
        reasons.append(
            f"{len(components)} kidney components, expected 2 ({_ml_list(components) if components else 'none'})"
        )
    if findings["cut_faces"]:
        faces = ", ".join(findings["cut_faces"])
        reasons.append(f"kidney or tumour at the scan's edge ({faces}): the field of view may cut it")
    if findings["detached_tumor_ml"]:
        detached = findings["detached_tumor_ml"]
        reasons.append(f"{len(detached)} tumour component(s) not touching a kidney ({_ml_list(detached)})")
    if reference is not None:
        reasons += range_reasons({**findings, **summary}, reference)
        reasons += uncertainty_reasons(summary, reference["thresholds"])
    return reasons


def qc_record(findings: Mapping, summary: Mapping, reference: Mapping | None) -> dict:
    """The per-case QC columns (:data:`QC_COLUMNS`) of a prediction."""
    reasons = qc_flags(findings, summary, reference)
    return {
        "qc_flagged": bool(reasons),
        "qc_reasons": "; ".join(reasons),
        "kidney_components": len(findings["kidney_component_ml"]),
        "kidney_component_ml": " ".join(f"{v:.2f}" for v in findings["kidney_component_ml"]),
        "detached_tumors": len(findings["detached_tumor_ml"]),
        **strict_json(summary),
    }


def _finite_or_none(value: object) -> float | None:
    """A float, with NaN and missing as None (strict JSON)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def strict_json(summary: Mapping) -> dict[str, float | None]:
    """The uncertainty and intensity columns of a case's summary, NaN written as None (for JSON records)."""
    return {k: _finite_or_none(summary.get(k)) for k in SUMMARY_COLUMNS}


def assess_labels(labels: np.ndarray, spacing: Sequence[float], summary: Mapping, reference: Mapping | None) -> dict:
    """The QC record of internal-orientation labels of ``spacing`` mm (without ``reference``: no range or
    uncertainty flags)."""
    return qc_record(case_findings(labels, spacing), summary, reference)


def flagged(per_case: pd.DataFrame) -> pd.Series:
    """Whether each per-case row is flagged (``qc_flagged`` as bool, text or number; missing = not flagged)."""
    if "qc_flagged" not in per_case.columns:
        import pandas as pd

        return pd.Series(False, index=per_case.index)
    return per_case["qc_flagged"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))


def flagged_first(per_case: pd.DataFrame) -> pd.DataFrame:
    """Per-case rows with the flagged cases first, then by the first column (the case); unchanged without flags."""
    if "qc_flagged" not in per_case.columns:
        return per_case
    flagged_rows, names = flagged(per_case), per_case.iloc[:, 0].astype(str)
    order = sorted(range(len(per_case)), key=lambda i: (not flagged_rows.iloc[i], names.iloc[i]))
    return per_case.iloc[order].reset_index(drop=True)


def write_qc_csv(records: Sequence[Mapping], out_csv: str | os.PathLike) -> pd.DataFrame:
    """The command line's qc.csv (case, output and the QC columns, flagged cases first), written atomically."""
    import pandas as pd

    table = flagged_first(pd.DataFrame(list(records)))
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table
