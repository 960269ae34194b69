"""Input checks per case: good cases pass, each kind of bad file is recorded with its reason."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from kidney_seg.data.checks import check_case, collect_checks, failure_message, run_check, usable_cases
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


@pytest.mark.parametrize("fault,expected", [
    ("truncated_image", "truncated"),
    ("nan_image", "NaN"),
    ("label_values", "unexpected label values [7]"),
    ("grid_mismatch", "grid"),
    ("not_nifti", "NIfTI"),
    ("one_slice", "single slice"),
])
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
    record = run_check("case_00000", img, lab, LABELS, out, log_path="logs/x.log")
    assert json.loads(out.read_text()) == record and record["log"] == "logs/x.log"
    out.unlink()
    with pytest.raises(CaseDataError, match=r"case_00000.*imaging\.nii\.gz.*truncated"):
        run_check("case_00000", img, lab, LABELS, out, on_bad_case="fail")
    assert not out.exists()  # no record claims the case was checked
    with pytest.raises(ValueError, match="on_bad_case"):
        run_check("case_00000", img, lab, LABELS, out, on_bad_case="ignore")


def test_a_bug_is_not_recorded_as_bad_data(tmp_path, monkeypatch):
    img, lab = _case(tmp_path)
    import kidney_seg.preprocessing as pre

    monkeypatch.setattr(pre, "read_image", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        check_case("case_00000", img, lab, LABELS)


def test_collect_checks_tables_usable_cases_and_message(tmp_path):
    good_img, good_lab = _case(tmp_path, "case_00001")
    bad_img, bad_lab = _case(tmp_path, "case_00002")
    _truncate(bad_img)
    paths = []
    for case, (img, lab) in {"case_00002": (bad_img, bad_lab), "case_00001": (good_img, good_lab)}.items():
        paths.append(tmp_path / "checks" / f"{case}.json")
        run_check(case, img, lab, LABELS, paths[-1], log_path=f"logs/{case}.log")
    table = collect_checks(paths, tmp_path / "checks.csv", tmp_path / "failures.csv")
    assert table["case_id"].tolist() == ["case_00001", "case_00002"] and table["ok"].tolist() == [True, False]
    assert usable_cases(tmp_path / "checks.csv") == {"case_00001"}
    failures = pd.read_csv(tmp_path / "failures.csv")
    assert list(failures.columns) == ["case_id", "stage", "reason", "log"] and failures["case_id"].tolist() == ["case_00002"]
    message = failure_message(tmp_path / "failures.csv")
    assert "1 case(s) failed" in message and "case_00002" in message and "truncated" in message
    assert failure_message(tmp_path / "missing.csv") is None


def test_no_failures_gives_no_message(tmp_path):
    img, lab = _case(tmp_path)
    run_check("case_00000", img, lab, LABELS, tmp_path / "c.json")
    collect_checks([tmp_path / "c.json"], tmp_path / "checks.csv", tmp_path / "failures.csv")
    assert failure_message(tmp_path / "failures.csv") is None
    assert pd.read_csv(tmp_path / "failures.csv").empty


def test_collect_checks_rejects_a_file_that_is_not_a_record(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a case check record"):
        collect_checks([tmp_path / "c.json"], tmp_path / "checks.csv", tmp_path / "failures.csv")
