"""Tests for kidney_seg.postprocessing: component filtering, the validation decision, file I/O."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from kidney_seg import evaluation as ev
from kidney_seg import postprocessing as pp
from kidney_seg.errors import CaseDataError
from tests.conftest import kits_affine, write_nifti

SHAPE = (20, 40, 40)
ISO = (1.0, 1.0, 1.0)  # 1 voxel = 0.001 ml
ANISO = (2.5, 0.8, 0.8)  # 1 voxel = 1.6 mm^3 = 0.0016 ml
OPEN = {"enabled": True, "keep_largest": 2, "min_component_ml": 0.0, "min_tumor_ml": 0.0}


def _kidneys(left: int = 1000, right: int = 1000) -> np.ndarray:
    """Two separate kidney boxes (10 x 10 x n voxels) far apart, on a (20, 40, 40) grid."""
    vol = np.zeros(SHAPE, np.uint8)
    vol[2:12, 5:15, 5 : 5 + left // 100] = ev.KIDNEY
    vol[2:12, 25:35, 25 : 25 + right // 100] = ev.KIDNEY
    return vol


def _settings(**overrides) -> dict:
    """Open settings (no size thresholds) with some values changed."""
    return {**OPEN, **overrides}


# ------------------------------------------------------------------ keep_main_components


def test_two_kidneys_and_distant_blob_keeps_both_kidneys():
    kidneys = _kidneys()
    pred = kidneys.copy()
    pred[15:18, 0:3, 36:39] = ev.KIDNEY  # 27-voxel false positive far from both
    out = pp.keep_main_components(pred, ISO, keep_largest=2)
    np.testing.assert_array_equal(out, kidneys)
    assert out.dtype == np.uint8


def test_keep_largest_one_keeps_only_the_largest():
    pred = _kidneys(left=1200, right=1000)
    out = pp.keep_main_components(pred, ISO, keep_largest=1)
    assert np.count_nonzero(out) == 1200
    assert np.all(out[2:12, 5:15, 5:17] == ev.KIDNEY)
    assert not np.any(out[:, 20:, 20:])


@pytest.mark.parametrize(
    "spacing, threshold_ml, second_kept",
    [
        (ANISO, 0.159, True),  # 100 voxels * 0.0016 ml = 0.16 ml >= 0.159
        (ANISO, 0.161, False),  # 0.16 ml < 0.161
        (ISO, 0.099, True),  # 100 voxels * 0.001 ml = 0.1 ml
        (ISO, 0.101, False),
        (ISO, 0.159, False),  # same voxels, same threshold as the first row: the size is in ml
    ],
)
def test_min_component_ml_uses_millilitres(spacing, threshold_ml, second_kept):
    pred = _kidneys(left=1000, right=100)
    out = pp.keep_main_components(pred, spacing, keep_largest=2, min_size_ml=threshold_ml)
    assert np.count_nonzero(out[:, :20, :20]) == 1000  # the largest is always there
    assert np.count_nonzero(out[:, 20:, 20:]) == (100 if second_kept else 0)


def test_never_empties_a_non_empty_prediction():
    pred = _kidneys(left=300, right=200)
    out = pp.keep_main_components(pred, ISO, keep_largest=2, min_size_ml=1000.0)
    assert np.count_nonzero(out) == 300
    assert np.count_nonzero(out[:, :20, :20]) == 300
    full = pp.apply_steps(pred, ISO, ["foreground"], _settings(min_component_ml=1000.0))
    np.testing.assert_array_equal(full, out)


def test_empty_prediction_stays_empty():
    empty = np.zeros(SHAPE, np.uint8)
    assert not np.any(pp.keep_main_components(empty, ISO, 2, 5.0))
    assert not np.any(pp.remove_small_tumors(empty, ISO, 5.0))
    out = pp.apply_steps(empty, ISO, list(pp.STEPS), _settings(min_component_ml=5.0, min_tumor_ml=5.0))
    assert out.shape == SHAPE and out.dtype == np.uint8 and not np.any(out)


def test_tumour_outside_kept_region_is_removed():
    pred = _kidneys()
    pred[4:8, 7:11, 7:11] = ev.TUMOR  # tumour inside the left kidney: kept
    pred[15:19, 0:5, 36:40] = ev.TUMOR  # 80-voxel tumour-only component far away: removed
    pred[15:18, 0:2, 0:2] = ev.CYST  # a cyst component far away: removed
    out = pp.keep_main_components(pred, ISO, keep_largest=2)
    assert np.count_nonzero(out == ev.TUMOR) == 64
    assert np.all(out[4:8, 7:11, 7:11] == ev.TUMOR)
    assert not np.any(out[15:, :5, :])
    np.testing.assert_array_equal(out > 0, _kidneys() > 0)


def test_components_use_face_connectivity():
    pred = np.zeros((6, 6, 6), np.uint8)
    pred[0:2, 0:2, 0:2] = ev.KIDNEY  # 8 voxels
    pred[2:3, 2:3, 0:1] = ev.KIDNEY  # touches the cube along an edge only: its own component
    out = pp.keep_main_components(pred, ISO, keep_largest=1)
    assert np.count_nonzero(out) == 8
    pred[2, 1, 0] = ev.KIDNEY  # now face-joined to both
    out = pp.keep_main_components(pred, ISO, keep_largest=1)
    assert np.count_nonzero(out) == 10


def test_keep_largest_must_be_positive():
    with pytest.raises(ValueError, match="keep_largest"):
        pp.keep_main_components(_kidneys(), ISO, keep_largest=0)


# ------------------------------------------------------------------ remove_small_tumors


def _tumour_scene() -> np.ndarray:
    """Left kidney holding a small (8) and a big (125) tumour; isolated and edge-touching small ones."""
    vol = _kidneys()
    vol[3:5, 6:8, 6:8] = ev.TUMOR  # 8 voxels inside the left kidney
    vol[6:11, 9:14, 6:11] = ev.TUMOR  # 125 voxels inside the left kidney
    vol[15:17, 0:2, 36:38] = ev.TUMOR  # 8 voxels, isolated
    vol[12, 35, 35] = ev.TUMOR  # touches the right kidney (ends at 11, 34, 34) only at a corner
    return vol


def test_small_tumours_relabelled_by_what_they_touch():
    pred = _tumour_scene()
    out = pp.remove_small_tumors(pred, ISO, min_size_ml=0.1)  # 100 voxels
    assert np.all(out[3:5, 6:8, 6:8] == ev.KIDNEY)  # small, touches kidney -> kidney
    assert np.all(out[6:11, 9:14, 6:11] == ev.TUMOR)  # big -> kept
    assert not np.any(out[15:17, 0:2, 36:38])  # small, isolated -> background
    assert out[12, 35, 35] == 0  # corner contact is not face contact -> background
    unchanged = pred != ev.TUMOR
    np.testing.assert_array_equal(out[unchanged], pred[unchanged])


@pytest.mark.parametrize("spacing, kept", [(ISO, False), ((5.0, 2.0, 2.0), True)])
def test_small_tumour_threshold_in_millilitres(spacing, kept):
    pred = _kidneys()
    pred[3:5, 6:8, 6:8] = ev.TUMOR  # 8 voxels: 0.008 ml at 1 mm, 0.16 ml at 5 x 2 x 2 mm
    out = pp.remove_small_tumors(pred, spacing, min_size_ml=0.1)
    assert np.count_nonzero(out == ev.TUMOR) == (8 if kept else 0)
    assert np.count_nonzero(out) == np.count_nonzero(pred)  # relabelled to kidney, not removed


# ------------------------------------------------------------------ apply_steps


def test_apply_steps_does_not_modify_input_and_returns_uint8():
    pred = _tumour_scene().astype(np.uint16)
    pred[15:18, 30:33, 0:3] = ev.KIDNEY
    before = pred.copy()
    out = pp.apply_steps(pred, ISO, ["tumor", "foreground"], _settings(min_tumor_ml=0.1))
    np.testing.assert_array_equal(pred, before)
    assert out.dtype == np.uint8 and out is not pred
    step1 = pp.keep_main_components(before, ISO, 2, 0.0)
    expected = pp.remove_small_tumors(step1, ISO, 0.1)  # STEPS order, whatever order is given
    np.testing.assert_array_equal(out, expected)
    same = pp.apply_steps(pred, ISO, [], OPEN)
    np.testing.assert_array_equal(same, before)
    assert same.dtype == np.uint8


def test_apply_steps_runs_in_steps_order_whatever_the_given_order():
    pred = _kidneys(left=1000, right=100)
    pred[15:18, 0:5, 32:40] = ev.TUMOR  # 120-voxel tumour-only blob: 2nd largest, and a small tumour
    settings = _settings(min_tumor_ml=0.2)
    foreground_first = pp.remove_small_tumors(pp.keep_main_components(pred, ISO, 2), ISO, 0.2)
    tumor_first = pp.keep_main_components(pp.remove_small_tumors(pred, ISO, 0.2), ISO, 2)
    assert np.count_nonzero(foreground_first) == 1000  # the right kidney lost to the blob
    assert np.count_nonzero(tumor_first) == 1100  # the order matters here
    for steps in (["foreground", "tumor"], ["tumor", "foreground"]):
        np.testing.assert_array_equal(pp.apply_steps(pred, ISO, steps, settings), foreground_first)


@pytest.mark.parametrize(
    "steps, settings, match",
    [
        (["largest"], OPEN, "unknown post-processing steps"),
        (["tumor", "tumor"], OPEN, "repeated"),
        (["tumor"], {**OPEN, "min_tumour_ml": 1.0}, "unknown postprocessing settings"),
        (["tumor"], {**OPEN, "keep_largest": 1.5}, "keep_largest"),
        (["tumor"], {**OPEN, "min_tumor_ml": -1.0}, "min_tumor_ml"),
        (["tumor"], {**OPEN, "enabled": "yes"}, "enabled"),
    ],
)
def test_apply_steps_rejects_bad_steps_and_settings(steps, settings, match):
    with pytest.raises(ValueError, match=match):
        pp.apply_steps(_kidneys(), ISO, steps, settings)


def test_resolve_settings_fills_defaults():
    from kidney_seg.config import load_schema

    schema = load_schema()["properties"]["postprocessing"]["properties"]
    assert set(schema) == set(pp.SETTING_KEYS)
    assert pp.resolve_settings({}) == {key: schema[key]["default"] for key in pp.SETTING_KEYS}
    assert pp.resolve_settings({"keep_largest": 1})["keep_largest"] == 1


# ------------------------------------------------------------------ decide


def _tk(pred, truth):
    """TK Dice, computed here from the evaluation module."""
    return ev.dice(pred > 0, truth > 0)


def _fp_cases() -> list:
    """Three validation cases: two true kidneys, each prediction with one false-positive blob."""
    cases = []
    for i, size in enumerate((3, 4, 5)):
        truth = _kidneys()
        pred = truth.copy()
        pred[14 : 14 + size, 0:size, 36:39] = ev.KIDNEY  # false-positive blob
        cases.append((f"case_{i:05d}", pred, truth, ISO))
    return cases


def test_decide_applies_foreground_when_it_removes_false_positives():
    cases = _fp_cases()
    inputs = [c[1].copy() for c in cases]
    decision = pp.decide(cases, OPEN)
    assert decision["enabled"] is True
    assert decision["apply"] == ["foreground"]
    assert decision["validation_cases"] == ["case_00000", "case_00001", "case_00002"]
    fg = decision["steps"][0]
    assert fg["name"] == "foreground" and fg["region"] == "tk" and fg["other_region"] == "tu"
    assert fg["applied"] is True
    assert fg["dice_before"] == pytest.approx(np.mean([_tk(p, t) for _, p, t, _ in cases]))
    assert fg["dice_before"] < 1.0 and fg["dice_after"] == pytest.approx(1.0)
    assert fg["dice_after"] > fg["dice_before"]
    assert fg["other_before"] == fg["other_after"] == 1.0  # no tumour anywhere
    assert decision["steps"][1]["applied"] is False  # nothing to gain for TU
    for (_, pred, _, _), original in zip(cases, inputs):
        np.testing.assert_array_equal(pred, original)
    assert json.loads(json.dumps(decision)) == decision


def test_decide_does_not_apply_a_step_that_deletes_true_structure():
    truth = _kidneys()
    truth[15:18, 0:3, 36:39] = ev.KIDNEY  # a true third component (e.g. an ectopic pole)
    decision = pp.decide([("case_00000", truth.copy(), truth, ISO)], OPEN)
    fg = decision["steps"][0]
    assert fg["applied"] is False and decision["apply"] == []
    assert fg["dice_before"] == 1.0 and fg["dice_after"] < 1.0


def test_decide_blocks_a_step_when_the_other_region_drops():
    truth1 = _kidneys()
    pred1 = truth1.copy()
    pred1[14:19, 0:10, 30:40] = ev.KIDNEY  # a 500-voxel false positive: TK gains a lot
    truth2 = _kidneys()
    truth2[15:18, 0:3, 36:39] = ev.TUMOR  # a true, separate tumour: TU would be lost
    decision = pp.decide([("a", pred1, truth1, ISO), ("b", truth2.copy(), truth2, ISO)], OPEN)
    fg = decision["steps"][0]
    assert fg["dice_after"] > fg["dice_before"]
    assert fg["other_after"] < fg["other_before"]
    assert fg["applied"] is False and "foreground" not in decision["apply"]


def test_decide_is_greedy_and_records_the_order():
    truth = _kidneys()
    truth[5:9, 7:11, 7:11] = ev.TUMOR  # 64 true tumour voxels in the left kidney
    pred = truth.copy()
    pred[15:17, 0:2, 36:38] = ev.TUMOR  # 8 false tumour voxels, isolated: removed by "foreground"
    pred[6, 30, 30] = ev.TUMOR  # 1 false tumour voxel inside the right kidney: for "tumor"
    settings = _settings(min_tumor_ml=0.02)  # 20 voxels at 1 mm
    decision = pp.decide([("case_00000", pred, truth, ISO)], settings)
    assert [s["name"] for s in decision["steps"]] == list(pp.STEPS)
    assert decision["apply"] == ["foreground", "tumor"]
    fg, tu = decision["steps"]
    assert fg["other_before"] == pytest.approx(2 * 64 / (64 + 73))
    assert fg["other_after"] == pytest.approx(2 * 64 / (64 + 65))
    # the tumour step is judged on top of the foreground step, not on the raw prediction
    assert tu["dice_before"] == pytest.approx(fg["other_after"])
    assert tu["dice_after"] == pytest.approx(1.0)
    assert tu["other_before"] == tu["other_after"] == pytest.approx(1.0)


def test_decide_judges_tumor_on_raw_prediction_when_foreground_rejected():
    truth = _kidneys()
    truth[15:18, 0:3, 36:39] = ev.KIDNEY  # true third component: "foreground" would hurt
    pred = truth.copy()
    pred[6, 30, 30] = ev.TUMOR
    decision = pp.decide([("c", pred, truth, ISO)], _settings(min_tumor_ml=0.02))
    fg, tu = decision["steps"]
    assert fg["applied"] is False
    assert tu["dice_before"] == 0.0 and tu["dice_after"] == 1.0  # truth has no tumour
    assert tu["other_before"] == 1.0 and decision["apply"] == ["tumor"]


@pytest.mark.parametrize("enabled, cases", [(False, "fp"), (True, "none")])
def test_decide_disabled_or_without_cases_evaluates_nothing(enabled, cases):
    given = _fp_cases() if cases == "fp" else []
    decision = pp.decide(given, _settings(enabled=enabled))
    assert decision["enabled"] is enabled
    assert decision["steps"] == [] and decision["apply"] == []
    assert decision["reason"]
    assert decision["validation_cases"] == [c[0] for c in given]
    assert decision["settings"]["min_component_ml"] == 0.0
    assert json.loads(json.dumps(decision)) == decision


def test_decide_shape_mismatch_names_the_case():
    with pytest.raises(ValueError, match="case_00009"):
        pp.decide([("case_00009", np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), ISO)], OPEN)


# ------------------------------------------------------------------ files


def _affine(spacing=ANISO) -> np.ndarray:
    """A KiTS-style affine with the given spacing and a translation."""
    affine = kits_affine(spacing)
    affine[:3, 3] = (12.5, -40.0, 7.25)
    return affine


def _write_cases(tmp_path, cases, affine=None):
    """Write predictions and labels as NIfTI files; return ids, prediction paths, label paths."""
    ids, preds, labels = [], [], []
    for case_id, pred, truth, _ in cases:
        aff = _affine() if affine is None else affine
        preds.append(write_nifti(tmp_path / "pred" / f"{case_id}.nii.gz", pred, aff))
        labels.append(write_nifti(tmp_path / "data" / case_id / "segmentation.nii.gz", truth, aff))
        ids.append(case_id)
    return ids, preds, labels


def test_decide_from_files_round_trip(tmp_path):
    cases = _fp_cases()
    ids, preds, labels = _write_cases(tmp_path, cases)
    out = tmp_path / "pp" / "decision.json"
    decision = pp.decide_from_files(ids, preds, labels, OPEN, out)
    assert decision == pp.decide(cases, OPEN)  # same scores from the files as from the arrays
    assert json.loads(out.read_text()) == decision
    assert pp.read_decision(out) == decision
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]

    result_path = tmp_path / "post" / "case_00001.nii.gz"
    result = pp.postprocess_file("case_00001", preds[1], result_path, pp.read_decision(out))
    np.testing.assert_array_equal(result, cases[1][2])  # the false positive is gone
    src, written = nib.load(str(preds[1])), nib.load(str(result_path))
    np.testing.assert_allclose(written.affine, src.affine)
    assert written.shape == src.shape
    assert written.get_data_dtype() == np.uint8
    assert int(written.header["qform_code"]) == int(src.header["qform_code"])
    assert int(written.header["sform_code"]) == int(src.header["sform_code"])
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), result)


def test_postprocess_file_keeps_the_grid_and_uses_the_file_spacing(tmp_path):
    # slice axis last, in-plane axes swapped and flipped: file layout != internal layout
    affine = np.array([[0, -0.8, 0, 30.0], [0.8, 0, 0, -12.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    pred = np.zeros((30, 24, 10), np.uint8)
    pred[2:12, 2:12, 1:9] = ev.KIDNEY
    pred[4:9, 4:9, 2:6] = ev.TUMOR  # 100 voxels = 0.16 ml at 0.8 x 0.8 x 2.5 mm (0.1 ml at 1 mm)
    pred[20:22, 20:22, 3:4] = ev.TUMOR  # 4 voxels, isolated
    path = write_nifti(tmp_path / "pred.nii.gz", pred, affine, qcode=2, scode=1)
    decision = pp.decide([], _settings(min_tumor_ml=0.12))
    decision.update(enabled=True, apply=["tumor"])
    out_path = tmp_path / "out.nii.gz"
    result = pp.postprocess_file("case_00003", path, out_path, decision)
    assert np.count_nonzero(result == ev.TUMOR) == 100  # kept: the size uses the file's spacing
    assert not np.any(result[20:22, 20:22, :])
    written = nib.load(str(out_path))
    np.testing.assert_allclose(written.affine, affine)
    assert written.shape == pred.shape and written.get_data_dtype() == np.uint8
    assert int(written.header["qform_code"]) == 2 and int(written.header["sform_code"]) == 1
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), result)


def test_postprocess_file_rejects_bad_labels_naming_case(tmp_path):
    pred = np.zeros((4, 4, 4), np.uint8)
    pred[0, 0, 0] = 7
    path = write_nifti(tmp_path / "pred.nii.gz", pred, _affine())
    decision = pp.decide([], OPEN)
    with pytest.raises(CaseDataError) as info:
        pp.postprocess_file("case_00011", path, tmp_path / "out.nii.gz", decision)
    assert "case_00011" in str(info.value) and "pred.nii.gz" in str(info.value)
    assert not (tmp_path / "out.nii.gz").exists()


def test_decide_from_files_grid_mismatch_names_the_case(tmp_path):
    cases = _fp_cases()
    ids, preds, labels = _write_cases(tmp_path, cases)
    write_nifti(preds[2], cases[2][1], _affine(spacing=(3.0, 0.8, 0.8)))  # other grid
    out = tmp_path / "decision.json"
    with pytest.raises(CaseDataError) as info:
        pp.decide_from_files(ids, preds, labels, OPEN, out)
    assert "case_00002" in str(info.value) and "case_00002.nii.gz" in str(info.value)
    assert "grid" in str(info.value)
    assert not out.exists()


def test_decide_from_files_list_lengths_must_match(tmp_path):
    with pytest.raises(ValueError, match="equal lengths"):
        pp.decide_from_files(["a", "b"], ["p"], ["l", "m"], OPEN, tmp_path / "d.json")


def test_decide_from_files_disabled_writes_reason_without_reading(tmp_path):
    out = tmp_path / "d.json"
    decision = pp.decide_from_files(
        ["a"], [tmp_path / "missing.nii.gz"], [tmp_path / "x.nii.gz"], _settings(enabled=False), out
    )
    assert decision["apply"] == [] and decision["enabled"] is False and "disabled" in decision["reason"]
    assert pp.read_decision(out)["validation_cases"] == ["a"]


def _decision_file(tmp_path, **changes) -> tuple:
    """A decision JSON file (from _fp_cases) with some keys changed; its path and content."""
    decision = pp.decide(_fp_cases(), OPEN)
    decision.update(changes)
    path = tmp_path / "decision.json"
    path.write_text(json.dumps(decision))
    return path, decision


@pytest.mark.parametrize(
    "change, match",
    [
        ({"apply": ["foreground", "largest_cc"]}, "unknown post-processing steps"),
        ({"apply": "foreground"}, "list"),
        ({"settings": {"enabled": True, "keep_largest": 2, "min_component_ml": 5.0}}, "settings"),
        ({"enabled": False}, "disabled"),
    ],
)
def test_read_decision_rejects_bad_content_naming_the_file(tmp_path, change, match):
    path, _ = _decision_file(tmp_path, **change)
    with pytest.raises(ValueError, match=match) as info:
        pp.read_decision(path)
    assert "decision.json" in str(info.value)


@pytest.mark.parametrize("key", pp.DECISION_KEYS)
def test_read_decision_rejects_a_missing_key(tmp_path, key):
    path, decision = _decision_file(tmp_path)
    del decision[key]
    path.write_text(json.dumps(decision))
    with pytest.raises(ValueError, match=key) as info:
        pp.read_decision(path)
    assert str(path) in str(info.value)


def test_read_decision_rejects_invalid_json(tmp_path):
    path = tmp_path / "decision.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="decision.json"):
        pp.read_decision(path)


def test_a_prediction_record_is_post_processed_and_scored_on_both_grids(tmp_path):
    from kidney_seg.atomic import write_json_atomic
    from kidney_seg.inference import plan_grid_of
    from kidney_seg.preprocessing import label_on_plan_grid, resampled_shape
    from kidney_seg.volume import read_geometry, read_label, save_nifti

    truth = np.zeros((20, 16, 16), np.uint8)
    truth[4:16, 3:12, 4:12] = 1
    truth[8:12, 5:9, 5:9] = 2
    label = write_nifti(tmp_path / "label.nii.gz", truth, kits_affine((1.0, 1.0, 1.0)))
    geometry = read_geometry(label)
    speck = truth.copy()
    speck[1, 14, 14] = 1  # a false positive the decided step removes
    scan_pred = write_nifti(tmp_path / "raw.nii.gz", speck, kits_affine((1.0, 1.0, 1.0)))
    box = (slice(0, 20), slice(1, 15), slice(0, 16))
    grid = plan_grid_of(box, resampled_shape((20, 14, 16), geometry.spacing, (2.0, 1.0, 1.0)), geometry.spacing)
    on_plan = label_on_plan_grid(speck, box, grid.shape)
    save_nifti(tmp_path / "raw.plan_grid.nii.gz", on_plan, grid.affine(geometry), dtype=np.uint8)
    raw_record = tmp_path / "raw.json"
    write_json_atomic(
        raw_record,
        {
            "case_id": "case_x",
            "excluded": False,
            "prediction": str(scan_pred),
            "plan_grid_prediction": str(tmp_path / "raw.plan_grid.nii.gz"),
            "plan_grid": grid.to_dict(),
        },
    )
    decision = {
        "enabled": True,
        "settings": _settings(keep_largest=1, min_component_ml=0.0),
        "validation_cases": [],
        "steps": [],
        "apply": ["foreground"],
    }
    details = pp.postprocess_prediction(
        "case_x", raw_record, tmp_path / "pp.nii.gz", tmp_path / "pp.plan_grid.nii.gz", decision
    )
    assert details["plan_grid"] == grid.to_dict()
    assert details["kidney_components"] == 1 and details["uncertainty_entropy"] is None  # no uncertainty recorded
    assert details["qc_reasons"] == "1 kidney components, expected 2 (0.864 ml)"
    cleaned, plan_geometry = read_label(tmp_path / "pp.plan_grid.nii.gz", "case_x", (0, 1, 2))
    assert plan_geometry.spacing == pytest.approx(grid.spacing) and cleaned.shape == grid.shape
    assert np.count_nonzero(cleaned) < np.count_nonzero(on_plan)
    record = tmp_path / "pp.json"
    write_json_atomic(
        record,
        {
            "case_id": "case_x",
            "excluded": False,
            "prediction": str(tmp_path / "pp.nii.gz"),
            "plan_grid_prediction": str(tmp_path / "pp.plan_grid.nii.gz"),
            **details,
        },
    )
    result = ev.evaluate_case_on_both_grids("case_x", record, label, tmp_path / "metrics.json")
    assert result["tk_dice"] == 1.0 and result["plan_grid_tk_dice"] == 1.0 and result["plan_grid_tu_dice"] == 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["plan_grid_tk_hd95"] == 0.0
    table = ev.summary_table(ev.per_case_table([tmp_path / "metrics.json"])).set_index("metric")
    assert table.loc["plan_grid_tk_dice", "mean"] == 1.0
    assert result["qc_flagged"] and table.loc["qc_flagged_cases", "mean"] == 1.0  # the record's QC, in the metrics
