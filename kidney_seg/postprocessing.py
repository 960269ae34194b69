"""Connected-component post-processing, chosen on the validation split.

nnU-Net decides its post-processing the same way (a step is kept only where it improves
the validation Dice), but its steps differ: it keeps the single largest foreground
component, then the largest component per class. Ours are below.

Labels: 0 background, 1 kidney, 2 tumour (and 3 cyst for KiTS21/23). Two candidate
steps, always applied in this order when chosen (``STEPS``):

* ``"foreground"``: label the foreground (label > 0) into connected components with
  face connectivity (``scipy.ndimage.label``'s default structure: 6 neighbours in 3D,
  no edge or corner neighbours); keep the ``keep_largest`` largest components and, of
  those, drop any smaller than ``min_component_ml``, except that the single largest
  component is always kept, so a non-empty prediction is never emptied. Every other
  voxel becomes background, whatever its label (tumour or cyst outside the kept region
  goes too). The default ``keep_largest`` is 2: both kidneys.
* ``"tumor"``: tumour (label 2) components, again with face connectivity, smaller than
  ``min_tumor_ml`` are relabelled: to kidney (1) when one of their voxels has a kidney
  face neighbour, else to background (0).

Sizes are in millilitres: voxel count * prod(spacing in mm) / 1000. Like every stage,
post-processing works in the internal orientation with the internal spacing
(:func:`kidney_seg.volume.read_label`); a prediction file is put back on its own grid
when written.

The decision (:func:`decide`) is greedy and sequential: starting from no
steps, each step of ``STEPS`` in turn is added on top of the steps already chosen and
kept only if the mean validation Dice of the region it targets (``"foreground"``: TK,
label > 0; ``"tumor"``: TU, label == 2) strictly improves and the mean Dice of the other
region does not drop (tolerance 1e-9). Dice is :func:`kidney_seg.evaluation.dice` (both
masks empty -> 1). Each case is scored once for every subset of steps, then released,
so the validation predictions can be streamed from disk one case at a time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from kidney_seg.atomic import write_json_atomic
from kidney_seg.config import with_defaults
from kidney_seg.data.checks import read_record
from kidney_seg.evaluation import dice, voxel_volume_ml
from kidney_seg.quality import SUMMARY_COLUMNS, assess_labels
from kidney_seg.vocabulary import KIDNEY, KITS19_LABELS, TUMOR
from kidney_seg.volume import Geometry, from_internal, read_label, save_like

STEPS: tuple[str, ...] = ("foreground", "tumor")
#: The region each step targets and the other region it must not harm.
STEP_REGIONS: dict[str, tuple[str, str]] = {"foreground": ("tk", "tu"), "tumor": ("tu", "tk")}
SETTING_KEYS: tuple[str, ...] = ("enabled", "keep_largest", "min_component_ml", "min_tumor_ml")
DECISION_KEYS: tuple[str, ...] = ("enabled", "settings", "validation_cases", "steps", "apply")
TOLERANCE = 1e-9
DISABLED = "post-processing disabled (postprocessing.enabled is false)"
NO_CASES = "no validation cases to decide on"

Case = tuple[str, np.ndarray, np.ndarray, tuple[float, float, float]]


# ------------------------------------------------------------------ settings


def _as_number(key: str, value: object, integer: bool) -> float | int:
    """One numeric setting, checked (booleans and non-finite values are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"postprocessing.{key} must be a finite number, got {value!r}")
    if integer and float(value) != int(value):
        raise ValueError(f"postprocessing.{key} must be an integer, got {value!r}")
    return int(value) if integer else float(value)


