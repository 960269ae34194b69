"""Per-case segmentation metrics and their summary over a test set.

Labels: 0 background, 1 kidney, 2 tumour (and 3 cyst for KiTS21/23). Regions scored:

* ``tk`` (tumour + kidney; KiTS21/23 "kidney and masses"): label > 0,
* ``tu`` (tumour): label == 2,
* ``kidney``: label == 1 (for the paper's per-class precision and recall),
* KiTS21/23 only: ``masses`` (tumour + cyst): label in {2, 3}, and cyst volumes.

Empty-mask convention for overlap scores (as in KiTS23 and medpy): when prediction and
truth are both empty a score is 1.0; when exactly one of them is empty Dice is 0.0.
Precision and recall follow the same rule: both masks empty -> 1.0, otherwise an empty
denominator (no predicted voxels for precision, no true voxels for recall) -> 0.0.

Distance metrics (``*_hd95`` in mm, ``*_surface_dice``) for the regions tk, tu and, on
4-class data, masses:

* Border of a mask = mask XOR its binary erosion with the face-connected (6-neighbour
  in 3D) structure; erosion uses border_value 0, so mask voxels on the array edge are
  border voxels. Distances are exact Euclidean distances in mm (index * spacing) from
  each border voxel of one mask to the nearest border voxel of the other
  (``scipy.ndimage.distance_transform_edt``), in both directions. They are computed
  inside the bounding box of prediction | truth padded by one voxel, which gives
  exactly the uncropped result.
* HD95 follows MONAI and DeepMind's surface-distance: the 95th percentile
  (``np.percentile``, linear interpolation) of each direction separately, then the
  larger of the two. medpy's ``hd95`` instead pools both directions before taking the
  percentile, which can give a smaller value. Both masks empty -> 0.0; exactly one empty
  -> NaN (undefined).
* Surface Dice is MONAI's normalised surface Dice without subvoxels: (pred border
  voxels within ``tolerance`` mm of the truth border + truth border voxels within
  ``tolerance`` of the pred border) / (pred border voxels + truth border voxels),
  "within" meaning distance <= tolerance. Both empty -> 1.0, exactly one empty -> 0.0
  (KiTS23). Tolerances are KiTS23's (``SURFACE_TOLERANCE_MM``): kidney+masses 1.0331 mm
  (used for our tk = label > 0), masses 1.1329 mm, tumour 1.1498 mm. KiTS23's official
  surface Dice weights surface elements by their area; ours counts border voxels, so
  values can differ slightly from the official ones.

So per-case metrics are never NaN except HD95 when exactly one mask is empty (e.g. a
tumour predicted in a tumour-free case). Summaries are NaN-aware: NaNs are skipped,
never averaged in, and ``n`` counts the non-NaN values.

Volumes are in millilitres: voxel count * prod(spacing in mm) / 1000.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from kidney_seg.atomic import atomic_path, write_json_atomic
from kidney_seg.vocabulary import CYST, KIDNEY, KITS19_LABELS, TUMOR
from kidney_seg.volume import read_label

#: Extra per-case columns for 4-class (KiTS21/23) data.
CYST_COLUMNS: tuple[str, ...] = ("masses_dice", "masses_hd95", "masses_surface_dice", "pred_cyst_ml", "true_cyst_ml")
#: KiTS23 surface-Dice tolerances in mm: kidney+masses (our tk), masses, tumour.
SURFACE_TOLERANCE_MM: dict[str, float] = {"tk": 1.0331, "masses": 1.1329, "tu": 1.1498}

#: Per-case metric columns, in the order written to per_case.csv (after ``case_id``).
METRIC_COLUMNS: tuple[str, ...] = (
    "tk_dice",
    "tu_dice",
    "kidney_dice",
    "kidney_precision",
    "kidney_recall",
    "tumor_precision",
    "tumor_recall",
    "tk_hd95",
    "tu_hd95",
    "tk_surface_dice",
    "tu_surface_dice",
    "pred_kidney_ml",
    "true_kidney_ml",
    "pred_tumor_ml",
    "true_tumor_ml",
    "has_tumor",
)
SUMMARY_COLUMNS: tuple[str, ...] = ("metric", "n", "mean", "median", "std", "min", "max")
#: Per-case columns that are summarised (``has_tumor`` is a flag, not a score).
NUMERIC_METRICS: tuple[str, ...] = tuple(c for c in METRIC_COLUMNS if c != "has_tumor")


def _as_masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as boolean masks of one shape."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: prediction {p.shape} vs truth {t.shape}")
    return p, t


def _ratio(num: int, den: int, both_empty: bool) -> float:
    """num/den with the empty-mask convention (both empty -> 1, zero denominator -> 0)."""
    if both_empty:
        return 1.0
    return float(num) / float(den) if den > 0 else 0.0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice 2|P∩T|/(|P|+|T|); both empty -> 1.0, exactly one empty -> 0.0."""
    p, t = _as_masks(pred, truth)
    n_p, n_t = np.count_nonzero(p), np.count_nonzero(t)
    inter = np.count_nonzero(p & t)
    return _ratio(2 * int(inter), int(n_p) + int(n_t), n_p == 0 and n_t == 0)


