"""Per-case segmentation metrics and their summary over a test set.

Labels: 0 background, 1 kidney, 2 tumour (and 3 cyst for KiTS21/23). Regions scored:

* ``tk`` (tumour + kidney; KiTS21/23 "kidney and masses"): label > 0,
* ``tu`` (tumour): label == 2,
* ``kidney``: label == 1 (for the paper's per-class precision and recall),
* KiTS21/23 only: ``masses`` (tumour + cyst): label in {2, 3}, and cyst volumes.

Empty-mask convention (as in KiTS23 and medpy): when prediction and truth are both
empty a score is 1.0; when exactly one of them is empty Dice is 0.0. Precision and
recall follow the same rule: both masks empty -> 1.0, otherwise an empty denominator
(no predicted voxels for precision, no true voxels for recall) -> 0.0. So per-case
metrics computed here are never NaN. Summaries are NaN-aware anyway (metrics files from
elsewhere may hold NaN): NaNs are skipped, never averaged in, and ``n`` counts the
non-NaN values.

Volumes are in millilitres: voxel count * prod(spacing in mm) / 1000.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from kidney_seg.io import atomic_path, geometry_of, load_label, load_nifti, write_json_atomic

VALID_LABELS: tuple[int, ...] = (0, 1, 2)
KIDNEY, TUMOR, CYST = 1, 2, 3
#: Extra per-case columns for 4-class (KiTS21/23) data.
CYST_COLUMNS: tuple[str, ...] = ("masses_dice", "pred_cyst_ml", "true_cyst_ml")

#: Per-case metric columns, in the order written to per_case.csv (after ``case_id``).
METRIC_COLUMNS: tuple[str, ...] = (
    "tk_dice",
    "tu_dice",
    "kidney_dice",
    "kidney_precision",
    "kidney_recall",
    "tumor_precision",
    "tumor_recall",
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


def case_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float], labels: tuple[int, ...] = VALID_LABELS
) -> dict[str, float]:
    """All per-case metrics for two label volumes of one shape (KiTS21/23 regions when ``labels`` has a cyst)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"label volume shapes differ: prediction {pred.shape} vs truth {truth.shape}")
    ml = voxel_volume_ml(spacing)
    pk, tk = pred == KIDNEY, truth == KIDNEY
    pt, tt = pred == TUMOR, truth == TUMOR
    return {
        "tk_dice": dice(pred > 0, truth > 0),
        "tu_dice": dice(pt, tt),
        "kidney_dice": dice(pk, tk),
        "kidney_precision": precision(pk, tk),
        "kidney_recall": recall(pk, tk),
        "tumor_precision": precision(pt, tt),
        "tumor_recall": recall(pt, tt),
        "pred_kidney_ml": int(np.count_nonzero(pk)) * ml,
        "true_kidney_ml": int(np.count_nonzero(tk)) * ml,
        "pred_tumor_ml": int(np.count_nonzero(pt)) * ml,
        "true_tumor_ml": int(np.count_nonzero(tt)) * ml,
        "has_tumor": bool(np.any(tt)),
        **(cyst_metrics(pred, truth, ml) if CYST in labels else {}),
    }


def cyst_metrics(pred: np.ndarray, truth: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """KiTS21/23 extras: Dice of the masses region (tumour + cyst) and cyst volumes."""
    pc, tc = pred == CYST, truth == CYST
    return {
        "masses_dice": dice(np.isin(pred, (TUMOR, CYST)), np.isin(truth, (TUMOR, CYST))),
        "pred_cyst_ml": int(np.count_nonzero(pc)) * voxel_ml,
        "true_cyst_ml": int(np.count_nonzero(tc)) * voxel_ml,
    }


def _header_geometry(path: str | os.PathLike, case_id: str):
    """Geometry of an already validated NIfTI file (header only)."""
    try:
        return geometry_of(nib.load(str(path)))
    except Exception:  # fall back to the checked loader for a clear error
        return geometry_of(load_nifti(path, case_id))


def evaluate_case(
    case_id: str,
    prediction_path: str | os.PathLike,
    label_path: str | os.PathLike,
    out_json: str | os.PathLike,
    labels: tuple[int, ...] = VALID_LABELS,
) -> dict:
    """Score a prediction file against its label file, write JSON, return it; CaseDataError on bad input."""
    labels = tuple(labels)
    truth = load_label(label_path, case_id, labels)
    label_geometry = _header_geometry(label_path, case_id)
    pred = load_label(prediction_path, case_id, labels, label_geometry)
    result = {"case_id": str(case_id), **case_metrics(pred, truth, label_geometry.spacing, labels)}
    write_json_atomic(out_json, result)
    return result


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


def composite_row(tk: dict, tu: dict, n_cases: int) -> dict:
    """KiTS19 composite: mean of the TK and TU Dice means (a single score, std 0)."""
    means = [m for m in (tk["mean"], tu["mean"]) if not math.isnan(m)]
    score = float(np.mean(means)) if len(means) == 2 else np.nan
    std = 0.0 if not math.isnan(score) else np.nan
    return {"metric": "kits_composite", "n": int(n_cases), "mean": score, "median": score, "std": std, "min": score, "max": score}


def summary_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """Summary rows for every numeric metric plus tu_dice_with_tumor and kits_composite."""
    extra = [c for c in CYST_COLUMNS if c in per_case.columns]
    rows = [describe(m, per_case[m]) for m in (*NUMERIC_METRICS, *extra)]
    with_tumor = per_case.loc[per_case["has_tumor"].astype(bool), "tu_dice"]
    rows.append(describe("tu_dice_with_tumor", with_tumor))
    by_name = {r["metric"]: r for r in rows}
    rows.append(composite_row(by_name["tk_dice"], by_name["tu_dice"], len(per_case)))
    out = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    out["n"] = out["n"].astype(int)
    return out


def _write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a DataFrame as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def summarize(
    case_json_paths: list, per_case_csv: str | os.PathLike, summary_csv: str | os.PathLike
) -> pd.DataFrame:
    """Write per_case.csv and summary.csv from per-case JSON files; return the summary."""
    per_case = per_case_table([Path(p) for p in case_json_paths])
    summary = summary_table(per_case)
    _write_csv_atomic(per_case, per_case_csv)
    _write_csv_atomic(summary, summary_csv)
    return summary