def resolve_settings(settings: dict | None) -> dict:
    """Settings with the schema's defaults filled in and values checked; ValueError on unknown keys or bad values."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(f"unknown postprocessing settings {unknown}; known {sorted(SETTING_KEYS)}")
    out = with_defaults("postprocessing", settings)
    if not isinstance(out["enabled"], bool):
        raise ValueError(f"postprocessing.enabled must be true or false, got {out['enabled']!r}")
    out["keep_largest"] = _as_number("keep_largest", out["keep_largest"], integer=True)
    out["min_component_ml"] = _as_number("min_component_ml", out["min_component_ml"], integer=False)
    out["min_tumor_ml"] = _as_number("min_tumor_ml", out["min_tumor_ml"], integer=False)
    if out["keep_largest"] < 1:
        raise ValueError(f"postprocessing.keep_largest must be >= 1, got {out['keep_largest']}")
    if out["min_component_ml"] < 0 or out["min_tumor_ml"] < 0:
        raise ValueError("postprocessing.min_component_ml and min_tumor_ml must be >= 0")
    return out


def check_steps(steps: Iterable[str]) -> list[str]:
    """Step names checked against ``STEPS`` (no unknown names, no repeats), in ``STEPS`` order."""
    steps = list(steps)
    unknown = sorted({str(s) for s in steps} - set(STEPS))
    if unknown:
        raise ValueError(f"unknown post-processing steps {unknown}; known {list(STEPS)}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"post-processing steps repeated: {steps}")
    return [s for s in STEPS if s in steps]


# ------------------------------------------------------------------ the two steps


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """The box around a mask's True voxels grown by ``margin`` (clamped), or None when it is empty."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _components(mask: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Face-connected components (int32, 0 outside) of a boolean mask and their sizes in ml (index 0: 0)."""
    comp, n = ndimage.label(mask)  # default structure: face (6-neighbour) connectivity
    counts = np.bincount(comp[mask], minlength=int(n) + 1)  # mask voxels only: no int64 volume, no index 0
    return comp, counts.astype(np.float64) * voxel_volume_ml(spacing)


def keep_main_components(labels: np.ndarray, spacing, keep_largest: int = 2, min_size_ml: float = 0.0) -> np.ndarray:
    """The ``keep_largest`` largest foreground components (none under ``min_size_ml`` but the largest); rest 0."""
    if keep_largest < 1:
        raise ValueError(f"keep_largest must be >= 1, got {keep_largest}")
    out = np.array(labels, dtype=np.uint8, copy=True)
    box = _bounding_box(out > 0)
    if box is None:
        return out
    crop = out[box]  # a view: writes go to ``out``
    comp, sizes = _components(crop > 0, spacing)
    order = np.argsort(-sizes[1:], kind="stable") + 1  # largest first; ties by component index
    keep = np.zeros(sizes.size, dtype=bool)
    chosen = order[:keep_largest]
    keep[chosen[sizes[chosen] >= min_size_ml]] = True
    keep[order[0]] = True  # never empty a non-empty prediction
    crop[np.logical_not(keep)[comp]] = 0  # lookup table: one bool volume, no int copies
    return out


def _touches(comp: np.ndarray, index: int, box: tuple[slice, ...], labels: np.ndarray, value: int) -> bool:
    """Whether component ``index`` (bounding box ``box``) has a face neighbour labelled ``value``."""
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, dim)) for s, dim in zip(box, comp.shape))
    mask = comp[grown] == index
    ring = ndimage.binary_dilation(mask) & ~mask  # default structure: face neighbours
    return bool(np.any(labels[grown][ring] == value))


def remove_small_tumors(labels: np.ndarray, spacing, min_size_ml: float) -> np.ndarray:
    """Tumour components under ``min_size_ml``: kidney if they touch kidney (face), else background."""
    original = np.asarray(labels)
    out = np.array(original, dtype=np.uint8, copy=True)
    box = _bounding_box(out == TUMOR, margin=1)  # the margin holds every face neighbour
    if box is None:
        return out
    crop, before = out[box], original[box]
    comp, sizes = _components(crop == TUMOR, spacing)
    small = np.flatnonzero(sizes[1:] < min_size_ml) + 1
    boxes = ndimage.find_objects(comp) if small.size else []  # each small component is handled locally
    for index in small:
        sub = boxes[index - 1]
        value = KIDNEY if _touches(comp, int(index), sub, before, KIDNEY) else 0
        region = crop[sub]
        region[comp[sub] == index] = value
    return out


def apply_steps(labels: np.ndarray, spacing, steps: Iterable[str], settings: dict) -> np.ndarray:
    """The chosen steps applied in ``STEPS`` order to a copy of ``labels`` (uint8 out)."""
    settings = resolve_settings(settings)
    out = np.array(labels, dtype=np.uint8, copy=True)
    for step in check_steps(steps):
        out = _apply_one(out, spacing, step, settings)
    return out


def decided_steps(decision: dict | None) -> Callable[[np.ndarray, tuple[float, ...]], np.ndarray] | None:
    """The decided steps as a function of (labels, spacing), or None when the decision applies none."""
    if not decision or not decision["apply"]:
        return None
    return lambda labels, spacing: apply_steps(labels, spacing, decision["apply"], decision["settings"])


def _apply_one(labels: np.ndarray, spacing, step: str, settings: dict) -> np.ndarray:
    """One step with its settings."""
    if step == "foreground":
        return keep_main_components(labels, spacing, settings["keep_largest"], settings["min_component_ml"])
    return remove_small_tumors(labels, spacing, settings["min_tumor_ml"])


