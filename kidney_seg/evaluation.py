"""Per-case segmentation metrics and their summary over a test set.

Labels: 0 background, 1 kidney, 2 tumour (and 3 cyst for KiTS21/23). Regions scored
(the HEC regions of ``kidney_seg.vocabulary.REGIONS``, plus per-class kidney):

* ``tk`` (tumour + kidney; KiTS21/23 "kidney and masses"): label > 0,
* ``tu`` (tumour): label == 2,
* ``kidney``: label == 1 (for the paper's per-class precision and recall),
* KiTS21/23 only: ``masses`` (tumour + cyst): label in {2, 3}, and cyst volumes.

Empty-mask convention for overlap scores (as the KiTS21/23 scorers and medpy): when
prediction and truth are both empty a score is 1.0; when exactly one of them is empty Dice
is 0.0. Precision and recall follow the same rule: both masks empty -> 1.0, otherwise an
empty denominator (no predicted voxels for precision, no true voxels for recall) -> 0.0.

Distance metrics for the regions tk, tu and, on 4-class data, masses, are those of the
KiTS21/23 scorer: DeepMind's ``surface-distance`` library (``surface_distance.metrics``),
called as the scorer calls it (neheller/kits23, kits23/evaluation/metrics.py). The surface
is made of surface elements (surfels) at voxel corners, each weighted by its area in mm^2.

* ``*_surface_dice``: ``compute_surface_dice_at_tolerance`` (area within the tolerance of
  the other surface, both directions, over the total area). Tolerances follow the source
  (``kidney_seg.vocabulary.surface_tolerances``): KiTS21's for ``kits21``, KiTS23's for every
  other source. Both empty -> 1.0, exactly one empty -> 0.0 (the scorer's convention).
* ``*_hd95`` (mm): ``compute_robust_hausdorff(..., 95)``: the area-weighted 95th percentile of
  each direction, then the larger (medpy's ``hd95`` instead pools voxel-border distances of
  both directions). Both empty -> 0.0; exactly one empty -> NaN (undefined): such a case
  is flagged instead, ``*_missed`` (in the truth, not predicted) or ``*_false_positive``
  (predicted, not in the truth).
* ``*_penalised_hd95`` (mm): HD95 where a miss or a false positive scores the scan's
  diagonal, ``|shape * spacing|`` (the longest distance inside the scan), so that its mean
  counts every case.

Summaries are NaN-aware: NaNs are skipped, never averaged in, and ``n`` counts the non-NaN
values. Single-number rows (composites, counts) give their value in every statistic column,
std 0 and ``n`` the number of cases:

* ``kits_composite``: KiTS19's score, the mean of the TK and TU Dice means;
* ``{region}_missed_cases``, ``{region}_false_positive_cases``: how many cases are flagged;
* 4-class data: ``kits_hec_dice`` and ``kits_hec_surface_dice``, the means over the three HEC
  regions of the per-region means over cases, the two numbers the KiTS21/23 ranking uses
  (neheller/kits23, kits23/evaluation/ranking.py: ``mean_dice``, ``mean_sd``).

Volumes are in millilitres: voxel count * prod(spacing in mm) / 1000.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from surface_distance import metrics as surface_metrics

from kidney_seg.atomic import atomic_path, write_json_atomic
from kidney_seg.data.checks import read_record
from kidney_seg.errors import CaseDataError
from kidney_seg.preprocessing import box_from_list, label_on_plan_grid
from kidney_seg.quality import QC_COLUMNS, UNCERTAINTY_COLUMNS
from kidney_seg.vocabulary import CYST, KIDNEY, REGIONS, TUMOR, labels_of, surface_tolerances
from kidney_seg.volume import read_label

#: Per-case metric columns of every source, in the order written to per_case.csv (after ``case_id``).
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
#: Per-case columns that show misses (every source): HD95 with a miss penalised, and the miss flags.
MISS_COLUMNS: tuple[str, ...] = (
    "tk_penalised_hd95",
    "tu_penalised_hd95",
    "tk_missed",
    "tk_false_positive",
    "tu_missed",
    "tu_false_positive",
)
#: Extra per-case columns for 4-class (KiTS21/23) data: the masses region and cyst volumes.
CYST_COLUMNS: tuple[str, ...] = (
    "masses_dice",
    "masses_hd95",
    "masses_surface_dice",
    "masses_penalised_hd95",
    "masses_missed",
    "masses_false_positive",
    "pred_cyst_ml",
    "true_cyst_ml",
)
#: Yes/no per-case columns: whether the truth has a tumour, and the miss flags of each region.
FLAG_COLUMNS: tuple[str, ...] = ("has_tumor", *(f"{r}_{k}" for r in REGIONS for k in ("missed", "false_positive")))
SUMMARY_COLUMNS: tuple[str, ...] = ("metric", "n", "mean", "median", "std", "min", "max")
#: Per-case columns that are summarised (``has_tumor`` is a flag, not a score).
NUMERIC_METRICS: tuple[str, ...] = tuple(c for c in METRIC_COLUMNS if c not in FLAG_COLUMNS)
#: Prefix of the per-case columns scored on the paper's grid (summarised when present).
PLAN_GRID_PREFIX = "plan_grid_"


def case_columns(source: str) -> tuple[str, ...]:
    """Every per-case column ``case_metrics`` gives for a dataset source, in order."""
    return (*METRIC_COLUMNS, *MISS_COLUMNS, *(CYST_COLUMNS if CYST in labels_of(source) else ()))


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


def scan_diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """The scan's diagonal in mm, ``|shape * spacing|``: the penalty HD95 of a missed or false-positive region."""
    return float(np.linalg.norm(np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)))


