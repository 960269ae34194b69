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
from kidney_seg.volume import save_nifti

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


# ------------------------------------------------------------------ distance metrics

ANISO = (3.0, 0.78, 0.78)
FACE_STEPS = [(a, s) for a in range(3) for s in (-1, 1)]


def _brute_border(mask: np.ndarray) -> np.ndarray:
    """Border by explicit neighbour checks: a mask voxel with a face neighbour outside the mask or the array."""
    border = np.zeros_like(mask, dtype=bool)
    for idx in np.argwhere(mask):
        for axis, step in FACE_STEPS:
            n = idx.copy()
            n[axis] += step
            if not 0 <= n[axis] < mask.shape[axis] or not mask[tuple(n)]:
                border[tuple(idx)] = True
                break
    return border


def _brute_distances(pred, truth, spacing):
    """Directed border-to-border distances from physical coordinates (index * spacing) and cdist."""
    cp = np.argwhere(_brute_border(pred)) * np.asarray(spacing)
    ct = np.argwhere(_brute_border(truth)) * np.asarray(spacing)
    d = distance.cdist(cp, ct)
    return d.min(axis=1), d.min(axis=0)


def _brute_hd95(pred, truth, spacing) -> float:
    d_pt, d_tp = _brute_distances(pred, truth, spacing)
    return max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))


def _brute_surface_dice(pred, truth, spacing, tol) -> float:
    d_pt, d_tp = _brute_distances(pred, truth, spacing)
    return (np.sum(d_pt <= tol) + np.sum(d_tp <= tol)) / (d_pt.size + d_tp.size)


