"""Tests for kidney_seg.evaluation: hand-computed metrics, conventions, I/O and summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import distance

from kidney_seg import evaluation as ev
from kidney_seg.errors import CaseDataError
from kidney_seg.io import save_nifti

KITS_AFFINE = np.array([[0, 0, -0.8, 0], [0, -0.8, 0, 0], [-3, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def _set_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice from sets of voxel index tuples (independent of the implementation)."""
    p = set(zip(*np.nonzero(pred)))
    t = set(zip(*np.nonzero(truth)))
    return 2 * len(p & t) / (len(p) + len(t))


# ------------------------------------------------------------------ binary metrics


def test_dice_precision_recall_1d_hand_computed():
    pred = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    truth = np.array([0, 1, 1, 1, 1, 0], dtype=bool)
    # |P| = 3, |T| = 4, |P & T| = 2
    assert ev.dice(pred, truth) == pytest.approx(4 / 7)
    assert ev.precision(pred, truth) == pytest.approx(2 / 3)
    assert ev.recall(pred, truth) == pytest.approx(2 / 4)


def test_dice_3d_hand_computed():
    truth = np.zeros((4, 4, 4), bool)
    truth[0:2, 0:2, 0:2] = True  # 8 voxels
    pred = np.zeros((4, 4, 4), bool)
    pred[1:3, 0:2, 0:2] = True  # 8 voxels, overlap is the slab x=1: 4 voxels
    assert ev.dice(pred, truth) == pytest.approx(2 * 4 / 16)
    assert ev.precision(pred, truth) == pytest.approx(0.5)
    assert ev.recall(pred, truth) == pytest.approx(0.5)


def test_perfect_and_disjoint():
    a = np.array([0, 1, 1, 0], bool)
    b = np.array([1, 0, 0, 1], bool)
    assert ev.dice(a, a) == 1.0 and ev.precision(a, a) == 1.0 and ev.recall(a, a) == 1.0
    assert ev.dice(a, b) == 0.0 and ev.precision(a, b) == 0.0 and ev.recall(a, b) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_dice_matches_independent_formulas(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((5, 6, 7)) < 0.3
    truth = rng.random((5, 6, 7)) < 0.4
    expected_scipy = 1.0 - distance.dice(pred.ravel(), truth.ravel())
    assert ev.dice(pred, truth) == pytest.approx(expected_scipy)
    assert ev.dice(pred, truth) == pytest.approx(_set_dice(pred, truth))


def test_empty_conventions():
    empty = np.zeros(5, bool)
    some = np.array([0, 1, 0, 0, 0], bool)
    # both empty -> 1
    assert ev.dice(empty, empty) == 1.0
    assert ev.precision(empty, empty) == 1.0
    assert ev.recall(empty, empty) == 1.0
    # exactly one empty -> 0 (Dice), empty denominator -> 0
    assert ev.dice(empty, some) == 0.0
    assert ev.dice(some, empty) == 0.0
    assert ev.precision(empty, some) == 0.0  # nothing predicted
    assert ev.recall(some, empty) == 0.0  # nothing to find
    # the non-degenerate side of a one-empty case
    assert ev.recall(empty, some) == 0.0
    assert ev.precision(some, empty) == 0.0


def test_mismatched_mask_shapes_raise():
    with pytest.raises(ValueError):
        ev.dice(np.zeros(3, bool), np.zeros(4, bool))


def test_metrics_accept_integer_masks_and_return_float():
    value = ev.dice(np.array([0, 2, 2]), np.array([0, 1, 0]))
    assert isinstance(value, float) and value == pytest.approx(2 * 1 / 3)


# ------------------------------------------------------------------ case metrics


def _toy_volumes() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((2, 3, 4), np.uint8)
    truth[0, 0, :] = 1  # 4 kidney voxels
    truth[1, 0, :2] = 2  # 2 tumour voxels
    pred = np.zeros_like(truth)
    pred[0, 0, :3] = 1  # 3 kidney voxels, all correct
    pred[1, 0, 0] = 2  # 1 tumour voxel, correct
    pred[1, 0, 1] = 1  # a true tumour voxel called kidney
    pred[1, 2, 3] = 2  # a false tumour voxel
    return pred, truth


def test_case_metrics_hand_computed_with_anisotropic_spacing():
    pred, truth = _toy_volumes()
    spacing = (3.0, 0.8, 0.5)  # 1.2 mm^3 = 0.0012 ml per voxel
    m = ev.case_metrics(pred, truth, spacing)
    # tk: pred>0 has 3+1+1+1 = 6 voxels, truth>0 6 voxels, overlap 3 (kidney) + 2 (tumour slots) = 5
    assert m["tk_dice"] == pytest.approx(2 * 5 / 12)
    # tu: pred==2 {(1,0,0),(1,2,3)}, truth==2 {(1,0,0),(1,0,1)} -> overlap 1
    assert m["tu_dice"] == pytest.approx(2 * 1 / 4)
    assert m["tumor_precision"] == pytest.approx(1 / 2)
    assert m["tumor_recall"] == pytest.approx(1 / 2)
    # kidney: pred==1 has 4 voxels (3 correct + 1 on tumour), truth==1 has 4 -> overlap 3
    assert m["kidney_dice"] == pytest.approx(2 * 3 / 8)
    assert m["kidney_precision"] == pytest.approx(3 / 4)
    assert m["kidney_recall"] == pytest.approx(3 / 4)
    assert m["pred_kidney_ml"] == pytest.approx(4 * 0.0012)
    assert m["true_kidney_ml"] == pytest.approx(4 * 0.0012)
    assert m["pred_tumor_ml"] == pytest.approx(2 * 0.0012)
    assert m["true_tumor_ml"] == pytest.approx(2 * 0.0012)
    assert m["has_tumor"] is True
    assert set(m) == set(ev.METRIC_COLUMNS)


def test_case_metrics_volume_in_ml_large_anisotropic():
    truth = np.zeros((10, 20, 30), np.uint8)
    truth[:, :, :] = 1  # 6000 voxels
    m = ev.case_metrics(truth, truth, (2.5, 0.7, 0.9))
    assert m["true_kidney_ml"] == pytest.approx(6000 * 2.5 * 0.7 * 0.9 / 1000)
    assert m["true_tumor_ml"] == 0.0
    assert m["has_tumor"] is False
    assert m["tu_dice"] == 1.0  # both empty
    assert m["tumor_precision"] == 1.0 and m["tumor_recall"] == 1.0


def test_case_metrics_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        ev.case_metrics(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), (1, 1, 1))