def _library_distances(truth: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]) -> dict[str, np.ndarray]:
    """``surface_distance.metrics.compute_surface_distances`` (gt = truth), quiet about SciPy's old namespaces."""
    with warnings.catch_warnings():
        # the library calls scipy.ndimage.filters / .morphology, deprecated aliases of scipy.ndimage
        warnings.filterwarnings("ignore", message=r"Please import .* from the `scipy\.ndimage` namespace")
        return surface_metrics.compute_surface_distances(truth, pred, spacing)


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> dict[str, np.ndarray]:
    """surface-distance's surfel distances (mm) and areas (mm^2) of both masks (``gt`` is the truth).

    Keys as the library names them: ``distances_gt_to_pred``, ``distances_pred_to_gt``,
    ``surfel_areas_gt``, ``surfel_areas_pred``. An empty mask has no surfels; distances toward
    it are inf (built here: the library itself fails on an empty mask under NumPy 2).
    """
    p, t = _as_masks(pred, truth)
    s = _spacing(spacing, p.ndim)
    if p.any() and t.any():
        return _library_distances(t, p, s)
    areas = {
        name: _library_distances(m, m, s)["surfel_areas_gt"] if m.any() else np.zeros(0)
        for name, m in (("gt", t), ("pred", p))
    }
    return {
        "distances_gt_to_pred": np.full(areas["gt"].size, np.inf),
        "distances_pred_to_gt": np.full(areas["pred"].size, np.inf),
        "surfel_areas_gt": areas["gt"],
        "surfel_areas_pred": areas["pred"],
    }


def _empty_case(p: np.ndarray, t: np.ndarray, both_empty: float, one_empty: float) -> float | None:
    """The convention's value when a mask is empty (``both_empty`` or ``one_empty``); None when neither is."""
    p_any, t_any = bool(p.any()), bool(t.any())
    if p_any and t_any:
        return None
    return one_empty if p_any or t_any else both_empty


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    """surface-distance's robust Hausdorff distance at 95 % in mm; both empty -> 0.0, exactly one empty -> NaN."""
    p, t = _as_masks(pred, truth)
    s = _spacing(spacing, p.ndim)
    empty = _empty_case(p, t, 0.0, math.nan)
    if empty is not None:
        return empty
    return float(surface_metrics.compute_robust_hausdorff(_library_distances(t, p, s), 95))


def surface_dice(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float) -> float:
    """surface-distance's surface Dice at ``tolerance_mm``; both empty -> 1.0, exactly one empty -> 0.0 (KiTS)."""
    p, t = _as_masks(pred, truth)
    s = _spacing(spacing, p.ndim)
    empty = _empty_case(p, t, 1.0, 0.0)
    if empty is not None:
        return empty
    return float(surface_metrics.compute_surface_dice_at_tolerance(_library_distances(t, p, s), float(tolerance_mm)))


def region_distance_metrics(
    region: str, p: np.ndarray, t: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float, diagonal_mm: float
) -> dict[str, float | bool]:
    """``{region}_``: hd95, penalised_hd95, surface_dice, missed and false_positive, from one distance computation."""
    empty_hd95, empty_sd = _empty_case(p, t, 0.0, math.nan), _empty_case(p, t, 1.0, 0.0)
    if empty_hd95 is None:
        d = _library_distances(t, p, spacing)
        h = float(surface_metrics.compute_robust_hausdorff(d, 95))
        sd = float(surface_metrics.compute_surface_dice_at_tolerance(d, float(tolerance_mm)))
    else:
        h, sd = empty_hd95, empty_sd
    p_any, t_any = bool(p.any()), bool(t.any())
    return {
        f"{region}_hd95": h,
        f"{region}_penalised_hd95": diagonal_mm if math.isnan(h) else h,
        f"{region}_surface_dice": sd,
        f"{region}_missed": t_any and not p_any,
        f"{region}_false_positive": p_any and not t_any,
    }


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """The boolean mask of an HEC region (``tk``, ``masses``, ``tu``) in a label volume."""
    return np.isin(labels, REGIONS[region])


