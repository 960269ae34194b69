"""Tests for kidney_seg.evaluation: hand-computed metrics, conventions, I/O and summaries."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import distance
from surface_distance import metrics as sd

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
    assert list(m) == list(ev.case_columns("kits19"))
    assert not (m["tk_missed"] or m["tu_missed"] or m["tk_false_positive"] or m["tu_false_positive"])


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
    assert m["tu_missed"] and m["tk_missed"] and not m["tu_false_positive"]
    assert math.isnan(m["tu_hd95"])
    assert m["tu_penalised_hd95"] == pytest.approx(math.sqrt(27))  # the diagonal of the 3 x 3 x 3 mm scan


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
    assert list(per_case.columns) == ["case_id", *ev.METRIC_COLUMNS]  # records without miss columns get none
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
    m = case_metrics(pred, truth, (1.0, 1.0, 1.0), source="kits23")
    assert m["masses_dice"] == 1.0 and m["tk_dice"] == 1.0
    assert m["tu_dice"] == pytest.approx(2 * 2 / (4 + 2))
    assert m["true_cyst_ml"] == pytest.approx(0.002) and m["pred_cyst_ml"] == 0.0
    assert list(m) == list(ev.case_columns("kits23"))
    assert "masses_dice" not in case_metrics(np.minimum(pred, 2), np.minimum(truth, 2), (1.0, 1.0, 1.0))
    df = pd.DataFrame([{"case_id": "case_00000", **m}])
    assert "masses_dice" in summary_table(df)["metric"].tolist()


# ------------------------------------------------------------------ distance metrics (DeepMind surface-distance)

ANISO = (3.0, 0.78, 0.78)
KITS23_TOLERANCES = {"tk": 1.0330772532390826, "masses": 1.1328796488598762, "tu": 1.1498198361434828}
pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")  # surface-distance's scipy calls


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


def _area_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """Independently: the least distance whose surfels and all nearer ones hold ``percent`` % of the area."""
    order = np.argsort(distances, kind="stable")
    held = np.cumsum(areas[order]) / areas.sum()
    return float(distances[order][np.argmax(held >= percent / 100.0)])


def _area_surface_dice(d: dict, tol: float) -> float:
    """Independent re-derivation: surfel area within ``tol`` of the other surface, both ways, over all surfel area."""
    near = d["surfel_areas_gt"][d["distances_gt_to_pred"] <= tol].sum()
    near += d["surfel_areas_pred"][d["distances_pred_to_gt"] <= tol].sum()
    return float(near / (d["surfel_areas_gt"].sum() + d["surfel_areas_pred"].sum()))


@pytest.mark.parametrize("k", range(len(_blob_pairs())))
def test_distance_metrics_are_surface_distance_and_its_area_weighting(k):
    pred, truth = _blob_pairs()[k]
    assert pred.any() and truth.any()
    d = ev.surface_distances(pred, truth, ANISO)
    direct = sd.compute_surface_distances(truth, pred, ANISO)  # gt first, as the KiTS scorer calls it
    for key in direct:
        assert np.array_equal(d[key], direct[key]), key
    per_direction = [
        _area_percentile(d["distances_gt_to_pred"], d["surfel_areas_gt"], 95),
        _area_percentile(d["distances_pred_to_gt"], d["surfel_areas_pred"], 95),
    ]
    assert ev.hd95(pred, truth, ANISO) == sd.compute_robust_hausdorff(direct, 95) == max(per_direction)
    assert ev.hd95(truth, pred, ANISO) == ev.hd95(pred, truth, ANISO)  # symmetric
    for tol in (0.5, *KITS23_TOLERANCES.values(), 2.0, 3.5):
        ours = ev.surface_dice(pred, truth, ANISO, tol)
        assert ours == sd.compute_surface_dice_at_tolerance(direct, tol)
        assert ours == pytest.approx(_area_surface_dice(d, tol), abs=1e-12)


def test_two_voxels_along_the_slice_axis_hand_computed():
    """Surfels sit on voxel corners: of each voxel's 8 corners (equal areas) 4 lie 2 slices and 4 lie 3 slices away."""
    pred, truth = np.zeros((6, 4, 4), bool), np.zeros((6, 4, 4), bool)
    pred[1, 2, 2] = True
    truth[4, 2, 2] = True  # 3 slices apart: centres 9 mm apart at 3 mm slice spacing
    d = ev.surface_distances(pred, truth, ANISO)
    assert sorted(d["distances_pred_to_gt"].tolist()) == [6.0] * 4 + [9.0] * 4
    assert sorted(d["distances_gt_to_pred"].tolist()) == [6.0] * 4 + [9.0] * 4
    assert np.allclose(d["surfel_areas_gt"], d["surfel_areas_gt"][0])
    assert ev.hd95(pred, truth, ANISO) == 9.0
    assert ev.surface_dice(pred, truth, ANISO, 5.99) == 0.0
    assert ev.surface_dice(pred, truth, ANISO, 6.0) == pytest.approx(0.5)  # "within" includes the tolerance itself
    assert ev.surface_dice(pred, truth, ANISO, 9.0) == 1.0
    assert ev.hd95(pred, truth, (0.5, 0.78, 0.78)) == pytest.approx(1.5)


