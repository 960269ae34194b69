import os

import numpy as np
import pytest

from kidney_seg.data.checks import check_case
from kidney_seg.data.sources import Case, fetch_image, fetch_label, list_cases, select
from kidney_seg.dicom import write_series
from kidney_seg.errors import CaseDataError
from tests.conftest import kits_affine, write_nifti


def _vol(path, dtype=np.int16):
    return write_nifti(path, np.zeros((2, 3, 4), dtype), kits_affine())


def _ids(cases):
    return [c.case_id for c in cases]


@pytest.fixture
def root(tmp_path):
    """case_00000 and case_00002 labelled, case_00001 imaging-only, plus clutter to ignore."""
    r = tmp_path / "raw"
    for case, labelled in [("case_00002", True), ("case_00000", True), ("case_00001", False)]:
        _vol(r / case / "imaging.nii.gz")
        if labelled:
            _vol(r / case / "segmentation.nii.gz", np.uint8)
    (r / "kits.json").write_text("{}")
    (r / "case_00003").mkdir()  # empty folder: ignored
    _vol(r / "case_12" / "imaging.nii.gz")  # not case_XXXXX: ignored
    return r


def test_root_layout_mixed(root):
    cfg = {"source": "local", "root": str(root)}
    cases = list_cases(cfg)
    assert cases == [
        Case(
            "case_00000", str(root / "case_00000" / "imaging.nii.gz"), str(root / "case_00000" / "segmentation.nii.gz")
        ),
        Case("case_00001", str(root / "case_00001" / "imaging.nii.gz"), None),
        Case(
            "case_00002", str(root / "case_00002" / "imaging.nii.gz"), str(root / "case_00002" / "segmentation.nii.gz")
        ),
    ]
    labelled, unlabelled = select(cases, {**cfg, "unlabelled_cases": "all"})
    assert _ids(labelled) == ["case_00000", "case_00002"] and _ids(unlabelled) == ["case_00001"]


def test_root_errors(tmp_path, root):
    with pytest.raises(CaseDataError, match="not a folder"):
        list_cases({"source": "local", "root": str(tmp_path / "absent")})
    with pytest.raises(CaseDataError, match="not a folder"):
        list_cases({"source": "local", "root": None})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaseDataError, match="no case_XXXXX"):
        list_cases({"source": "local", "root": str(tmp_path / "empty")})
    _vol(root / "case_00009" / "segmentation.nii.gz", np.uint8)
    with pytest.raises(CaseDataError, match=r"case_00009.*imaging\.nii\.gz.*not found"):
        list_cases({"source": "local", "root": str(root)})


def test_fetch_for_local_names_case_and_path(root):
    cfg = {"source": "local", "root": str(root)}
    out = str(root / "case_00001" / "segmentation.nii.gz")
    with pytest.raises(CaseDataError, match=r"case_00001.*segmentation\.nii\.gz.*not found"):
        fetch_label("case_00001", cfg, 0, out)
    with pytest.raises(CaseDataError, match=r"case_00005.*imaging\.nii\.gz.*not found"):
        fetch_image("case_00005", cfg, 0, str(root / "case_00005" / "imaging.nii.gz"))
    assert not os.path.exists(out)


