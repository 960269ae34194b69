"""QC: the uncertainty summary of class scores, the flags and their reasons, the training reference."""

import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kidney_seg.quality import (
    QC_COLUMNS,
    assess_labels,
    build_reference,
    case_findings,
    flagged_first,
    kidney_intensity,
    normalised_entropy,
    qc_flags,
    read_reference,
    uncertainty_summary,
    write_qc_csv,
)

SPACING = (2.0, 1.0, 1.0)  # 2 microlitres a voxel: 500 voxels = 1 ml


def one_hot(labels: np.ndarray, num_classes: int = 3) -> np.ndarray:
    """Certain class scores (C, Z, Y, X) of a label volume."""
    return np.stack([(labels == c).astype(np.float32) for c in range(num_classes)])


def two_kidneys(shape=(20, 40, 60)) -> np.ndarray:
    """Two separate kidney blocks (8 ml each at SPACING), a tumour in the first."""
    labels = np.zeros(shape, np.uint8)
    labels[5:15, 5:25, 5:25] = 1
    labels[5:15, 5:25, 35:55] = 1
    labels[8:12, 10:15, 10:15] = 2
    return labels


def reference(**overrides) -> dict:
    """A QC reference whose ranges hold :func:`two_kidneys` at SPACING."""
    ref = {
        "n_cases": 4,
        "kidney_ml": [10.0, 20.0],
        "tumor_ml": [0.1, 5.0],
        "spacing_mm": [[1.0, 3.0], [0.5, 1.0], [0.5, 1.0]],
        "field_of_view_mm": [[30.0, 60.0], [30.0, 50.0], [50.0, 70.0]],
        "range_margin": 0.25,
        "thresholds": {"uncertainty_entropy": 0.2, "uncertainty_tu": 0.5},
    }
    return {**ref, **overrides}


def test_entropy_is_0_when_certain_and_1_when_uniform():
    certain = one_hot(two_kidneys())
    assert float(normalised_entropy(certain).max()) == pytest.approx(0.0, abs=1e-6)
    uniform = np.full((3, 2, 3, 4), 1 / 3, np.float32)
    np.testing.assert_allclose(normalised_entropy(uniform), 1.0, rtol=1e-5)


def test_certain_scores_have_no_uncertainty_and_blurred_ones_do():
    labels = two_kidneys()
    certain = uncertainty_summary(one_hot(labels), SPACING)
    assert certain["uncertainty_tk"] == pytest.approx(0.0, abs=1e-6)
    assert certain["uncertainty_tu"] == pytest.approx(0.0, abs=1e-6)
    assert certain["uncertainty_entropy"] == pytest.approx(0.0, abs=1e-6)
    blurred = 0.6 * one_hot(labels) + 0.4 / 3  # same argmax, less sure
    unsure = uncertainty_summary(blurred, SPACING)
    assert unsure["uncertainty_entropy"] > 0.5
    assert unsure["uncertainty_tu"] > unsure["uncertainty_tk"] > 0.0


def test_no_foreground_gives_nan_entropy_and_stray_scores_stay_certain():
    labels = np.zeros((10, 20, 20), np.uint8)
    probs = one_hot(labels)
    probs[:, 0, 0, :5] = [[0.8], [0.1], [0.1]]  # 5 voxels of 0.1 tumour: 1/1000 ml
    summary = uncertainty_summary(probs, SPACING)
    assert math.isnan(summary["uncertainty_entropy"])
    assert summary["uncertainty_tu"] < 0.01
    probs[:, 2:4, :, :] = np.array([0.5, 0.1, 0.4], np.float32)[:, None, None, None]  # 800 voxels, 0.4 tumour
    assert uncertainty_summary(probs, SPACING)["uncertainty_tu"] > 0.3  # 0.64 ml of undecided tumour


def test_two_kidneys_with_their_tumour_raise_no_flag():
    findings = case_findings(two_kidneys(), SPACING)
    assert findings["kidney_component_ml"] == pytest.approx([8.0, 8.0])
    assert findings["detached_tumor_ml"] == []
    assert findings["tumor_ml"] == pytest.approx(0.2)
    assert qc_flags(findings, {"uncertainty_entropy": 0.05}, reference()) == []


def test_each_flag_gives_its_reason():
    labels = two_kidneys()
    labels[5:15, 5:25, 35:55] = 0  # one kidney only
    findings = case_findings(labels, SPACING)
    reasons = qc_flags(findings, {"uncertainty_entropy": 0.3}, reference(kidney_ml=[12.0, 20.0]))
    assert reasons == [
        "1 kidney components, expected 2 (8 ml)",
        "kidney volume 7.8 ml outside the training range 12-20 ml",
        "high uncertainty in the predicted foreground (entropy 0.300 > 0.2)",
    ]
    labels = two_kidneys()
    labels[2:4, 30:33, 30:33] = 2  # a tumour far from any kidney: 18 voxels, a third component
    reasons = qc_flags(case_findings(labels, SPACING), {"uncertainty_entropy": 0.1}, reference())
    assert reasons == [
        "3 kidney components, expected 2 (8, 8, 0.036 ml)",
        "1 tumour component(s) not touching a kidney (0.036 ml)",
    ]