def test_hd95_is_per_direction_then_max_not_pooled():
    truth = np.zeros((16, 6, 6), bool)
    truth[1, 1:5, 1:5] = True  # a one-slice sheet of 4 x 4 voxels
    pred = truth.copy()
    pred[13, 2, 2] = True  # an outlier voxel 11-12 slices (33-36 mm) from the truth: 7 % of the predicted area
    d = ev.surface_distances(pred, truth, ANISO)
    gt_to_pred = _area_percentile(d["distances_gt_to_pred"], d["surfel_areas_gt"], 95)
    pred_to_gt = _area_percentile(d["distances_pred_to_gt"], d["surfel_areas_pred"], 95)
    pooled = _area_percentile(
        np.concatenate([d["distances_gt_to_pred"], d["distances_pred_to_gt"]]),
        np.concatenate([d["surfel_areas_gt"], d["surfel_areas_pred"]]),
        95,
    )
    assert gt_to_pred == 0.0 and pred_to_gt >= 33.0  # the outlier holds over 5 % of the predicted surface
    assert pooled < 33.0  # but under 5 % of both surfaces together
    assert ev.hd95(pred, truth, ANISO) == pred_to_gt


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
    assert not math.isnan(small["tu_hd95"])  # no penalty (which is the scan's diagonal) in play
    assert ev.case_metrics(big_pred, big_truth, ANISO) == small
    # Fortran-ordered input (as nibabel gives) scores the same
    assert ev.case_metrics(np.asfortranarray(big_pred), big_truth, ANISO) == small


def test_distance_metrics_empty_conventions():
    empty = np.zeros((4, 5, 6), bool)
    some = empty.copy()
    some[1:3, 2:4, 2:5] = True
    d = ev.surface_distances(empty, empty, ANISO)
    assert all(v.size == 0 for v in d.values())
    assert ev.hd95(empty, empty, ANISO) == 0.0
    assert ev.surface_dice(empty, empty, ANISO, 1.0) == 1.0
    for pred, truth in ((empty, some), (some, empty)):
        assert math.isnan(ev.hd95(pred, truth, ANISO))
        assert ev.surface_dice(pred, truth, ANISO, 1000.0) == 0.0
    d = ev.surface_distances(some, empty, ANISO)
    own = sd.compute_surface_distances(some, some, ANISO)["surfel_areas_gt"]
    assert np.isinf(d["distances_pred_to_gt"]).all() and np.array_equal(d["surfel_areas_pred"], own)
    assert d["distances_gt_to_pred"].size == 0 and d["surfel_areas_gt"].size == 0