def _write_manifest(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_manifest_relative_absolute_and_empty_labels(tmp_path):
    files = tmp_path / "data"
    img_a, lab_a = _vol(files / "a_ct.nii.gz"), _vol(files / "a_seg.nii.gz", np.uint8)
    img_b = _vol(files / "deep" / "b.nii.gz")  # given as an absolute path inside the manifest's folder
    img_c, lab_c = _vol(files / "sub" / "c.nii.gz"), _vol(files / "sub" / "c_lab.nii.gz", np.uint8)
    manifest = _write_manifest(
        files / "manifest.csv",
        "case_id,image,label\n"
        f"case_00010,{img_b},\n"
        "case_00003, a_ct.nii.gz ,a_seg.nii.gz\n"
        f"case_00007,sub/c.nii.gz,{lab_c}\n",
    )
    cases = list_cases({"source": "local", "root": None, "manifest": str(manifest)})
    assert cases == [
        Case("case_00003", str(img_a), str(lab_a)),
        Case("case_00007", str(img_c), str(lab_c)),
        Case("case_00010", str(img_b), None),
    ]
    labelled, unlabelled = select(cases, {"cases": "all", "unlabelled_cases": "all"})
    assert _ids(labelled) == ["case_00003", "case_00007"] and _ids(unlabelled) == ["case_00010"]


def test_manifest_extra_columns_bom_and_relative_manifest_path(tmp_path, monkeypatch):
    _vol(tmp_path / "m" / "x.nii.gz")
    _write_manifest(tmp_path / "m" / "list.csv", "\ufeffpatient,case_id,image,label\np1,case_00001,x.nii.gz,\n")
    monkeypatch.chdir(tmp_path)
    cases = list_cases({"source": "local", "manifest": "m/list.csv"})
    assert cases == [Case("case_00001", os.path.join("m", "x.nii.gz"), None)]


@pytest.mark.parametrize(
    "body, error, pattern",
    [
        ("case_id,image\ncase_00001,x.nii.gz\n", ValueError, r"missing column.*label"),
        ("case_id,image,label\ncase_1,x.nii.gz,\n", ValueError, r"line 2.*'case_1'.*case_XXXXX"),
        (
            "case_id,image,label\ncase_00001,x.nii.gz,\ncase_00001,x.nii.gz,\n",
            ValueError,
            r"case_00001.*twice.*lines 2 and 3",
        ),
        (
            "case_id,image,label\ncase_00001,missing.nii.gz,\n",
            CaseDataError,
            r"case_00001.*missing\.nii\.gz.*not found.*line 2",
        ),
        (
            "case_id,image,label\ncase_00001,x.nii.gz,nolabel.nii.gz\n",
            CaseDataError,
            r"case_00001.*nolabel\.nii\.gz.*not found",
        ),
        ("case_id,image,label\ncase_00001,,\n", CaseDataError, r"case_00001.*line 2.*empty image"),
        ("case_id,image,label\n", ValueError, "lists no cases"),
    ],
)
def test_manifest_errors(tmp_path, body, error, pattern):
    _vol(tmp_path / "x.nii.gz")
    manifest = _write_manifest(tmp_path / "manifest.csv", body)
    with pytest.raises(error, match=pattern):
        list_cases({"source": "local", "manifest": str(manifest)})


def test_missing_manifest(tmp_path):
    with pytest.raises(CaseDataError, match=r"absent\.csv.*manifest not found"):
        list_cases({"source": "local", "root": str(tmp_path), "manifest": str(tmp_path / "absent.csv")})


# ----------------------------------------------------------------------------- containment (security)


def _manifest_case(tmp_path, image, root=None, label=""):
    manifest = _write_manifest(tmp_path / "data" / "manifest.csv", f"case_id,image,label\ncase_00001,{image},{label}\n")
    return {"source": "local", "root": root, "manifest": str(manifest)}


@pytest.mark.parametrize("image", ["../outside.nii.gz", "sub/../../outside.nii.gz", "{abs}"])
def test_manifest_path_outside_the_manifest_folder_is_refused(tmp_path, image):
    outside = _vol(tmp_path / "outside.nii.gz")  # exists, but outside the data folder
    _vol(tmp_path / "data" / "sub" / "x.nii.gz")
    cfg = _manifest_case(tmp_path, image.format(abs=outside))
    with pytest.raises(
        CaseDataError, match=r"case_00001.*manifest .*manifest\.csv line 2.*outside the manifest folder"
    ) as err:
        list_cases(cfg)
    assert image.format(abs=outside) in str(err.value)


def test_manifest_label_outside_is_refused_too(tmp_path):
    _vol(tmp_path / "data" / "x.nii.gz")
    _vol(tmp_path / "seg.nii.gz", np.uint8)
    with pytest.raises(CaseDataError, match=r"case_00001.*line 2.*'\.\./seg\.nii\.gz'.*outside"):
        list_cases(_manifest_case(tmp_path, "x.nii.gz", label="../seg.nii.gz"))


def test_manifest_symlink_leading_outside_is_refused(tmp_path):
    secret = _vol(tmp_path / "secret" / "ct.nii.gz")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link.nii.gz").symlink_to(secret)
    with pytest.raises(CaseDataError, match=r"case_00001.*link\.nii\.gz.*outside.*resolves to .*secret"):
        list_cases(_manifest_case(tmp_path, "link.nii.gz"))
    (tmp_path / "data" / "dir").symlink_to(tmp_path / "secret", target_is_directory=True)
    with pytest.raises(CaseDataError, match="outside"):
        list_cases(_manifest_case(tmp_path, "dir/ct.nii.gz"))


def test_manifest_symlink_inside_the_folder_is_fine(tmp_path):
    real = _vol(tmp_path / "data" / "store" / "ct.nii.gz")
    (tmp_path / "data" / "link.nii.gz").symlink_to(real)
    assert list_cases(_manifest_case(tmp_path, "link.nii.gz"))[0].image == str(tmp_path / "data" / "link.nii.gz")


def test_manifest_paths_must_lie_in_dataset_root_when_set(tmp_path):
    """With dataset.root set, it is the folder every file must lie in (relative paths still start at the CSV)."""
    scans = tmp_path / "scans"
    img = _vol(scans / "a.nii.gz")
    cfg = _manifest_case(tmp_path, "../scans/a.nii.gz", root=str(scans))
    assert list_cases(cfg) == [Case("case_00001", str(img), None)]
    _vol(tmp_path / "data" / "b.nii.gz")  # inside the manifest's folder, but not inside dataset.root
    with pytest.raises(CaseDataError, match=r"case_00001.*outside dataset\.root"):
        list_cases(_manifest_case(tmp_path, "b.nii.gz", root=str(scans)))


@pytest.mark.parametrize(
    "case_id",
    [
        "../../x",
        "case_00001/../../x",
        "/tmp/case_00001",
        "case_0000\u0661",
        "case_000011",
        " case_00001x",
        "CASE_00001",
    ],
)
def test_manifest_case_ids_that_could_be_paths_are_refused(tmp_path, case_id):
    _vol(tmp_path / "x.nii.gz")
    manifest = _write_manifest(tmp_path / "manifest.csv", f"case_id,image,label\n{case_id},x.nii.gz,\n")
    with pytest.raises(ValueError, match=r"line 2.*case_XXXXX"):
        list_cases({"source": "local", "manifest": str(manifest)})


def test_root_layout_symlinks_leading_outside_are_refused(tmp_path, root):
    elsewhere = _vol(tmp_path / "elsewhere" / "case_00009" / "imaging.nii.gz").parent
    (root / "case_00009").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(
        CaseDataError, match=r"case_00009.*imaging\.nii\.gz.*outside dataset\.root.*resolves to .*elsewhere"
    ):
        list_cases({"source": "local", "root": str(root)})
    (root / "case_00009").unlink()
    _vol(root / "case_00009" / "imaging.nii.gz")
    (root / "case_00009" / "segmentation.nii.gz").symlink_to(_vol(tmp_path / "seg.nii.gz", np.uint8))
    with pytest.raises(CaseDataError, match=r"case_00009.*segmentation\.nii\.gz.*outside"):
        list_cases({"source": "local", "root": str(root)})


def test_root_layout_folder_names_that_are_not_case_ids_are_ignored(root):
    _vol(root / "case_0000\u0661" / "imaging.nii.gz")  # a non-ASCII digit: \\d would match it
    assert _ids(list_cases({"source": "local", "root": str(root)})) == ["case_00000", "case_00001", "case_00002"]


# ----------------------------------------------------------------------------- DICOM series as images


def _series(folder, seed=0):
    """A small CT series in ``folder`` and its label volume on the same grid (NIfTI layout, RAS affine)."""
    affine = np.diag([-0.75, -0.75, 2.5, 1.0])
    image = np.random.default_rng(seed).integers(-1000, 400, size=(6, 5, 4)).astype(np.int16)
    write_series(image, affine, folder)
    return image, (image > 0).astype(np.uint8), affine


def test_manifest_image_may_be_a_dicom_series_folder(tmp_path):
    data = tmp_path / "data"
    image, label, affine = _series(data / "ct_a")
    write_nifti(data / "seg_a.nii.gz", label, affine)
    cfg = _manifest_case(tmp_path, "ct_a", label="seg_a.nii.gz")
    assert list_cases(cfg) == [Case("case_00001", str(data / "ct_a"), str(data / "seg_a.nii.gz"))]
    record = check_case("case_00001", str(data / "ct_a"), str(data / "seg_a.nii.gz"), (0, 1, 2))
    assert record["ok"], record  # read as the pipeline reads it: the label is checked against the series' grid
    (data / "not_a_series").mkdir()
    with pytest.raises(CaseDataError, match=r"case_00001.*not_a_series.*holds no DICOM files.*line 2"):
        list_cases(_manifest_case(tmp_path, "not_a_series"))
    with pytest.raises(CaseDataError, match=r"case_00001.*ct_a.*is a folder, not a file"):
        list_cases(_manifest_case(tmp_path, "seg_a.nii.gz", label="ct_a"))


def test_root_layout_case_may_hold_its_ct_as_an_imaging_series_folder(root):
    _, label, affine = _series(root / "case_00004" / "imaging")
    write_nifti(root / "case_00004" / "segmentation.nii.gz", label, affine)
    cases = {c.case_id: c for c in list_cases({"source": "local", "root": str(root)})}
    assert cases["case_00004"] == Case(
        "case_00004", str(root / "case_00004" / "imaging"), str(root / "case_00004" / "segmentation.nii.gz")
    )
    assert check_case("case_00004", cases["case_00004"].image, cases["case_00004"].label, (0, 1, 2))["ok"]


def test_series_files_leading_outside_are_refused(tmp_path):
    _series(tmp_path / "secret")
    series = tmp_path / "data" / "ct"
    _series(series, seed=1)
    (series / "00005.dcm").symlink_to(next((tmp_path / "secret").iterdir()))
    with pytest.raises(CaseDataError, match=r"case_00001.*00005\.dcm.*outside the manifest folder.*resolves to"):
        list_cases(_manifest_case(tmp_path, "ct"))