def case_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float], source: str = "kits19"
) -> dict[str, float | bool]:
    """All per-case metrics (``case_columns(source)``, in order) for two label volumes of one shape.

    ``source`` chooses the labels (the masses region and cysts on KiTS21/23) and the
    surface-Dice tolerances (``kidney_seg.vocabulary.surface_tolerances``).
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"label volume shapes differ: prediction {pred.shape} vs truth {truth.shape}")
    s = _spacing(spacing, pred.ndim)
    tolerances, four_class = surface_tolerances(source), CYST in labels_of(source)
    diagonal, ml = scan_diagonal_mm(pred.shape, s), voxel_volume_ml(s)
    # Every scored region lies inside the foreground box, and surface-distance crops to it itself,
    # so cropping changes no metric (tests/test_kits_metrics.py checks it) and is much faster.
    box = _nonzero_box(pred, truth)
    pred, truth = np.ascontiguousarray(pred[box]), np.ascontiguousarray(truth[box])
    pk, tk = pred == KIDNEY, truth == KIDNEY
    pt, tt = pred == TUMOR, truth == TUMOR
    regions = ("tk", "tu", "masses") if four_class else ("tk", "tu")
    distance = {}
    for region in regions:
        p, t = region_mask(pred, region), region_mask(truth, region)
        distance.update(region_distance_metrics(region, p, t, s, tolerances[region], diagonal))
    values = {
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
        **distance,
    }
    if four_class:
        values["masses_dice"] = dice(region_mask(pred, "masses"), region_mask(truth, "masses"))
        values["pred_cyst_ml"] = int(np.count_nonzero(pred == CYST)) * ml
        values["true_cyst_ml"] = int(np.count_nonzero(truth == CYST)) * ml
    return {c: values[c] for c in case_columns(source)}


def evaluate_case(
    case_id: str,
    prediction_path: str | os.PathLike,
    label_path: str | os.PathLike,
    out_json: str | os.PathLike,
    source: str = "kits19",
) -> dict:
    """Score a prediction file against its label file (labels and tolerances of ``source``), write JSON, return it.

    CaseDataError (naming the case and the file) on bad input.
    """
    result, _ = _scored(case_id, prediction_path, label_path, source)
    write_json_atomic(out_json, json_safe(result))
    return result


def _scored(
    case_id: str, prediction_path: str | os.PathLike, label_path: str | os.PathLike, source: str
) -> tuple[dict, np.ndarray]:
    """The metrics record of a prediction file against its label file, and the truth (internal orientation)."""
    labels = labels_of(source)
    truth, geometry = read_label(label_path, case_id, labels)
    pred, _ = read_label(prediction_path, case_id, labels, grid=geometry)
    return {"case_id": str(case_id), **case_metrics(pred, truth, geometry.spacing, source)}, truth


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
    """Per-case metrics as a DataFrame sorted by case_id (case_id, metrics, miss columns, 4-class columns, others)."""
    if not case_json_paths:
        raise ValueError("summarize: no per-case metrics files given (zero cases to summarise)")
    df = pd.DataFrame([_read_case_json(p) for p in case_json_paths])
    dupes = sorted(df.loc[df["case_id"].duplicated(), "case_id"].astype(str).unique())
    if dupes:
        raise ValueError(f"summarize: duplicate case ids {dupes}")
    for col in METRIC_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    known = [c for c in (*METRIC_COLUMNS, *MISS_COLUMNS, *CYST_COLUMNS) if c in df.columns]
    for col in known:
        if col in FLAG_COLUMNS:
            df[col] = df[col].map(_as_flag)
        else:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    extra = [c for c in df.columns if c not in ("case_id", *known)]
    df = df[["case_id", *known, *extra]]
    return df.sort_values("case_id", kind="stable").reset_index(drop=True)


def _as_flag(value: object) -> bool:
    """A yes/no value (bool, number or 'True'/'False' text) as bool."""
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


def _single(metric: str, value: float, n_cases: int) -> dict:
    """A single-number summary row: the value in every statistic, std 0 (NaN stays NaN), n the case count."""
    std = np.nan if math.isnan(value) else 0.0
    return {"metric": metric, "n": int(n_cases), "mean": value, "median": value, "std": std, "min": value, "max": value}


def _mean_of(means: list[float]) -> float:
    """The mean of summary means; NaN if any is NaN."""
    return float(np.mean(means)) if not any(math.isnan(m) for m in means) else math.nan


def composite_row(tk: dict, tu: dict, n_cases: int) -> dict:
    """KiTS19 composite: mean of the TK and TU Dice means (a single score, std 0)."""
    return _single("kits_composite", _mean_of([float(tk["mean"]), float(tu["mean"])]), n_cases)


def kits_hec_rows(by_name: dict[str, dict], n_cases: int) -> list[dict]:
    """KiTS21/23's two aggregates: the mean over the HEC regions of the Dice means, and of the surface-Dice means."""
    return [
        _single(
            f"kits_hec_{score}",
            _mean_of([float(by_name.get(f"{r}_{score}", {}).get("mean", np.nan)) for r in REGIONS]),
            n_cases,
        )
        for score in ("dice", "surface_dice")
    ]