def test_distance_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="shape"):
        ev.hd95(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool), ANISO)
    with pytest.raises(ValueError, match="spacing"):
        ev.surface_dice(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="spacing"):
        ev.hd95(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="source"):
        ev.case_metrics(np.ones((2, 2, 2), np.uint8), np.ones((2, 2, 2), np.uint8), ANISO, source="kits99")


def test_surface_tolerances_follow_the_source():
    from kidney_seg.vocabulary import surface_tolerances, tolerance_challenge

    # neheller/kits21 kits21/configuration/labels.py and neheller/kits23 kits23/configuration/labels.py
    assert surface_tolerances("kits21") == KITS23_TOLERANCES
    assert surface_tolerances("kits23") == KITS23_TOLERANCES
    assert [tolerance_challenge(s) for s in ("kits19", "kits21", "kits23", "phantom", "local")] == [
        "kits23",
        "kits21",
        "kits23",
        "kits23",
        "kits23",
    ]


def test_case_metrics_distance_columns_and_per_region_tolerance():
    truth = np.zeros((8, 7, 7), np.uint8)
    truth[2:5, 2:5, 2:5] = 2  # a tumour-only cube, so tk, tu and masses are the same masks
    pred = np.roll(truth, 1, axis=0)
    spacing = (1.1, 0.5, 0.5)  # one slice = 1.1 mm: above the tk tolerance, below tu's and masses'
    m = ev.case_metrics(pred, truth, spacing, source="kits23")
    assert m["tk_hd95"] == pytest.approx(1.1) and m["tu_hd95"] == pytest.approx(1.1)
    assert m["masses_hd95"] == pytest.approx(1.1) and m["tu_penalised_hd95"] == m["tu_hd95"]
    direct = sd.compute_surface_distances(truth > 0, pred > 0, spacing)
    assert m["tk_surface_dice"] == sd.compute_surface_dice_at_tolerance(direct, KITS23_TOLERANCES["tk"]) < 1.0
    assert m["tu_surface_dice"] == 1.0 and m["masses_surface_dice"] == 1.0
    cols = list(ev.METRIC_COLUMNS)
    assert cols.index("tumor_recall") < cols.index("tk_hd95") < cols.index("tu_hd95") < cols.index("tk_surface_dice")
    assert cols.index("tu_surface_dice") < cols.index("pred_kidney_ml")
    assert list(ev.CYST_COLUMNS[:3]) == ["masses_dice", "masses_hd95", "masses_surface_dice"]


def test_case_metrics_tumour_free_case_distance_conventions():
    truth = np.zeros((6, 6, 6), np.uint8)
    truth[1:5, 1:5, 1:5] = 1
    m = ev.case_metrics(truth, truth, ANISO)
    assert m["tu_hd95"] == 0.0 and m["tu_surface_dice"] == 1.0 and m["tu_penalised_hd95"] == 0.0  # both empty
    assert m["tk_hd95"] == 0.0 and m["tk_surface_dice"] == 1.0
    assert not (m["tu_missed"] or m["tu_false_positive"])
    pred = truth.copy()
    pred[2, 2, 2] = 2  # a false-positive tumour
    m = ev.case_metrics(pred, truth, ANISO)
    assert math.isnan(m["tu_hd95"]) and m["tu_surface_dice"] == 0.0 and m["has_tumor"] is False
    assert m["tu_false_positive"] and not m["tu_missed"]
    diagonal = math.sqrt((6 * 3.0) ** 2 + 2 * (6 * 0.78) ** 2)
    assert ev.scan_diagonal_mm((6, 6, 6), ANISO) == pytest.approx(diagonal)
    assert m["tu_penalised_hd95"] == pytest.approx(diagonal)
    assert list(m) == list(ev.case_columns("kits19"))