def precision(pred: np.ndarray, truth: np.ndarray) -> float:
    """Precision |P∩T|/|P|; both empty -> 1.0, empty prediction otherwise -> 0.0."""
    p, t = _as_masks(pred, truth)
    n_p, n_t = np.count_nonzero(p), np.count_nonzero(t)
    return _ratio(int(np.count_nonzero(p & t)), int(n_p), n_p == 0 and n_t == 0)


def recall(pred: np.ndarray, truth: np.ndarray) -> float:
    """Recall |P∩T|/|T|; both empty -> 1.0, empty truth otherwise -> 0.0."""
    p, t = _as_masks(pred, truth)
    n_p, n_t = np.count_nonzero(p), np.count_nonzero(t)
    return _ratio(int(np.count_nonzero(p & t)), int(n_t), n_p == 0 and n_t == 0)


def voxel_volume_ml(spacing: tuple[float, float, float]) -> float:
    """Volume of one voxel in millilitres from its spacing in mm."""
    return float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0


def _spacing(spacing: tuple[float, ...], ndim: int) -> tuple[float, ...]:
    """Spacing as ``ndim`` positive floats (mm), or ValueError."""
    s = tuple(float(x) for x in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(s) != ndim or not all(x > 0 and math.isfinite(x) for x in s):
        raise ValueError(f"spacing {spacing!r} must be {ndim} positive finite numbers (mm)")
    return s


def _box_of(a: np.ndarray) -> list[tuple[int, int]] | None:
    """(first, last + 1) per axis of the nonzero voxels of ``a``; None when there are none."""
    bounds, sub = [], a
    for axis in range(a.ndim):
        others = tuple(i for i in range(a.ndim) if i != axis)
        idx = np.flatnonzero(np.any(sub, axis=others))
        if idx.size == 0:
            return None
        bounds.append((int(idx[0]), int(idx[-1]) + 1))
        sub = sub[(slice(None),) * axis + (slice(*bounds[-1]),)]
    return bounds


def _nonzero_box(*arrays: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every nonzero voxel of the arrays (one shape); empty slices if none."""
    ndim = arrays[0].ndim
    boxes = [b for b in map(_box_of, arrays) if b is not None]
    if not boxes:
        return tuple(slice(0, 0) for _ in range(ndim))
    return tuple(slice(min(b[i][0] for b in boxes), max(b[i][1] for b in boxes)) for i in range(ndim))


def _crop_pair(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of p | t and zero-padded by one voxel on every side.

    Voxels outside that box are False in both masks, so this equals the box grown by one
    voxel (zero-padded where it meets the array edge): borders and distances are unchanged.
    """
    box = _nonzero_box(p, t)
    return np.pad(p[box], 1), np.pad(t[box], 1)


def _border(mask: np.ndarray) -> np.ndarray:
    """Border voxels: mask XOR its face-connected erosion (voxels on the array edge count)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _to_border(src: np.ndarray, dst: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from each ``src`` voxel (C order) to the nearest ``dst`` voxel; inf if ``dst`` is empty."""
    if not dst.any():
        return np.full(int(np.count_nonzero(src)), np.inf)
    return ndimage.distance_transform_edt(~dst, sampling=spacing)[src]


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(pred border -> nearest truth border, truth border -> nearest pred border) in mm; inf toward an empty mask."""
    p, t = _as_masks(pred, truth)
    s = _spacing(spacing, p.ndim)
    p, t = _crop_pair(p, t)
    bp, bt = _border(p), _border(t)
    return _to_border(bp, bt, s), _to_border(bt, bp, s)


def _hd95_of(d_pt: np.ndarray, d_tp: np.ndarray) -> float:
    """HD95 from the two directed distance arrays: both empty -> 0.0, exactly one empty -> NaN."""
    if d_pt.size == 0 and d_tp.size == 0:
        return 0.0
    if d_pt.size == 0 or d_tp.size == 0:
        return math.nan
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def _surface_dice_of(d_pt: np.ndarray, d_tp: np.ndarray, tolerance_mm: float) -> float:
    """Surface Dice from the two directed distance arrays: both empty -> 1.0, one empty -> 0.0."""
    n = d_pt.size + d_tp.size
    if n == 0:
        return 1.0
    close = np.count_nonzero(d_pt <= tolerance_mm) + np.count_nonzero(d_tp <= tolerance_mm)
    return float(close) / float(n)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th-percentile Hausdorff distance in mm, per direction then max (MONAI); both empty -> 0.0, one empty -> NaN."""
    return _hd95_of(*surface_distances(pred, truth, spacing))


def surface_dice(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm`` over border voxels; both empty -> 1.0, one empty -> 0.0."""
    return _surface_dice_of(*surface_distances(pred, truth, spacing), float(tolerance_mm))


def _distance_metrics(region: str, p: np.ndarray, t: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    """``{region}_hd95`` and ``{region}_surface_dice`` (KiTS23 tolerance) from one distance computation."""
    d_pt, d_tp = surface_distances(p, t, spacing)
    return {
        f"{region}_hd95": _hd95_of(d_pt, d_tp),
        f"{region}_surface_dice": _surface_dice_of(d_pt, d_tp, SURFACE_TOLERANCE_MM[region]),
    }


def case_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float], labels: tuple[int, ...] = KITS19_LABELS
) -> dict[str, float]:
    """All per-case metrics for two label volumes of one shape (KiTS21/23 regions when ``labels`` has a cyst)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"label volume shapes differ: prediction {pred.shape} vs truth {truth.shape}")
    ml = voxel_volume_ml(spacing)
    # Every scored region lies inside the foreground box, so cropping changes no metric (and is much faster).
    box = _nonzero_box(pred, truth)
    pred, truth = np.ascontiguousarray(pred[box]), np.ascontiguousarray(truth[box])
    pk, tk = pred == KIDNEY, truth == KIDNEY
    pt, tt = pred == TUMOR, truth == TUMOR
    ptk, ttk = pred > 0, truth > 0
    dist_tk, dist_tu = _distance_metrics("tk", ptk, ttk, spacing), _distance_metrics("tu", pt, tt, spacing)
    return {
        "tk_dice": dice(ptk, ttk),
        "tu_dice": dice(pt, tt),
        "kidney_dice": dice(pk, tk),
        "kidney_precision": precision(pk, tk),
        "kidney_recall": recall(pk, tk),
        "tumor_precision": precision(pt, tt),
        "tumor_recall": recall(pt, tt),
        "tk_hd95": dist_tk["tk_hd95"],
        "tu_hd95": dist_tu["tu_hd95"],
        "tk_surface_dice": dist_tk["tk_surface_dice"],
        "tu_surface_dice": dist_tu["tu_surface_dice"],
        "pred_kidney_ml": int(np.count_nonzero(pk)) * ml,
        "true_kidney_ml": int(np.count_nonzero(tk)) * ml,
        "pred_tumor_ml": int(np.count_nonzero(pt)) * ml,
        "true_tumor_ml": int(np.count_nonzero(tt)) * ml,
        "has_tumor": bool(np.any(tt)),
        **(cyst_metrics(pred, truth, ml, spacing) if CYST in labels else {}),
    }


def cyst_metrics(
    pred: np.ndarray, truth: np.ndarray, voxel_ml: float, spacing: tuple[float, float, float]
) -> dict[str, float]:
    """KiTS21/23 extras: Dice, HD95 and surface Dice of the masses region (tumour + cyst) and cyst volumes."""
    pc, tc = pred == CYST, truth == CYST
    pm, tm = np.isin(pred, (TUMOR, CYST)), np.isin(truth, (TUMOR, CYST))
    return {
        "masses_dice": dice(pm, tm),
        **_distance_metrics("masses", pm, tm, spacing),
        "pred_cyst_ml": int(np.count_nonzero(pc)) * voxel_ml,
        "true_cyst_ml": int(np.count_nonzero(tc)) * voxel_ml,
    }


def evaluate_case(
    case_id: str,
    prediction_path: str | os.PathLike,
    label_path: str | os.PathLike,
    out_json: str | os.PathLike,
    labels: tuple[int, ...] = KITS19_LABELS,
) -> dict:
    """Score a prediction file against its label file, write JSON, return it; CaseDataError on bad input."""
    labels = tuple(labels)
    truth, geometry = read_label(label_path, case_id, labels)
    pred, _ = read_label(prediction_path, case_id, labels, grid=geometry)
    result = {"case_id": str(case_id), **case_metrics(pred, truth, geometry.spacing, labels)}
    write_json_atomic(out_json, json_safe(result))
    return result


def json_safe(record: dict) -> dict:
    """A metrics record with NaN (an undefined HD95) written as null, so the file is strict JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def _read_case_json(path: str | os.PathLike) -> dict:
    """One per-case metrics file, checked for a case id."""
    with open(path) as fh:
        record = json.load(fh)
    if not isinstance(record, dict) or "case_id" not in record:
        raise ValueError(f"{path}: not a per-case metrics file (no 'case_id')")
    return record


def per_case_table(case_json_paths: list) -> pd.DataFrame:
    """Per-case metrics as a DataFrame sorted by case_id (case_id first, then metrics)."""
    if not case_json_paths:
        raise ValueError("summarize: no per-case metrics files given (zero cases to summarise)")
    df = pd.DataFrame([_read_case_json(p) for p in case_json_paths])
    dupes = sorted(df.loc[df["case_id"].duplicated(), "case_id"].astype(str).unique())
    if dupes:
        raise ValueError(f"summarize: duplicate case ids {dupes}")
    for col in METRIC_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    for col in NUMERIC_METRICS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["has_tumor"] = df["has_tumor"].map(_as_flag)
    extra = [c for c in df.columns if c not in ("case_id", *METRIC_COLUMNS)]
    df = df[["case_id", *METRIC_COLUMNS, *extra]]
    return df.sort_values("case_id", kind="stable").reset_index(drop=True)


def _as_flag(value: object) -> bool:
    """A has_tumor value (bool, number or 'True'/'False' text) as bool."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value)


def describe(metric: str, values: pd.Series) -> dict:
    """One summary row: n (non-NaN count), mean, median, std (ddof=0), min, max."""
    v = pd.to_numeric(values, errors="coerce").astype(float).dropna().to_numpy()
    if v.size == 0:
        return {"metric": metric, "n": 0, "mean": np.nan, "median": np.nan, "std": np.nan, "min": np.nan, "max": np.nan}
    return {
        "metric": metric,
        "n": int(v.size),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "std": float(v.std(ddof=0)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def _composite(metric: str, means: list[float], n_cases: int) -> dict:
    """A single-score summary row: the mean of ``means`` (NaN if any is NaN), std 0."""
    score = float(np.mean(means)) if not any(math.isnan(m) for m in means) else np.nan
    std = 0.0 if not math.isnan(score) else np.nan
    return {"metric": metric, "n": int(n_cases), "mean": score, "median": score, "std": std, "min": score, "max": score}


def composite_row(tk: dict, tu: dict, n_cases: int) -> dict:
    """KiTS19 composite: mean of the TK and TU Dice means (a single score, std 0)."""
    return _composite("kits_composite", [float(tk["mean"]), float(tu["mean"])], n_cases)


#: Summary metrics averaged by the KiTS23-style composite: Dice and surface Dice of each region.
KITS23_COMPOSITE_METRICS: tuple[str, ...] = tuple(
    f"{region}_{score}" for region in ("tk", "masses", "tu") for score in ("dice", "surface_dice")
)


def kits23_composite_row(by_name: dict[str, dict], n_cases: int) -> dict:
    """KiTS23-style composite: mean of the Dice and surface Dice means of tk, masses and tu (6 numbers)."""
    means = [float(by_name.get(m, {}).get("mean", np.nan)) for m in KITS23_COMPOSITE_METRICS]
    return _composite("kits23_composite", means, n_cases)


def summary_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """Summary rows: every numeric metric, tu_dice_with_tumor, kits_composite (+ kits23_composite if 4-class)."""
    extra = [c for c in CYST_COLUMNS if c in per_case.columns]
    rows = [describe(m, per_case[m]) for m in (*NUMERIC_METRICS, *extra)]
    with_tumor = per_case.loc[per_case["has_tumor"].astype(bool), "tu_dice"]
    rows.append(describe("tu_dice_with_tumor", with_tumor))
    by_name = {r["metric"]: r for r in rows}
    rows.append(composite_row(by_name["tk_dice"], by_name["tu_dice"], len(per_case)))
    if extra:
        rows.append(kits23_composite_row(by_name, len(per_case)))
    out = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    out["n"] = out["n"].astype(int)
    return out


def _write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a DataFrame as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def summarize(case_json_paths: list, per_case_csv: str | os.PathLike, summary_csv: str | os.PathLike) -> pd.DataFrame:
    """Write per_case.csv and summary.csv from per-case JSON files; return the summary."""
    per_case = per_case_table([Path(p) for p in case_json_paths])
    summary = summary_table(per_case)
    _write_csv_atomic(per_case, per_case_csv)
    _write_csv_atomic(summary, summary_csv)
    return summary