def test_case_metrics_missed_tumour_scores_zero():
    truth = np.zeros((3, 3, 3), np.uint8)
    truth[1, 1, 1] = 2
    pred = np.zeros_like(truth)
    m = ev.case_metrics(pred, truth, (1.0, 1.0, 1.0))
    assert m["tu_dice"] == 0.0 and m["tk_dice"] == 0.0 and m["tumor_recall"] == 0.0
    assert m["has_tumor"] is True


# ------------------------------------------------------------------ evaluate_case


def _write_pair(tmp_path, pred, truth, pred_affine=KITS_AFFINE):
    pred_path = tmp_path / "pred.nii.gz"
    label_path = tmp_path / "segmentation.nii.gz"
    save_nifti(pred_path, pred, pred_affine, dtype=np.uint8)
    save_nifti(label_path, truth, KITS_AFFINE, dtype=np.uint8)
    return pred_path, label_path


def test_evaluate_case_round_trip(tmp_path):
    pred, truth = _toy_volumes()
    pred_path, label_path = _write_pair(tmp_path, pred, truth)
    out = tmp_path / "metrics" / "case_00007.json"
    result = ev.evaluate_case("case_00007", pred_path, label_path, out)
    # file layout spacing from the affine is (3, 0.8, 0.8): 1.92 mm^3 per voxel
    expected = ev.case_metrics(pred, truth, (3.0, 0.8, 0.8))
    assert result["case_id"] == "case_00007"
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    assert result["true_kidney_ml"] == pytest.approx(4 * 1.92 / 1000)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_evaluate_case_shape_mismatch_names_case_and_file(tmp_path):
    truth = np.zeros((2, 3, 4), np.uint8)
    pred = np.zeros((2, 3, 5), np.uint8)
    pred_path, label_path = _write_pair(tmp_path, pred, truth)
    with pytest.raises(CaseDataError) as info:
        ev.evaluate_case("case_00042", pred_path, label_path, tmp_path / "m.json")
    assert "case_00042" in str(info.value) and "pred.nii.gz" in str(info.value)
    assert not (tmp_path / "m.json").exists()