def test_summary_counts_misses_and_penalises_them(tmp_path):
    """Two cases, one good and one with the tumour missed, plus a tumour-free case with a false-positive tumour."""
    truth = np.zeros((8, 7, 7), np.uint8)
    truth[1:7, 1:6, 1:6] = 1
    truth[2:4, 2:4, 2:4] = 2
    shifted = truth.copy()
    shifted[2:4, 2:4, 2:4] = 1
    shifted[3:5, 2:4, 2:4] = 2  # tumour one slice (3 mm) too deep
    missed = np.where(truth == 2, 1, truth).astype(np.uint8)
    fp = missed.copy()
    fp[5, 3, 3] = 2  # false-positive tumour in a tumour-free case
    cases = {
        "case_00000": ev.case_metrics(shifted, truth, ANISO),
        "case_00001": ev.case_metrics(missed, truth, ANISO),
        "case_00002": ev.case_metrics(fp, missed, ANISO),
    }
    diagonal = ev.scan_diagonal_mm(truth.shape, ANISO)
    paths = _write_cases(tmp_path, [{"case_id": k, **ev.json_safe(v)} for k, v in cases.items()])
    summary = ev.summarize(paths, tmp_path / "p.csv", tmp_path / "s.csv")
    rows = summary.set_index("metric")
    good = cases["case_00000"]["tu_hd95"]
    assert good > 0
    assert rows.loc["tu_hd95", "n"] == 1 and rows.loc["tu_hd95", "mean"] == pytest.approx(good)
    assert rows.loc["tu_penalised_hd95", "n"] == 3
    assert rows.loc["tu_penalised_hd95", "mean"] == pytest.approx((good + 2 * diagonal) / 3)
    assert rows.loc["tu_missed_cases", "mean"] == 1 and rows.loc["tu_missed_cases", "n"] == 3
    assert rows.loc["tu_false_positive_cases", "mean"] == 1
    assert rows.loc["tk_missed_cases", "mean"] == 0 and rows.loc["tk_false_positive_cases", "mean"] == 0
    assert rows.loc["tk_hd95", "n"] == 3 and rows.loc["tu_surface_dice", "n"] == 3
    assert rows.loc["tu_surface_dice", "mean"] == pytest.approx(np.mean([cases["case_00000"]["tu_surface_dice"], 0, 0]))
    per_case = pd.read_csv(tmp_path / "p.csv")
    assert list(per_case.columns) == ["case_id", *ev.case_columns("kits19")]
    assert per_case["tu_missed"].tolist() == [False, True, False]
    assert per_case["tu_false_positive"].tolist() == [False, False, True]
    assert math.isnan(per_case.loc[1, "tu_hd95"])
    assert "kits_hec_dice" not in rows.index  # 3-class data
    assert summary["metric"].tolist()[-5:] == [
        "kits_composite",
        "tk_missed_cases",
        "tk_false_positive_cases",
        "tu_missed_cases",
        "tu_false_positive_cases",
    ]


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
    m = ev.case_metrics(pred, truth, ANISO, source="kits23")
    masses_p, masses_t = np.isin(pred, (2, 3)), np.isin(truth, (2, 3))
    assert m["masses_hd95"] == 0.0 and m["masses_surface_dice"] == 1.0  # masses region is perfect
    for region, p, t in (("tu", pred == 2, truth == 2), ("tk", pred > 0, truth > 0)):
        direct = sd.compute_surface_distances(t, p, ANISO)
        assert m[f"{region}_hd95"] == sd.compute_robust_hausdorff(direct, 95)
        assert m[f"{region}_surface_dice"] == sd.compute_surface_dice_at_tolerance(direct, KITS23_TOLERANCES[region])
    shifted = pred.copy()
    shifted[np.isin(pred, (2, 3))] = 1
    shifted[np.roll(masses_p, 1, axis=2)] = 3  # masses moved by one in-plane voxel (0.78 mm)
    m2 = ev.case_metrics(shifted, truth, ANISO, source="kits23")
    direct = sd.compute_surface_distances(masses_t, np.isin(shifted, (2, 3)), ANISO)
    assert m2["masses_hd95"] == sd.compute_robust_hausdorff(direct, 95) > 0
    assert m2["masses_surface_dice"] == 1.0  # 0.78 mm is within 1.1329 mm
    assert math.isnan(m2["tu_hd95"]) and m2["tu_missed"]  # no tumour label predicted at all
    assert not m2["masses_missed"]
    assert "masses_hd95" not in ev.case_metrics(np.minimum(pred, 2), np.minimum(truth, 2), ANISO)


