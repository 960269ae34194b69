"""Input checks per case: good cases pass, each kind of bad file is recorded with its reason, and the
per-case steps and aggregates leave an excluded case out through its records."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from kidney_seg.data.checks import (
    check_case,
    collect_checks,
    failure_message,
    is_excluded,
    run_check,
    run_unless_excluded,
    usable_inputs,
    usable_predictions,
    usable_records,
    usable_scans,
)
from kidney_seg.errors import CaseDataError
from tests.conftest import kits_affine, write_nifti

LABELS = (0, 1, 2)


def _case(root, name="case_00000", image=None, label=None, affine=None):
    """Write one case (image, label) and return their paths."""
    rng = np.random.default_rng(0)
    image = rng.normal(40, 10, (4, 12, 12)).astype(np.float32) if image is None else image
    label = np.zeros(image.shape, np.uint8) if label is None else label
    img = write_nifti(root / name / "imaging.nii.gz", image, kits_affine())
    lab = write_nifti(root / name / "segmentation.nii.gz", label, kits_affine() if affine is None else affine)
    return img, lab


def test_a_good_case_passes(tmp_path):
    img, lab = _case(tmp_path)
    record = check_case("case_00000", img, lab, LABELS)
    assert record["ok"] is True and record["reason"] == ""
    assert check_case("case_00000", img, None, LABELS)["ok"] is True  # imaging-only


def _truncate(path):
    path.write_bytes(path.read_bytes()[:150])


@pytest.mark.parametrize(
    "fault,expected",
    [
        ("truncated_image", "truncated"),
        ("nan_image", "NaN"),
        ("label_values", "unexpected label values [7]"),
        ("grid_mismatch", "grid"),
        ("not_nifti", "NIfTI"),
        ("one_slice", "single slice"),
    ],
)
def test_each_bad_file_is_recorded_with_case_file_and_reason(tmp_path, fault, expected):
    image = np.random.default_rng(1).normal(40, 10, (4, 12, 12)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    affine = None
    if fault == "nan_image":
        image[1, 2, 3] = np.nan
    if fault == "one_slice":
        image, label = image[:1], label[:1]
    if fault == "label_values":
        label[0, 0, 0] = 7
    if fault == "grid_mismatch":
        affine = kits_affine((2.0, 0.8, 0.8))
    img, lab = _case(tmp_path, image=image, label=label, affine=affine)
    if fault == "truncated_image":
        _truncate(img)
    if fault == "not_nifti":
        img.write_bytes(gzip.compress(b"this is not a NIfTI file" * 40))  # a complete gzip stream of junk
    record = check_case("case_00000", img, lab, LABELS)
    assert record["ok"] is False and record["case_id"] == "case_00000"
    assert expected.lower() in record["reason"].lower(), record["reason"]
    bad_file = lab if fault in ("label_values", "grid_mismatch") else img
    assert record["file"] == str(bad_file)


def test_run_check_writes_the_record_or_raises_when_told_to_fail(tmp_path):
    img, lab = _case(tmp_path)
    _truncate(img)
    out = tmp_path / "checks" / "case_00000.json"
    record = run_check("case_00000", img, lab, LABELS, out, "logs/x.log", "skip")
    assert json.loads(out.read_text()) == record and record["log"] == "logs/x.log"
    out.unlink()
    with pytest.raises(CaseDataError, match=r"case_00000.*imaging\.nii\.gz.*truncated"):
        run_check("case_00000", img, lab, LABELS, out, None, "fail")
    assert not out.exists()  # no record claims the case was checked
    with pytest.raises(ValueError, match="on_bad_case"):
        run_check("case_00000", img, lab, LABELS, out, None, "ignore")


def test_a_bug_is_not_recorded_as_bad_data(tmp_path, monkeypatch):
    img, lab = _case(tmp_path)
    import kidney_seg.data.checks as checks

    monkeypatch.setattr(checks, "read_image", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        check_case("case_00000", img, lab, LABELS)


def test_collect_checks_tables_the_cases_and_message(tmp_path):
    good_img, good_lab = _case(tmp_path, "case_00001")
    bad_img, bad_lab = _case(tmp_path, "case_00002")
    _truncate(bad_img)
    paths = []
    for case, (img, lab) in {"case_00002": (bad_img, bad_lab), "case_00001": (good_img, good_lab)}.items():
        paths.append(tmp_path / "checks" / f"{case}.json")
        run_check(case, img, lab, LABELS, paths[-1], f"logs/{case}.log", "skip")
    table = collect_checks(paths, tmp_path / "checks.csv", tmp_path / "failures.csv")
    assert table["case_id"].tolist() == ["case_00001", "case_00002"] and table["ok"].tolist() == [True, False]
    failures = pd.read_csv(tmp_path / "failures.csv")
    assert list(failures.columns) == ["case_id", "stage", "reason", "log"] and failures["case_id"].tolist() == [
        "case_00002"
    ]
    message = failure_message(tmp_path / "failures.csv")
    assert "1 case(s) failed" in message and "case_00002" in message and "truncated" in message
    assert failure_message(tmp_path / "missing.csv") is None


def test_no_failures_gives_no_message(tmp_path):
    img, lab = _case(tmp_path)
    run_check("case_00000", img, lab, LABELS, tmp_path / "c.json", None, "skip")
    collect_checks([tmp_path / "c.json"], tmp_path / "checks.csv", tmp_path / "failures.csv")
    assert failure_message(tmp_path / "failures.csv") is None
    assert pd.read_csv(tmp_path / "failures.csv").empty


def test_collect_checks_rejects_a_file_that_is_not_a_record(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a case check record"):
        collect_checks([tmp_path / "c.json"], tmp_path / "checks.csv", tmp_path / "failures.csv")


def _records(tmp_path):
    """Check records of a good and a bad case (the bad one's image cut short)."""
    good_img, good_lab = _case(tmp_path, "case_00001")
    bad_img, bad_lab = _case(tmp_path, "case_00002")
    _truncate(bad_img)
    good = tmp_path / "checks" / "case_00001.json"
    bad = tmp_path / "checks" / "case_00002.json"
    run_check("case_00001", good_img, good_lab, LABELS, good, "logs/case_00001.log", "skip")
    run_check("case_00002", bad_img, bad_lab, LABELS, bad, "logs/case_00002.log", "skip")
    return good, bad, str(bad_img)


def _write_prediction(out_path, marker):
    """A stand-in step: writes one output file."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(marker)


def test_a_usable_case_runs_its_step_and_records_its_outputs(tmp_path):
    good, _, _ = _records(tmp_path)
    nifti, record_json = tmp_path / "pred" / "case_00001.nii.gz", tmp_path / "pred" / "case_00001.json"
    record = run_unless_excluded(good, record_json, {"prediction": nifti}, _write_prediction, nifti, "ran")
    assert nifti.read_text() == "ran"
    assert record == {"case_id": "case_00001", "excluded": False, "prediction": str(nifti)}
    assert json.loads(record_json.read_text()) == record and not is_excluded(record)


def test_a_step_that_writes_its_own_record_is_not_overwritten(tmp_path):
    good, _, _ = _records(tmp_path)
    meta = tmp_path / "cache" / "meta.json"

    def step():
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"case_id": "case_00001", "shape": [3, 4, 4]}))

    record = run_unless_excluded(good, meta, {"meta": meta}, step)
    assert record == {"case_id": "case_00001", "shape": [3, 4, 4]} and json.loads(meta.read_text()) == record


def test_an_excluded_case_gets_an_exclusion_record_and_no_data_file(tmp_path):
    _, bad, bad_file = _records(tmp_path)
    nifti, record_json = tmp_path / "pred" / "case_00002.nii.gz", tmp_path / "pred" / "case_00002.json"
    nifti.parent.mkdir(parents=True)
    nifti.write_text("a prediction from an earlier run, when the file was still whole")

    def must_not_run(*args):
        raise AssertionError("the step ran for an excluded case")

    record = run_unless_excluded(bad, record_json, {"prediction": nifti}, must_not_run)
    assert not nifti.exists()  # a stale result is never left looking valid
    assert record["excluded"] is True and record["case_id"] == "case_00002"
    check = json.loads(bad.read_text())
    assert (
        record["file"] == bad_file
        and record["reason"] == check["reason"] != ""
        and record["log"] == "logs/case_00002.log"
    )
    assert json.loads(record_json.read_text()) == record and is_excluded(record)


def test_an_excluded_case_whose_record_is_an_output_gets_the_exclusion_there(tmp_path):
    _, bad, _ = _records(tmp_path)
    meta, array = tmp_path / "cache" / "meta.json", tmp_path / "cache" / "image.npy"
    array.parent.mkdir(parents=True)
    array.write_bytes(b"stale")
    record = run_unless_excluded(bad, meta, {"image": array, "meta": meta}, lambda: 1 / 0)
    assert not array.exists() and json.loads(meta.read_text()) == record and record["excluded"] is True


def test_usable_inputs_and_records_leave_the_excluded_cases_out(tmp_path):
    good, bad, _ = _records(tmp_path)
    cases, images = usable_inputs([bad, good], ["case_00002", "case_00001"], ["bad.nii.gz", "good.nii.gz"])
    assert cases == ["case_00001"] and images == ["good.nii.gz"]
    meta_good, meta_bad = tmp_path / "a" / "meta.json", tmp_path / "b" / "meta.json"
    run_unless_excluded(bad, meta_bad, {"meta": meta_bad}, lambda: 1 / 0)
    meta_good.parent.mkdir()
    meta_good.write_text(json.dumps({"case_id": "case_00001", "shape": [2, 2, 2]}))
    assert usable_records([meta_bad, meta_good]) == [str(meta_good)]
    with pytest.raises(ValueError, match="parallel"):
        usable_inputs([good, bad], ["case_00001"])


def test_usable_predictions_and_scans_read_the_prediction_records(tmp_path):
    good, bad, _ = _records(tmp_path)
    records = {}
    for case, check in (("case_00001", good), ("case_00002", bad)):
        nifti, records[case] = tmp_path / "pred" / f"{case}.nii.gz", tmp_path / "pred" / f"{case}.json"
        run_unless_excluded(check, records[case], {"prediction": nifti}, _write_prediction, nifti, case)
    cases, predictions, labels = usable_predictions([records["case_00001"], records["case_00002"]], ["l1", "l2"])
    assert (
        cases == ["case_00001"] and predictions == [str(tmp_path / "pred" / "case_00001.nii.gz")] and labels == ["l1"]
    )
    scans = usable_scans(
        {"case_00001": ("i1", "l1", records["case_00001"]), "case_00002": ("i2", "l2", records["case_00002"])}
    )
    assert scans == {"case_00001": ("i1", "l1", str(tmp_path / "pred" / "case_00001.nii.gz"))}


def test_a_file_that_is_not_a_record_is_refused(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a per-case record"):
        usable_records([tmp_path / "r.json"])


def test_a_step_that_returns_a_dict_adds_it_to_the_record(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"case_id": "case_00001", "ok": True}))
    nifti = tmp_path / "pred.nii.gz"

    def step():
        nifti.write_text("x")
        return {"plan_grid": {"shape": [1, 2, 3]}}

    record = run_unless_excluded(good, tmp_path / "rec.json", {"prediction": nifti}, step)
    assert record["plan_grid"] == {"shape": [1, 2, 3]} and record["prediction"] == str(nifti)
    assert json.loads((tmp_path / "rec.json").read_text()) == record
    with pytest.raises(ValueError, match="overwrite"):
        run_unless_excluded(good, tmp_path / "rec2.json", {"prediction": nifti}, lambda: {"prediction": "other"})


def test_the_per_case_jobs_modules_import_no_pandas():
    """check_case and preprocess run once per case: pandas (about 0.2 s a start) is imported only where a table
    is made."""
    import subprocess
    import sys

    code = "import sys, kidney_seg.data.checks, kidney_seg.preprocessing; print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
