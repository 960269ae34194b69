import numpy as np
import pytest

from kidney_seg.data.sources import fetch_case, labelled_cases, raw_root, select_cases
from kidney_seg.errors import CaseDataError
from tests.conftest import kits_affine, write_nifti


def test_case_lists():
    assert len(labelled_cases({"source": "kits19"})) == 210
    assert labelled_cases({"source": "phantom", "phantom": {"n_cases": 3}}) == ["case_00000", "case_00001", "case_00002"]
    assert raw_root({"source": "kits19", "root": None}) == "data/kits19"
    with pytest.raises(NotImplementedError, match="kits23"):
        labelled_cases({"source": "kits23"})


def test_select_cases():
    ids = [f"case_{i:05d}" for i in range(5)]
    assert select_cases(ids, "all") == ids
    assert select_cases(ids, 2) == ids[:2]
    assert select_cases(ids, ["case_00004", "case_00001"]) == ["case_00001", "case_00004"]
    with pytest.raises(ValueError, match="only 5"):
        select_cases(ids, 9)
    with pytest.raises(ValueError, match="case_00042"):
        select_cases(ids, ["case_00042"])


def test_local_folder_lists_labelled_cases(tmp_path):
    for case, labelled in [("case_00000", True), ("case_00001", False), ("case_00002", True)]:
        write_nifti(tmp_path / case / "imaging.nii.gz", np.zeros((2, 3, 4), np.int16), kits_affine())
        if labelled:
            write_nifti(tmp_path / case / "segmentation.nii.gz", np.zeros((2, 3, 4), np.uint8), kits_affine())
    assert labelled_cases({"source": "local", "root": str(tmp_path)}) == ["case_00000", "case_00002"]
    with pytest.raises(CaseDataError, match=r"case_00001.*segmentation\.nii\.gz"):
        fetch_case("case_00001", {"source": "local", "root": str(tmp_path)}, 0,
                   tmp_path / "case_00001" / "imaging.nii.gz", tmp_path / "case_00001" / "segmentation.nii.gz")


def test_phantom_fetch_writes_kits_layout(tmp_path):
    out = tmp_path / "case_00003"
    fetch_case("case_00003", {"source": "phantom", "phantom": {"field_of_view_mm": [120, 125], "z_extent_mm": [80, 85]}}, 1,
               out / "imaging.nii.gz", out / "segmentation.nii.gz")
    assert (out / "imaging.nii.gz").is_file() and (out / "segmentation.nii.gz").is_file()