def test_spacing_and_field_of_view_outside_the_training_range():
    findings = case_findings(two_kidneys(), (5.0, 1.0, 1.0))
    reasons = qc_flags(findings, {}, reference(kidney_ml=[10.0, 50.0]))
    assert "slice spacing 5 mm outside the training range 1-3 mm" in reasons[0]
    assert "slice field of view 100 mm outside the training range 30-60 mm" in reasons[1]
    assert len(reasons) == 2
    # within the margin: 3.5 mm lies inside 1-3 mm widened by 25%, and 70 mm inside 30-60 mm widened so
    within = case_findings(two_kidneys(), (3.5, 1.0, 1.0))
    assert qc_flags(within, {}, reference(kidney_ml=[10.0, 50.0])) == []
    assert qc_flags(findings, {}, None) == []  # no reference: no range checks


def test_empty_prediction_is_flagged_with_no_component():
    record = assess_labels(np.zeros((4, 5, 6), np.uint8), SPACING, {"uncertainty_entropy": math.nan}, None)
    assert record["qc_flagged"] and record["qc_reasons"] == "0 kidney components, expected 2 (none)"
    assert record["uncertainty_entropy"] is None
    assert list(record) == list(QC_COLUMNS)


def test_reference_from_slice_cache_metas(tmp_path):
    metas = []
    for i, (kidney, tumour, n) in enumerate(((150.0, 10.0, 100), (300.0, 0.0, 200), (200.0, 40.0, 150))):
        meta = {"spacing": [3.0, 0.8, 0.8], "original_shape": [n, 512, 512], "class_volumes_ml": [1e4, kidney, tumour]}
        metas.append(tmp_path / f"{i}.json")
        metas[-1].write_text(json.dumps(meta))
    records = []
    for i, value in enumerate((0.1, None, 0.2)):  # validation predictions' records (one without a value)
        records.append(tmp_path / f"val_{i}.json")
        records[-1].write_text(json.dumps({"case_id": f"v{i}", "uncertainty_entropy": value}))
    settings = {"range_margin": 0.1, "max_uncertainty": None, "max_tumor_uncertainty": 0.9}
    ref = build_reference(metas, settings, tmp_path / "qc_reference.json", records)
    assert ref["validation_uncertainty"]["uncertainty_entropy"] == [0.1, 0.2]
    assert ref["thresholds"] == {"uncertainty_entropy": pytest.approx(0.22), "uncertainty_tu": 0.9}  # auto, fixed
    assert build_reference(metas, settings, tmp_path / "none.json")["thresholds"]["uncertainty_entropy"] is None
    assert ref["kidney_ml"] == [150.0, 300.0] and ref["tumor_ml"] == [10.0, 40.0]  # cases without tumour left out
    assert ref["field_of_view_mm"][0] == [300.0, 600.0] and ref["spacing_mm"][1] == [0.8, 0.8]
    assert read_reference(tmp_path / "qc_reference.json") == ref
    (tmp_path / "bad.json").write_text(json.dumps({"kidney_ml": [1, 2]}))
    with pytest.raises(ValueError, match=r"bad.json: not a QC reference \(missing \['tumor_ml'"):
        read_reference(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no usable training cases"):
        build_reference([], settings, tmp_path / "empty.json")


def test_flagged_cases_come_first(tmp_path):
    records = [
        {"case": "scan_3", "qc_flagged": False, "qc_reasons": ""},
        {"case": "scan_2", "qc_flagged": True, "qc_reasons": "1 kidney components, expected 2 (90 ml)"},
        {"case": "scan_1", "qc_flagged": False, "qc_reasons": ""},
    ]
    table = write_qc_csv(records, tmp_path / "qc.csv")
    assert list(table["case"]) == ["scan_2", "scan_1", "scan_3"]
    back = pd.read_csv(tmp_path / "qc.csv")
    assert list(back["case"]) == ["scan_2", "scan_1", "scan_3"]
    assert list(flagged_first(back.astype({"qc_flagged": str}))["case"]) == list(back["case"])
    assert not list(tmp_path.glob(".*"))  # nothing half-written left behind


def test_postprocessed_record_carries_uncertainty_and_flags(tmp_path):
    from kidney_seg.postprocessing import postprocess_prediction

    labels = two_kidneys()
    affine = np.diag([*SPACING, 1.0])
    for name in ("raw.nii.gz", "raw.plan_grid.nii.gz"):
        nib.save(nib.Nifti1Image(np.transpose(labels, (2, 1, 0)).copy(), affine[[2, 1, 0, 3]]), tmp_path / name)
    raw = {
        "case_id": "case_00001",
        "prediction": str(tmp_path / "raw.nii.gz"),
        "plan_grid_prediction": str(tmp_path / "raw.plan_grid.nii.gz"),
        "plan_grid": {"crop_box": [[0, 20], [0, 40], [0, 60]], "shape": [20, 40, 60], "spacing": list(SPACING)},
        "uncertainty_entropy": 0.35,
        "uncertainty_tk": 0.05,
        "uncertainty_tu": None,
    }
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    settings = {"enabled": False, "keep_largest": 2, "min_component_ml": 5.0, "min_tumor_ml": 0.0}
    decision = {"enabled": False, "settings": settings, "validation_cases": [], "steps": [], "apply": []}
    details = postprocess_prediction(
        "case_00001", tmp_path / "raw.json", tmp_path / "pp.nii.gz", tmp_path / "pp.plan.nii.gz", decision
    )
    assert details["plan_grid"] == raw["plan_grid"]
    assert details["uncertainty_entropy"] == 0.35 and details["uncertainty_tu"] is None
    assert details["kidney_components"] == 2 and not details["qc_flagged"]
    assert "entropy" not in details["qc_reasons"]  # without a reference there is no uncertainty threshold
    details = postprocess_prediction(
        "case_00001",
        tmp_path / "raw.json",
        tmp_path / "pp.nii.gz",
        tmp_path / "pp.plan.nii.gz",
        decision,
        qc_reference=reference(thresholds={"uncertainty_entropy": 0.3, "uncertainty_tu": None}),
    )
    assert details["qc_reasons"].endswith("high uncertainty in the predicted foreground (entropy 0.350 > 0.3)")


def test_foreground_at_the_scan_edge_is_flagged():
    labels = two_kidneys()
    assert case_findings(labels, SPACING)["cut_faces"] == []
    cut = labels[8:]  # the field of view starts inside both kidneys
    reasons = qc_flags(case_findings(cut, SPACING), {}, None)
    assert reasons == ["kidney or tumour at the scan's edge (first slice): the field of view may cut it"]
    assert case_findings(labels[:, :, :50], SPACING)["cut_faces"] == ["last column"]


def test_an_uncertain_tumour_is_flagged_against_its_own_threshold():
    findings = case_findings(two_kidneys(), SPACING)
    ref = reference(kidney_ml=[5.0, 50.0])
    assert qc_flags(findings, {"uncertainty_entropy": 0.1, "uncertainty_tu": 0.4}, ref) == []
    assert qc_flags(findings, {"uncertainty_entropy": 0.1, "uncertainty_tu": 0.64}, ref) == [
        "uncertain tumour, a miss or a false positive? (uncertainty_tu 0.640 > 0.5)"
    ]
    no_threshold = reference(kidney_ml=[5.0, 50.0], thresholds={"uncertainty_entropy": None, "uncertainty_tu": None})
    assert qc_flags(findings, {"uncertainty_entropy": 0.9, "uncertainty_tu": 0.9}, no_threshold) == []


def test_kidney_intensity_is_the_median_and_the_noise_of_kidney_hu():
    labels = two_kidneys()
    texture = np.where(labels == 1, 150.0, -100.0).astype(np.float32)
    texture += 40.0 * np.sin(np.arange(labels.shape[1]) / 6.0)[None, :, None]  # smooth cortex-like variation
    clean = kidney_intensity(texture, labels)
    assert clean["kidney_hu_median"] == pytest.approx(float(np.median(texture[labels == 1])))
    assert clean["kidney_hu_noise"] < 1.0  # texture smooth at the voxel scale is not noise
    noisy = texture + np.random.default_rng(0).normal(0, 30, labels.shape).astype(np.float32)
    assert kidney_intensity(noisy, labels)["kidney_hu_noise"] == pytest.approx(30, rel=0.05)
    assert kidney_intensity(texture, np.zeros_like(labels)) == {"kidney_hu_median": None, "kidney_hu_noise": None}


def test_kidney_hu_outside_the_training_range_is_flagged():
    findings = case_findings(two_kidneys(), SPACING)
    ref = reference(kidney_ml=[5.0, 50.0], kidney_hu_median=[120.0, 200.0], kidney_hu_noise=[20.0, 40.0])
    assert qc_flags(findings, {"kidney_hu_median": 180.0, "kidney_hu_noise": 45.0}, ref) == []  # within 25%
    assert qc_flags(findings, {"kidney_hu_median": 420.0, "kidney_hu_noise": 90.0}, ref) == [
        "kidney HU median 420 outside the training range 120-200 HU",
        "kidney HU noise 90 outside the training range 20-40 HU",
    ]
    assert qc_flags(findings, {"kidney_hu_median": None}, ref) == []  # no kidney predicted: nothing to compare