def test_evaluate_case_affine_mismatch_raises(tmp_path):
    truth = np.zeros((2, 3, 4), np.uint8)
    shifted = KITS_AFFINE.copy()
    shifted[0, 3] = 25.0
    pred_path, label_path = _write_pair(tmp_path, truth, truth, pred_affine=shifted)
    with pytest.raises(CaseDataError) as info:
        ev.evaluate_case("case_00043", pred_path, label_path, tmp_path / "m.json")
    assert "case_00043" in str(info.value) and "pred.nii.gz" in str(info.value)
    assert "affine" in str(info.value)


@pytest.mark.parametrize("which", ["pred", "label"])
def test_evaluate_case_bad_label_value_raises(tmp_path, which):
    good = np.zeros((2, 3, 4), np.uint8)
    bad = good.copy()
    bad[0, 0, 0] = 3
    pred, truth = (bad, good) if which == "pred" else (good, bad)
    pred_path, label_path = _write_pair(tmp_path, pred, truth)
    with pytest.raises(CaseDataError) as info:
        ev.evaluate_case("case_00044", pred_path, label_path, tmp_path / "m.json")
    name = "pred.nii.gz" if which == "pred" else "segmentation.nii.gz"
    assert "case_00044" in str(info.value) and name in str(info.value)
    assert "3" in str(info.value)


def test_evaluate_case_missing_prediction(tmp_path):
    truth = np.zeros((2, 3, 4), np.uint8)
    label_path = tmp_path / "segmentation.nii.gz"
    save_nifti(label_path, truth, KITS_AFFINE, dtype=np.uint8)
    with pytest.raises(CaseDataError, match="case_00045"):
        ev.evaluate_case("case_00045", tmp_path / "nope.nii.gz", label_path, tmp_path / "m.json")


# ------------------------------------------------------------------ summarize


def _metrics(case_id: str, tk: float, tu: float, has_tumor: bool, **extra) -> dict:
    base = {k: 0.5 for k in ev.NUMERIC_METRICS}
    base.update(case_id=case_id, tk_dice=tk, tu_dice=tu, has_tumor=has_tumor, **extra)
    return base


def _write_cases(tmp_path, records):
    paths = []
    for rec in records:
        p = tmp_path / "cases" / f"{rec['case_id']}.json"
        p.parent.mkdir(exist_ok=True)
        p.write_text(json.dumps(rec))  # json.dumps writes NaN as NaN
        paths.append(p)
    return paths


def test_summarize_columns_and_aggregates(tmp_path):
    records = [
        _metrics("case_00003", 0.9, 0.0, True),
        _metrics("case_00001", 0.8, 1.0, False),  # no tumour, none predicted -> 1 by convention
        _metrics("case_00002", 1.0, 0.5, True, kidney_precision=float("nan")),
    ]
    paths = _write_cases(tmp_path, records)
    per_case_csv, summary_csv = tmp_path / "out" / "per_case.csv", tmp_path / "out" / "summary.csv"
    summary = ev.summarize(paths, per_case_csv, summary_csv)

    per_case = pd.read_csv(per_case_csv)
    assert list(per_case.columns) == ["case_id", *ev.METRIC_COLUMNS]
    assert per_case["case_id"].tolist() == ["case_00001", "case_00002", "case_00003"]
    assert per_case["has_tumor"].tolist() == [False, True, True]

    on_disk = pd.read_csv(summary_csv)
    assert list(on_disk.columns) == ["metric", "n", "mean", "median", "std", "min", "max"]
    assert list(summary.columns) == list(on_disk.columns)
    assert on_disk["metric"].tolist() == [*ev.NUMERIC_METRICS, "tu_dice_with_tumor", "kits_composite"]
    rows = on_disk.set_index("metric")

    assert rows.loc["tk_dice", "n"] == 3
    assert rows.loc["tk_dice", "mean"] == pytest.approx(0.9)
    assert rows.loc["tk_dice", "median"] == pytest.approx(0.9)
    assert rows.loc["tk_dice", "std"] == pytest.approx(np.std([0.9, 0.8, 1.0]))
    assert rows.loc["tk_dice", "min"] == pytest.approx(0.8)
    assert rows.loc["tk_dice", "max"] == pytest.approx(1.0)

    # NaN-aware: the NaN is skipped and not counted
    assert rows.loc["kidney_precision", "n"] == 2
    assert rows.loc["kidney_precision", "mean"] == pytest.approx(0.5)
    assert not on_disk[["mean", "median", "std", "min", "max"]].isna().any().any()

    assert rows.loc["tu_dice", "mean"] == pytest.approx(0.5)
    assert rows.loc["tu_dice_with_tumor", "n"] == 2
    assert rows.loc["tu_dice_with_tumor", "mean"] == pytest.approx(0.25)

    assert rows.loc["kits_composite", "n"] == 3
    assert rows.loc["kits_composite", "mean"] == pytest.approx((0.9 + 0.5) / 2)
    assert "has_tumor" not in rows.index