# ------------------------------------------------------------------ decision


def _region_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """TK (label > 0) and TU (label == 2) Dice."""
    return {"tk": dice(pred > 0, truth > 0), "tu": dice(pred == TUMOR, truth == TUMOR)}


def case_scores(
    pred: np.ndarray, truth: np.ndarray, spacing, settings: dict
) -> dict[tuple[str, ...], dict[str, float]]:
    """TK/TU Dice of one case for every subset of ``STEPS`` (keyed by the subset in ``STEPS`` order)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    results: dict[tuple[str, ...], np.ndarray] = {(): np.asarray(pred, dtype=np.uint8)}
    scores = {(): _region_dice(pred, truth)}
    for subset in _subsets():
        if subset:
            results[subset] = _apply_one(results[subset[:-1]], spacing, subset[-1], settings)
            scores[subset] = _region_dice(results[subset], truth)
    return scores


def _subsets() -> list[tuple[str, ...]]:
    """All subsets of ``STEPS`` in ``STEPS`` order, each listed after its prefixes."""
    picks = itertools.product((False, True), repeat=len(STEPS))
    subsets = [tuple(s for s, on in zip(STEPS, pick) if on) for pick in picks]
    return sorted(subsets, key=len)


def _mean(scores: list[dict], subset: tuple[str, ...], region: str) -> float:
    """Mean Dice of ``region`` over cases for one subset of steps."""
    return float(np.mean([s[subset][region] for s in scores]))


def choose_steps(scores: list[dict]) -> tuple[list[dict], list[str]]:
    """Greedy sequential choice over ``STEPS`` from per-case scores: (step records, chosen names)."""
    chosen: list[str] = []
    records = []
    for step in STEPS:
        region, other = STEP_REGIONS[step]
        before, after = tuple(chosen), tuple(check_steps(chosen + [step]))
        rec = {
            "name": step,
            "region": region,
            "dice_before": _mean(scores, before, region),
            "dice_after": _mean(scores, after, region),
            "other_region": other,
            "other_before": _mean(scores, before, other),
            "other_after": _mean(scores, after, other),
        }
        rec["applied"] = bool(
            rec["dice_after"] > rec["dice_before"] + TOLERANCE and rec["other_after"] >= rec["other_before"] - TOLERANCE
        )
        if rec["applied"]:
            chosen.append(step)
        records.append(rec)
    return records, chosen


def _skipped(settings: dict, case_ids: list[str], reason: str) -> dict:
    """The decision when nothing is evaluated."""
    return {
        "enabled": bool(settings["enabled"]),
        "settings": settings,
        "validation_cases": case_ids,
        "steps": [],
        "apply": [],
        "reason": reason,
    }


def decide(cases: Iterable[Case], settings: dict) -> dict:
    """Choose the steps greedily on validation cases (case_id, prediction, truth, spacing); JSON-ready dict."""
    settings = resolve_settings(settings)
    if not settings["enabled"]:
        return _skipped(settings, [str(c[0]) for c in cases], DISABLED)
    case_ids, scores = [], []
    for case_id, pred, truth, spacing in cases:  # consumed once: cases may be a lazy generator
        if str(case_id) in case_ids:
            raise ValueError(f"validation case {case_id} given twice")
        try:
            scores.append(case_scores(pred, truth, spacing, settings))
        except ValueError as exc:
            raise ValueError(f"case {case_id}: {exc}") from exc
        case_ids.append(str(case_id))
    if not case_ids:
        return _skipped(settings, [], NO_CASES)
    records, chosen = choose_steps(scores)
    return {"enabled": True, "settings": settings, "validation_cases": case_ids, "steps": records, "apply": chosen}


def _load_case(case_id: str, prediction_path, label_path, labels: tuple[int, ...]) -> Case:
    """Truth and prediction (checked against the truth's grid) in the internal orientation, with spacing."""
    truth, geometry = read_label(label_path, case_id, labels)
    pred, _ = read_label(prediction_path, case_id, labels, grid=geometry)
    return str(case_id), pred, truth, geometry.spacing


def decide_from_files(
    case_ids: Sequence[str],
    prediction_paths: Sequence,
    label_paths: Sequence,
    settings: dict,
    out_json: str | os.PathLike,
    labels: tuple[int, ...] = KITS19_LABELS,
) -> dict:
    """Decide on validation files (loaded one case at a time), write the decision JSON atomically, return it."""
    case_ids, prediction_paths, label_paths = list(case_ids), list(prediction_paths), list(label_paths)
    if not len(case_ids) == len(prediction_paths) == len(label_paths):
        raise ValueError(
            f"decide_from_files: {len(case_ids)} case ids, {len(prediction_paths)} predictions, "
            f"{len(label_paths)} label files; the lists must have equal lengths"
        )
    settings = resolve_settings(settings)
    ids = [str(c) for c in case_ids]
    if not settings["enabled"]:  # nothing is read
        decision = _skipped(settings, ids, DISABLED)
    else:
        lazy = (_load_case(c, p, t, tuple(labels)) for c, p, t in zip(ids, prediction_paths, label_paths))
        decision = decide(lazy, settings)
    write_json_atomic(out_json, decision)
    return decision


# ------------------------------------------------------------------ decision files


def validate_decision(decision: object, source: object = "decision") -> dict:
    """A decision dict checked (keys, settings, known steps in ``apply``); ValueError naming ``source``."""
    if not isinstance(decision, dict):
        raise ValueError(f"{source}: a post-processing decision must be a JSON object")
    missing = [k for k in DECISION_KEYS if k not in decision]
    if missing:
        raise ValueError(f"{source}: post-processing decision lacks keys {missing}")
    settings = decision["settings"]
    if not isinstance(settings, dict) or sorted(settings) != sorted(SETTING_KEYS):
        raise ValueError(f"{source}: decision settings must have exactly the keys {sorted(SETTING_KEYS)}")
    apply = decision["apply"]
    if not isinstance(apply, list) or not all(isinstance(s, str) for s in apply):
        raise ValueError(f"{source}: decision 'apply' must be a list of step names")
    try:
        settings = resolve_settings(settings)
        steps = check_steps(apply)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    if steps and not decision["enabled"]:
        raise ValueError(f"{source}: decision is disabled but applies steps {steps}")
    return {**decision, "settings": settings, "apply": steps}


def read_decision(path: str | os.PathLike) -> dict:
    """Load and validate a decision JSON written by :func:`decide_from_files`."""
    try:
        decision = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return validate_decision(decision, path)


# ------------------------------------------------------------------ applying to a file


def _postprocessed(
    case_id: str,
    prediction_path: str | os.PathLike,
    out_path: str | os.PathLike,
    decision: dict,
    labels: tuple[int, ...],
) -> tuple[np.ndarray, Geometry]:
    """Apply a decision to a prediction file and write it on the input's grid; the labels (internal layout) and grid."""
    decision = validate_decision(decision)
    prediction, geometry = read_label(prediction_path, case_id, tuple(labels))
    kept = apply_steps(prediction, geometry.spacing, decision["apply"], decision["settings"])
    del prediction
    save_like(out_path, from_internal(kept, geometry), reference=prediction_path)
    return kept, geometry


def postprocess_file(
    case_id: str,
    prediction_path: str | os.PathLike,
    out_path: str | os.PathLike,
    decision: dict,
    labels: tuple[int, ...] = KITS19_LABELS,
) -> np.ndarray:
    """Apply a decision to a prediction file; write a uint8 NIfTI atomically on the input's grid; return it."""
    kept, geometry = _postprocessed(case_id, prediction_path, out_path, decision, labels)
    return from_internal(kept, geometry)


def postprocess_prediction(
    case_id: str,
    raw_record_json: str | os.PathLike,
    out_path: str | os.PathLike,
    plan_grid_out_path: str | os.PathLike,
    decision: dict,
    labels: tuple[int, ...] = KITS19_LABELS,
    qc_reference: dict | None = None,
) -> dict:
    """Apply a decision to both files of a raw prediction record (scan grid, plan grid); return the record's details.

    The plan-grid labels are post-processed with their own spacing (the sizes in ml are
    the same). The returned details (the plan grid, the raw record's uncertainty and kidney HU, and the
    QC columns of the post-processed scan-grid labels against ``qc_reference``,
    :func:`kidney_seg.quality.assess_labels`) go into the post-processed record.
    """
    raw = read_record(raw_record_json)
    kept, geometry = _postprocessed(case_id, raw["prediction"], out_path, decision, labels)
    postprocess_file(case_id, raw["plan_grid_prediction"], plan_grid_out_path, decision, labels)
    summary = {k: math.nan if raw.get(k) is None else raw[k] for k in SUMMARY_COLUMNS}
    qc = assess_labels(kept, geometry.spacing, summary, qc_reference)
    return {"plan_grid": raw["plan_grid"], **qc}