def test_kits_hec_aggregates_are_the_challenges(tmp_path):
    """KiTS21/23 rank on two numbers: the mean over the HEC regions of the per-region Dice (and surface Dice) means."""
    pred, truth = _four_class_pair()
    records = [
        {"case_id": "case_00001", **ev.case_metrics(pred, truth, ANISO, source="kits23")},
        {"case_id": "case_00002", **ev.case_metrics(truth, truth, ANISO, source="kits23")},
    ]
    summary = ev.summarize(_write_cases(tmp_path, records), tmp_path / "p.csv", tmp_path / "s.csv")
    rows = summary.set_index("metric")
    for score in ("dice", "surface_dice"):
        regions = [f"tk_{score}", f"masses_{score}", f"tu_{score}"]
        expected = np.mean([np.mean([r[m] for r in records]) for m in regions])
        assert expected < 1.0
        assert rows.loc[f"kits_hec_{score}", "mean"] == pytest.approx(expected)
        assert rows.loc[f"kits_hec_{score}", "n"] == 2 and rows.loc[f"kits_hec_{score}", "std"] == 0.0
    assert summary["metric"].tolist()[-2:] == ["kits_hec_dice", "kits_hec_surface_dice"]
    assert {"masses_hd95", "masses_surface_dice", "masses_penalised_hd95", "masses_missed_cases"} <= set(rows.index)
    per_case = pd.read_csv(tmp_path / "p.csv")
    assert list(per_case.columns) == ["case_id", *ev.case_columns("kits23")]


def test_hd95_matches_medpy_where_the_definitions_agree():
    """medpy's hd95 pools voxel-border distances of both directions; surface-distance weights surfels per direction.

    The two agree where the geometry forces it: a box translated by whole voxels along one
    axis (every face moves by the translation, so both 95th percentiles are its length),
    and two single voxels. On general shapes they differ by construction, so only these
    are compared.
    """
    from medpy.metric import binary

    for axis, steps in ((0, (1, 2, 3)), (1, (1, 2)), (2, (1, 2))):
        for k in steps:
            truth = np.zeros((12, 11, 12), bool)
            truth[2:5, 2:6, 2:7] = True
            pred = np.roll(truth, k, axis=axis)
            ours = ev.hd95(pred, truth, ANISO)
            assert ours == pytest.approx(binary.hd95(pred, truth, voxelspacing=ANISO)) == pytest.approx(k * ANISO[axis])
    pred, truth = np.zeros((6, 4, 4), bool), np.zeros((6, 4, 4), bool)
    pred[1, 2, 2], truth[4, 2, 2] = True, True
    assert ev.hd95(pred, truth, ANISO) == binary.hd95(pred, truth, voxelspacing=ANISO) == 9.0


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
    assert record["tu_hd95"] is None and record["tu_dice"] == 0.0 and record["tu_missed"] is True
    assert record["tu_penalised_hd95"] == pytest.approx(ev.scan_diagonal_mm((4, 10, 10), (3.0, 0.8, 0.8)))
    summary = ev.summarize([tmp_path / "m.json"], tmp_path / "pc.csv", tmp_path / "s.csv").set_index("metric")
    assert summary.loc["tu_hd95", "n"] == 0 and summary.loc["tk_hd95", "n"] == 1
    assert summary.loc["tu_penalised_hd95", "n"] == 1 and summary.loc["tu_missed_cases", "mean"] == 1