def test_summarize_all_nan_metric_and_no_tumour_cases(tmp_path):
    records = [
        _metrics("case_00001", 0.7, 1.0, False, tumor_precision=float("nan")),
        _metrics("case_00000", float("nan"), 1.0, False, tumor_precision=float("nan")),
    ]
    summary = ev.summarize(_write_cases(tmp_path, records), tmp_path / "p.csv", tmp_path / "s.csv")
    rows = summary.set_index("metric")
    assert rows.loc["tk_dice", "n"] == 1 and rows.loc["tk_dice", "mean"] == pytest.approx(0.7)
    assert rows.loc["tumor_precision", "n"] == 0 and math.isnan(rows.loc["tumor_precision", "mean"])
    assert rows.loc["tu_dice_with_tumor", "n"] == 0
    assert rows.loc["kits_composite", "mean"] == pytest.approx((0.7 + 1.0) / 2)
    assert rows.loc["kits_composite", "n"] == 2


def test_summarize_round_trips_evaluate_case_output(tmp_path):
    pred, truth = _toy_volumes()
    pred_path, label_path = _write_pair(tmp_path, pred, truth)
    a = ev.evaluate_case("case_00001", pred_path, label_path, tmp_path / "a.json")
    ev.evaluate_case("case_00000", label_path, label_path, tmp_path / "b.json")
    summary = ev.summarize([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "p.csv", tmp_path / "s.csv")
    rows = summary.set_index("metric")
    assert rows.loc["tk_dice", "mean"] == pytest.approx((a["tk_dice"] + 1.0) / 2)
    assert rows.loc["tu_dice_with_tumor", "n"] == 2


def test_summarize_zero_cases_raises(tmp_path):
    with pytest.raises(ValueError, match="zero cases"):
        ev.summarize([], tmp_path / "p.csv", tmp_path / "s.csv")
    assert not (tmp_path / "p.csv").exists()


def test_summarize_duplicate_case_ids_raise(tmp_path):
    rec = _metrics("case_00001", 0.5, 0.5, True)
    p1 = tmp_path / "x.json"
    p2 = tmp_path / "y.json"
    p1.write_text(json.dumps(rec))
    p2.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="duplicate"):
        ev.summarize([p1, p2], tmp_path / "p.csv", tmp_path / "s.csv")


def test_kits23_regions_with_cysts():
    from kidney_seg.evaluation import case_metrics, summary_table

    truth = np.zeros((1, 4, 4), np.uint8)
    truth[0, 0, :] = 1
    truth[0, 1, :2] = 2
    truth[0, 1, 2:] = 3
    pred = truth.copy()
    pred[0, 1, 2:] = 2  # cyst called tumour: masses region still perfect
    m = case_metrics(pred, truth, (1.0, 1.0, 1.0), labels=(0, 1, 2, 3))
    assert m["masses_dice"] == 1.0 and m["tk_dice"] == 1.0
    assert m["tu_dice"] == pytest.approx(2 * 2 / (4 + 2))
    assert m["true_cyst_ml"] == pytest.approx(0.002) and m["pred_cyst_ml"] == 0.0
    assert "masses_dice" not in case_metrics(pred, truth, (1.0, 1.0, 1.0), labels=(0, 1, 2, 3, 4)[:3])
    df = pd.DataFrame([{"case_id": "case_00000", **m}])
    assert "masses_dice" in summary_table(df)["metric"].tolist()