def miss_count_rows(per_case: pd.DataFrame) -> list[dict]:
    """``{region}_missed_cases``, ``{region}_false_positive_cases`` and ``qc_flagged_cases``: cases per flag present."""
    rows = []
    if "qc_flagged" in per_case.columns:
        rows.append(_single("qc_flagged_cases", float(per_case["qc_flagged"].map(_as_flag).sum()), len(per_case)))
    for region in REGIONS:
        for kind in ("missed", "false_positive"):
            col = f"{region}_{kind}"
            if col in per_case.columns:
                count = float(per_case[col].map(_as_flag).sum())
                rows.append(_single(f"{col}_cases", count, len(per_case)))
    return rows


def _summarised_columns(per_case: pd.DataFrame) -> list[str]:
    """The per-case columns described one by one: every numeric metric present, paper-grid and uncertainty included."""
    known = [c for c in (*NUMERIC_METRICS, *MISS_COLUMNS, *CYST_COLUMNS) if c not in FLAG_COLUMNS]
    plan_grid = [
        c
        for c in per_case.columns
        if str(c).startswith(PLAN_GRID_PREFIX) and str(c).removeprefix(PLAN_GRID_PREFIX) not in FLAG_COLUMNS
    ]
    uncertainty = [c for c in UNCERTAINTY_COLUMNS if c in per_case.columns]
    return [c for c in known if c in per_case.columns or c in NUMERIC_METRICS] + plan_grid + uncertainty


def summary_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """Summary rows: each numeric metric, tu_dice_with_tumor, kits_composite, miss counts (+ KiTS21/23 aggregates)."""
    rows = [describe(m, per_case[m]) for m in _summarised_columns(per_case)]
    with_tumor = per_case.loc[per_case["has_tumor"].map(_as_flag).astype(bool), "tu_dice"]
    rows.append(describe("tu_dice_with_tumor", with_tumor))
    by_name = {r["metric"]: r for r in rows}
    rows.append(composite_row(by_name["tk_dice"], by_name["tu_dice"], len(per_case)))
    rows += miss_count_rows(per_case)
    if "masses_dice" in per_case.columns:
        rows += kits_hec_rows(by_name, len(per_case))
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


def evaluate_case_on_both_grids(
    case_id: str,
    prediction_record: str | os.PathLike,
    label_path: str | os.PathLike,
    out_json: str | os.PathLike,
    source: str = "kits19",
) -> dict:
    """``evaluate_case`` on the scan's grid plus, prefixed ``plan_grid_``, ``case_metrics`` on the plan's grid.

    ``prediction_record``: a prediction's record (``prediction``, ``plan_grid_prediction`` and
    ``plan_grid`` = crop box, shape, spacing; its QC columns, :data:`kidney_seg.quality.QC_COLUMNS`,
    are copied into the metrics). On the plan's grid the truth is cut to the
    crop box and resampled nearest (:func:`kidney_seg.preprocessing.label_on_plan_grid`) and
    the prediction is the argmax there (no round trip). Writes JSON and returns it.
    """
    record = read_record(prediction_record)
    result, truth = _scored(case_id, record["prediction"], label_path, source)
    grid = record["plan_grid"]
    shape, spacing = tuple(int(n) for n in grid["shape"]), tuple(float(v) for v in grid["spacing"])
    plan_pred, _ = read_label(record["plan_grid_prediction"], case_id, labels_of(source))
    if plan_pred.shape != shape:
        reason = f"plan-grid prediction has shape {plan_pred.shape}, its record says {shape}"
        raise CaseDataError(case_id, record["plan_grid_prediction"], reason)
    plan_truth = label_on_plan_grid(truth, box_from_list(grid["crop_box"]), shape)
    plan = case_metrics(plan_pred, plan_truth, spacing, source)
    result.update({f"{PLAN_GRID_PREFIX}{k}": v for k, v in plan.items()})
    result.update({k: record[k] for k in QC_COLUMNS if k in record})
    write_json_atomic(out_json, json_safe(result))
    return result