def _blob(rng, shape, fraction) -> np.ndarray:
    """A random smooth blob (thresholded smoothed noise) occupying about ``fraction`` of the array."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.random(shape), sigma=1.5)
    return field > np.quantile(field, 1 - fraction)


def _blob_pairs():
    rng = np.random.default_rng(1234)
    pairs = []
    for _ in range(4):  # interior blobs of random size
        pred, truth = np.zeros((9, 14, 15), bool), np.zeros((9, 14, 15), bool)
        pred[1:-1, 2:-2, 2:-2] = _blob(rng, (7, 10, 11), 0.3)
        truth[1:-1, 2:-2, 2:-2] = _blob(rng, (7, 10, 11), 0.35)
        pairs.append((pred, truth))
    for _ in range(3):  # blobs that reach every face of the array
        pairs.append((_blob(rng, (8, 12, 13), 0.4), _blob(rng, (8, 12, 13), 0.5)))
    edge = np.zeros((6, 10, 10), bool)
    edge[0:3, :, 0:4] = True  # a slab on three array faces
    other = np.zeros_like(edge)
    other[1:6, 3:10, 0:2] = True
    pairs.append((edge, other))
    return pairs


def test_brute_border_helper_sees_the_array_edge():
    mask = np.ones((3, 3, 3), bool)
    border = _brute_border(mask)
    assert border.sum() == 26 and not border[1, 1, 1]


@pytest.mark.parametrize("k", range(len(_blob_pairs())))
def test_distance_metrics_match_brute_force(k):
    pred, truth = _blob_pairs()[k]
    assert pred.any() and truth.any()
    d_pt, d_tp = ev.surface_distances(pred, truth, ANISO)
    ref_pt, ref_tp = _brute_distances(pred, truth, ANISO)
    np.testing.assert_allclose(d_pt, ref_pt, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_tp, ref_tp, rtol=1e-12, atol=1e-12)
    assert ev.hd95(pred, truth, ANISO) == pytest.approx(_brute_hd95(pred, truth, ANISO), rel=1e-12)
    for tol in (0.5, 1.0331, 1.1498, 2.0, 3.5):
        assert ev.surface_dice(pred, truth, ANISO, tol) == pytest.approx(_brute_surface_dice(pred, truth, ANISO, tol))


def test_two_voxels_along_the_slice_axis():
    pred, truth = np.zeros((6, 4, 4), bool), np.zeros((6, 4, 4), bool)
    pred[1, 2, 2] = True
    truth[4, 2, 2] = True  # 3 slices apart: 9 mm at 3 mm slice spacing
    d_pt, d_tp = ev.surface_distances(pred, truth, ANISO)
    assert d_pt.tolist() == [9.0] and d_tp.tolist() == [9.0]
    assert ev.hd95(pred, truth, ANISO) == 9.0
    assert ev.surface_dice(pred, truth, ANISO, 8.99) == 0.0
    assert ev.surface_dice(pred, truth, ANISO, 9.0) == 1.0  # "within" includes the tolerance itself
    assert ev.hd95(pred, truth, (0.5, 0.78, 0.78)) == pytest.approx(1.5)


def test_cube_shifted_one_slice_hand_computed():
    truth = np.zeros((8, 7, 7), bool)
    truth[2:5, 2:5, 2:5] = True  # 3x3x3 cube: 26 border voxels (all but the centre)
    pred = np.roll(truth, 1, axis=0)  # slices 3..5
    spacing = (2.5, 0.8, 0.8)
    d_pt, d_tp = ev.surface_distances(pred, truth, spacing)
    # pred: 8 ring voxels of slice 3 and 8 of slice 4 lie on the truth border (0 mm); the centre of
    # slice 3 is the truth's centre, 0.8 mm in-plane from the truth ring; the 9 voxels of slice 5 are
    # one slice (2.5 mm) above the truth's top face. Symmetric for truth -> pred.
    expected = sorted([0.0] * 16 + [0.8] + [2.5] * 9)
    np.testing.assert_allclose(np.sort(d_pt), expected)
    np.testing.assert_allclose(np.sort(d_tp), expected)
    assert ev.hd95(pred, truth, spacing) == pytest.approx(2.5)
    assert ev.surface_dice(pred, truth, spacing, 0.79) == pytest.approx(32 / 52)
    assert ev.surface_dice(pred, truth, spacing, 0.81) == pytest.approx(34 / 52)
    assert ev.surface_dice(pred, truth, spacing, 2.49) == pytest.approx(34 / 52)
    assert ev.surface_dice(pred, truth, spacing, 2.51) == 1.0
    assert ev.dice(pred, truth) == pytest.approx(2 * 18 / 54)


def test_hd95_is_per_direction_then_max_not_pooled():
    truth = np.zeros((14, 3, 3), bool)
    truth[1, 1, 1] = True
    pred = truth.copy()
    pred[11, 1, 1] = True  # an outlier 10 slices (30 mm) away
    d_pt, d_tp = ev.surface_distances(pred, truth, ANISO)
    assert sorted(d_pt.tolist()) == [0.0, 30.0] and d_tp.tolist() == [0.0]
    # per direction: percentile95([0, 30]) = 28.5, percentile95([0]) = 0 -> 28.5
    assert ev.hd95(pred, truth, ANISO) == pytest.approx(28.5)
    # medpy's pooled convention would give percentile95([0, 30, 0]) = 27.0
    assert np.percentile(np.concatenate([d_pt, d_tp]), 95) == pytest.approx(27.0)
    assert ev.hd95(truth, pred, ANISO) == pytest.approx(28.5)  # symmetric


def test_hd95_percentile_is_linear_interpolation():
    truth = np.zeros((3, 3, 25), bool)
    truth[1, 1, 0:21] = True  # a line: every voxel is a border voxel
    pred = truth.copy()
    pred[1, 1, 21] = True  # one extra voxel at the end, 1 voxel (0.78 mm) from the truth
    d_pt, _ = ev.surface_distances(pred, truth, ANISO)
    assert d_pt.size == 22 and np.count_nonzero(d_pt) == 1
    # 22 values, 21 zeros and 0.78: position 0.95 * 21 = 19.95 -> still 0 by linear interpolation
    assert ev.hd95(pred, truth, ANISO) == 0.0
    pred[1, 1, 22] = True  # now 23 values, 21 zeros, 0.78, 1.56: position 20.9 -> 0.9 * 0.78
    assert ev.hd95(pred, truth, ANISO) == pytest.approx(0.9 * 0.78)


def _uncropped_distances(pred, truth, spacing):
    """Reference without any cropping: the documented formula on the whole arrays."""
    from scipy import ndimage

    face = ndimage.generate_binary_structure(3, 1)
    bp = pred ^ ndimage.binary_erosion(pred, structure=face, border_value=0)
    bt = truth ^ ndimage.binary_erosion(truth, structure=face, border_value=0)
    return (
        ndimage.distance_transform_edt(~bt, sampling=spacing)[bp],
        ndimage.distance_transform_edt(~bp, sampling=spacing)[bt],
    )


@pytest.mark.parametrize("k", range(len(_blob_pairs())))
def test_cropping_gives_exactly_the_uncropped_result(k):
    small_pred, small_truth = _blob_pairs()[k]
    for offset in ((0, 0, 0), (5, 3, 7)):  # touching the array edge, and deep inside a larger array
        pred, truth = np.zeros((20, 22, 26), bool), np.zeros((20, 22, 26), bool)
        box = tuple(slice(o, o + n) for o, n in zip(offset, small_pred.shape))
        pred[box], truth[box] = small_pred, small_truth
        d_pt, d_tp = ev.surface_distances(pred, truth, ANISO)
        ref_pt, ref_tp = _uncropped_distances(pred, truth, ANISO)
        assert np.array_equal(d_pt, ref_pt) and np.array_equal(d_tp, ref_tp)


def test_case_metrics_unchanged_by_zero_padding_the_volumes():
    rng = np.random.default_rng(7)
    truth = np.zeros((8, 12, 13), np.uint8)
    truth[_blob(rng, truth.shape, 0.4)] = 1
    truth[_blob(rng, truth.shape, 0.1)] = 2
    pred = np.zeros_like(truth)
    pred[_blob(rng, truth.shape, 0.4)] = 1
    pred[_blob(rng, truth.shape, 0.12)] = 2
    small = ev.case_metrics(pred, truth, ANISO)
    big_pred, big_truth = np.zeros((15, 20, 21), np.uint8), np.zeros((15, 20, 21), np.uint8)
    big_pred[3:11, 4:16, 5:18], big_truth[3:11, 4:16, 5:18] = pred, truth
    assert ev.case_metrics(big_pred, big_truth, ANISO) == small
    # Fortran-ordered input (as nibabel gives) scores the same
    assert ev.case_metrics(np.asfortranarray(big_pred), big_truth, ANISO) == small


def test_distance_metrics_empty_conventions():
    empty = np.zeros((4, 5, 6), bool)
    some = empty.copy()
    some[1:3, 2:4, 2:5] = True
    d_pt, d_tp = ev.surface_distances(empty, empty, ANISO)
    assert d_pt.size == 0 and d_tp.size == 0
    assert ev.hd95(empty, empty, ANISO) == 0.0
    assert ev.surface_dice(empty, empty, ANISO, 1.0) == 1.0
    for pred, truth in ((empty, some), (some, empty)):
        assert math.isnan(ev.hd95(pred, truth, ANISO))
        assert ev.surface_dice(pred, truth, ANISO, 1000.0) == 0.0
    d_pt, d_tp = ev.surface_distances(some, empty, ANISO)
    assert d_pt.size == 12 and np.isinf(d_pt).all() and d_tp.size == 0


def test_distance_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="shape"):
        ev.hd95(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool), ANISO)
    with pytest.raises(ValueError, match="spacing"):
        ev.surface_dice(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="spacing"):
        ev.hd95(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1.0, 0.0, 1.0))


def test_surface_tolerances_are_kits23():
    assert ev.SURFACE_TOLERANCE_MM == {"tk": 1.0331, "masses": 1.1329, "tu": 1.1498}


def test_case_metrics_distance_columns_and_per_region_tolerance():
    truth = np.zeros((8, 7, 7), np.uint8)
    truth[2:5, 2:5, 2:5] = 2  # a tumour-only cube, so tk, tu and masses are the same masks
    pred = np.roll(truth, 1, axis=0)
    spacing = (1.1, 0.5, 0.5)  # one slice = 1.1 mm: above the tk tolerance, below tu's and masses'
    m = ev.case_metrics(pred, truth, spacing, labels=(0, 1, 2, 3))
    assert m["tk_hd95"] == pytest.approx(1.1) and m["tu_hd95"] == pytest.approx(1.1)
    assert m["masses_hd95"] == pytest.approx(1.1)
    assert m["tk_surface_dice"] == pytest.approx(34 / 52)  # the 2 x 9 voxels 1.1 mm away miss 1.0331
    assert m["tu_surface_dice"] == 1.0 and m["masses_surface_dice"] == 1.0
    cols = list(ev.METRIC_COLUMNS)
    assert cols.index("tumor_recall") < cols.index("tk_hd95") < cols.index("tu_hd95") < cols.index("tk_surface_dice")
    assert cols.index("tu_surface_dice") < cols.index("pred_kidney_ml")
    assert list(ev.CYST_COLUMNS[:3]) == ["masses_dice", "masses_hd95", "masses_surface_dice"]


def test_case_metrics_tumour_free_case_distance_conventions():
    truth = np.zeros((6, 6, 6), np.uint8)
    truth[1:5, 1:5, 1:5] = 1
    m = ev.case_metrics(truth, truth, ANISO)
    assert m["tu_hd95"] == 0.0 and m["tu_surface_dice"] == 1.0  # both empty
    assert m["tk_hd95"] == 0.0 and m["tk_surface_dice"] == 1.0
    pred = truth.copy()
    pred[2, 2, 2] = 2  # a false-positive tumour
    m = ev.case_metrics(pred, truth, ANISO)
    assert math.isnan(m["tu_hd95"]) and m["tu_surface_dice"] == 0.0 and m["has_tumor"] is False
    assert set(m) == set(ev.METRIC_COLUMNS)


def test_summary_skips_nan_hd95_of_tumour_free_case(tmp_path):
    truth = np.zeros((8, 7, 7), np.uint8)
    truth[1:7, 1:6, 1:6] = 1
    truth[2:4, 2:4, 2:4] = 2
    shifted = truth.copy()
    shifted[2:4, 2:4, 2:4] = 1
    shifted[3:5, 2:4, 2:4] = 2  # tumour one slice (3 mm) too deep
    tumour_free = np.where(truth == 2, 1, truth).astype(np.uint8)
    fp = tumour_free.copy()
    fp[5, 3, 3] = 2  # false-positive tumour in a tumour-free case -> tu_hd95 NaN
    cases = {
        "case_00000": ev.case_metrics(truth, truth, ANISO),
        "case_00001": ev.case_metrics(shifted, truth, ANISO),
        "case_00002": ev.case_metrics(fp, tumour_free, ANISO),
    }
    assert math.isnan(cases["case_00002"]["tu_hd95"])
    paths = _write_cases(tmp_path, [{"case_id": k, **v} for k, v in cases.items()])
    summary = ev.summarize(paths, tmp_path / "p.csv", tmp_path / "s.csv")
    rows = summary.set_index("metric")
    finite = [cases["case_00000"]["tu_hd95"], cases["case_00001"]["tu_hd95"]]
    assert finite[0] == 0.0 and finite[1] > 0
    assert rows.loc["tu_hd95", "n"] == 2
    assert rows.loc["tu_hd95", "mean"] == pytest.approx(np.mean(finite))
    assert rows.loc["tu_hd95", "max"] == pytest.approx(finite[1])
    assert rows.loc["tk_hd95", "n"] == 3 and rows.loc["tu_surface_dice", "n"] == 3
    assert rows.loc["tu_surface_dice", "mean"] == pytest.approx(
        np.mean([1.0, cases["case_00001"]["tu_surface_dice"], 0.0])
    )
    assert not summary[["mean", "median", "std", "min", "max"]].isna().any().any()
    per_case = pd.read_csv(tmp_path / "p.csv")
    assert list(per_case.columns) == ["case_id", *ev.METRIC_COLUMNS]
    assert math.isnan(per_case.loc[2, "tu_hd95"])
    assert "kits23_composite" not in rows.index  # 3-class data


def _four_class_pair():
    truth = np.zeros((8, 10, 10), np.uint8)
    truth[1:7, 1:9, 1:5] = 1
    truth[2:5, 2:5, 2:4] = 2
    truth[2:4, 5:8, 2:4] = 3
    pred = truth.copy()
    pred[truth == 3] = 2  # cyst called tumour: masses region unchanged
    pred[6, 1:9, 1:5] = 0  # last kidney slice missed
    return pred, truth


def test_four_class_masses_distance_metrics():
    pred, truth = _four_class_pair()
    labels = (0, 1, 2, 3)
    m = ev.case_metrics(pred, truth, ANISO, labels=labels)
    masses_p, masses_t = np.isin(pred, (2, 3)), np.isin(truth, (2, 3))
    assert m["masses_hd95"] == 0.0 and m["masses_surface_dice"] == 1.0  # masses region is perfect
    assert m["tu_hd95"] == pytest.approx(_brute_hd95(pred == 2, truth == 2, ANISO))
    assert m["tu_surface_dice"] == pytest.approx(_brute_surface_dice(pred == 2, truth == 2, ANISO, 1.1498))
    assert m["tk_hd95"] == pytest.approx(_brute_hd95(pred > 0, truth > 0, ANISO))
    assert m["tk_surface_dice"] == pytest.approx(_brute_surface_dice(pred > 0, truth > 0, ANISO, 1.0331))
    shifted = pred.copy()
    shifted[np.isin(pred, (2, 3))] = 1
    shifted[np.roll(masses_p, 1, axis=2)] = 3  # masses moved by one in-plane voxel (0.78 mm)
    m2 = ev.case_metrics(shifted, truth, ANISO, labels=labels)
    assert m2["masses_hd95"] == pytest.approx(_brute_hd95(np.isin(shifted, (2, 3)), masses_t, ANISO))
    assert m2["masses_surface_dice"] == pytest.approx(
        _brute_surface_dice(np.isin(shifted, (2, 3)), masses_t, ANISO, 1.1329)
    )
    assert 0 < m2["masses_hd95"] and m2["masses_surface_dice"] == 1.0  # 0.78 mm is within 1.1329 mm
    assert math.isnan(m2["tu_hd95"])  # no tumour label predicted at all
    assert "masses_hd95" not in ev.case_metrics(pred, truth, ANISO)


def test_kits23_composite_row(tmp_path):
    pred, truth = _four_class_pair()
    labels = (0, 1, 2, 3)
    records = [
        {"case_id": "case_00001", **ev.case_metrics(pred, truth, ANISO, labels=labels)},
        {"case_id": "case_00002", **ev.case_metrics(truth, truth, ANISO, labels=labels)},
    ]
    summary = ev.summarize(_write_cases(tmp_path, records), tmp_path / "p.csv", tmp_path / "s.csv")
    rows = summary.set_index("metric")
    six = ["tk_dice", "tk_surface_dice", "masses_dice", "masses_surface_dice", "tu_dice", "tu_surface_dice"]
    expected = np.mean([np.mean([r[m] for r in records]) for m in six])
    assert expected < 1.0
    assert rows.loc["kits23_composite", "mean"] == pytest.approx(expected)
    assert rows.loc["kits23_composite", "n"] == 2 and rows.loc["kits23_composite", "std"] == 0.0
    assert summary["metric"].tolist()[-3:] == ["tu_dice_with_tumor", "kits_composite", "kits23_composite"]
    assert {"masses_hd95", "masses_surface_dice"} <= set(rows.index)
    per_case = pd.read_csv(tmp_path / "p.csv")
    assert list(per_case.columns) == ["case_id", *ev.METRIC_COLUMNS, *ev.CYST_COLUMNS]


def test_hd95_matches_medpy():
    """Cross-check against medpy (in the test extra, so this never skips)."""
    from medpy.metric import binary

    directed = getattr(binary, "__surface_distances")
    for pred, truth in _blob_pairs():
        ours_pt, ours_tp = ev.surface_distances(pred, truth, ANISO)
        np.testing.assert_allclose(np.sort(ours_pt), np.sort(directed(pred, truth, ANISO, 1)))
        np.testing.assert_allclose(np.sort(ours_tp), np.sort(directed(truth, pred, ANISO, 1)))
        # medpy's hd95 pools both directions; ours takes the max of the per-direction percentiles
        pooled = np.percentile(np.concatenate([ours_pt, ours_tp]), 95)
        assert binary.hd95(pred, truth, voxelspacing=ANISO) == pytest.approx(pooled)


def test_undefined_hd95_is_written_as_strict_json_null(tmp_path):
    truth = np.zeros((4, 10, 10), np.uint8)
    truth[1:3, 2:6, 2:6] = 1
    truth[2, 3:5, 3:5] = 2
    pred = truth.copy()
    pred[pred == 2] = 1  # tumour missed: tu_hd95 undefined
    pred_path, label_path = _write_pair(tmp_path, pred, truth)
    ev.evaluate_case("case_00001", pred_path, label_path, tmp_path / "m.json")
    record = json.loads(
        (tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")
    )
    assert record["tu_hd95"] is None and record["tu_dice"] == 0.0
    summary = ev.summarize([tmp_path / "m.json"], tmp_path / "pc.csv", tmp_path / "s.csv").set_index("metric")
    assert summary.loc["tu_hd95", "n"] == 0 and summary.loc["tk_hd95", "n"] == 1
