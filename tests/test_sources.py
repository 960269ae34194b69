import numpy as np
import pytest

from kidney_seg.data import kits
from kidney_seg.data.sources import Case, fetch_case, fetch_image, fetch_label, labels_of, list_cases, raw_root, select
from kidney_seg.errors import CaseDataError
from kidney_seg.vocabulary import SOURCE_LABELS as LABELS
from kidney_seg.volume import read_image, read_label

SMALL_PHANTOM = {"n_cases": 3, "field_of_view_mm": [120, 125], "z_extent_mm": [80, 85], "slice_spacing_mm": [4.0, 5.0]}


def ids(cases):
    return [c.case_id for c in cases]


def test_kits_case_counts():
    for source, n_labelled, n_unlabelled in [("kits19", 210, 90), ("kits21", 300, 0), ("kits23", 489, 0)]:
        cases = list_cases({"source": source})
        labelled, unlabelled = select(cases, {"source": source, "unlabelled_cases": "all"})
        assert (len(labelled), len(unlabelled)) == (n_labelled, n_unlabelled), source
        assert ids(cases) == sorted(ids(cases))
    kits19 = list_cases({"source": "kits19"})
    assert kits19[209] == Case(
        "case_00209", "data/kits19/case_00209/imaging.nii.gz", "data/kits19/case_00209/segmentation.nii.gz"
    )
    assert kits19[210] == Case("case_00210", "data/kits19/case_00210/imaging.nii.gz", None)
    kits23 = ids(list_cases({"source": "kits23"}))
    assert "case_00299" in kits23 and "case_00300" not in kits23 and "case_00399" not in kits23
    assert kits23[300] == "case_00400" and kits23[-1] == "case_00588"


def test_phantom_and_root():
    cases = list_cases({"source": "phantom", "root": "/x/raw", "phantom": {"n_cases": 3}})
    assert ids(cases) == ["case_00000", "case_00001", "case_00002"]
    assert cases[1] == Case("case_00001", "/x/raw/case_00001/imaging.nii.gz", "/x/raw/case_00001/segmentation.nii.gz")
    assert len(list_cases({"source": "phantom"})) == 40
    assert raw_root({"source": "kits19", "root": None}) == "data/kits19"
    assert raw_root({"source": "kits23", "root": "/d"}) == "/d"
    with pytest.raises(ValueError, match="nope"):
        list_cases({"source": "nope"})


def test_labels_of_matches_config():
    assert labels_of("kits19") == labels_of("phantom") == labels_of("local") == (0, 1, 2)
    assert labels_of("kits21") == labels_of("kits23") == (0, 1, 2, 3)
    for source, labels in LABELS.items():
        assert labels_of(source) == labels
    with pytest.raises(ValueError):
        labels_of("kits99")


def _mixed():
    return [Case(f"case_{i:05d}", f"i{i}", None if i >= 5 else f"l{i}") for i in range(8)]


def test_select_semantics():
    cases = _mixed()
    lab, unl = select(cases, {"cases": "all"})
    assert ids(lab) == [f"case_{i:05d}" for i in range(5)] and unl == []
    lab, unl = select(cases, {"cases": 2, "unlabelled_cases": "all"})
    assert ids(lab) == ["case_00000", "case_00001"] and ids(unl) == ["case_00005", "case_00006", "case_00007"]
    lab, unl = select(cases, {"cases": ["case_00004", "case_00001"], "unlabelled_cases": 1})
    assert ids(lab) == ["case_00001", "case_00004"] and ids(unl) == ["case_00005"]
    _, unl = select(cases, {"unlabelled_cases": ["case_00007"]})
    assert ids(unl) == ["case_00007"]
    assert select(cases, {"unlabelled_cases": "none"})[1] == []
    assert select(cases, {})[1] == [] and len(select(cases, {})[0]) == 5


def test_select_errors():
    cases = _mixed()
    with pytest.raises(ValueError, match="5 labelled"):
        select(cases, {"cases": 9})
    with pytest.raises(ValueError, match=r"not labelled.*case_00006"):
        select(cases, {"cases": ["case_00001", "case_00006"]})
    with pytest.raises(ValueError, match=r"does not offer.*case_00042"):
        select(cases, {"cases": ["case_00042"]})
    with pytest.raises(ValueError, match=r"not imaging-only.*case_00002"):
        select(cases, {"unlabelled_cases": ["case_00002"]})
    with pytest.raises(ValueError, match="3 imaging-only"):
        select(cases, {"unlabelled_cases": 4})
    with pytest.raises(ValueError, match="0 imaging-only"):
        select(list_cases({"source": "kits23"}), {"unlabelled_cases": 1})
    with pytest.raises(ValueError, match="dataset.cases"):
        select(cases, {"cases": "some"})


def test_kits_urls_from_table_and_config():
    assert kits.image_url("case_00007", {"source": "kits19"}) == f"{kits.HF_IMAGING}/case_00007.nii.gz"
    assert kits.label_url("case_00007", {"source": "kits19"}) == (
        "https://raw.githubusercontent.com/neheller/kits19/master/data/case_00007/segmentation.nii.gz"
    )
    assert kits.label_url("case_00400", {"source": "kits23", "kits_labels_url": None}) == (
        "https://raw.githubusercontent.com/neheller/kits23/main/dataset/case_00400/segmentation.nii.gz"
    )
    assert kits.label_url("case_00001", {"source": "kits21"}).endswith(
        "/kits21/data/case_00001/aggregated_MAJ_seg.nii.gz"
    )
    cfg = {"source": "kits23", "kits_imaging_url": "https://mirror/img/", "kits_labels_url": "https://mirror/lab"}
    assert kits.image_url("case_00400", cfg) == "https://mirror/img/case_00400.nii.gz"
    assert kits.label_url("case_00400", cfg) == "https://mirror/lab/case_00400/segmentation.nii.gz"


def test_kits_fetch_rejects_cases_without_label_or_unknown(tmp_path):
    cfg = {"source": "kits19", "root": str(tmp_path), "kits_labels_url": "http://127.0.0.1:9/none"}
    with pytest.raises(CaseDataError, match=r"case_00250.*imaging-only"):
        fetch_label("case_00250", cfg, 0, str(tmp_path / "case_00250" / "segmentation.nii.gz"))
    with pytest.raises(CaseDataError, match=r"case_00300.*not a case of kits19"):
        fetch_image("case_00300", cfg, 0, str(tmp_path / "case_00300" / "imaging.nii.gz"))
    with pytest.raises(CaseDataError, match=r"case_00350.*not a case of kits23"):
        fetch_label("case_00350", {**cfg, "source": "kits23"}, 0, str(tmp_path / "x.nii.gz"))
    assert not any(tmp_path.rglob("*"))


def test_phantom_fetch_writes_only_the_requested_file_and_files_agree(tmp_path):
    cfg = {"source": "phantom", "root": str(tmp_path), "phantom": SMALL_PHANTOM}
    case = list_cases(cfg)[2]
    fetch_label("case_00002", cfg, 7, case.label)
    assert sorted(p.name for p in (tmp_path / "case_00002").iterdir()) == ["segmentation.nii.gz"]
    fetch_image("case_00002", cfg, 7, case.image)
    assert sorted(p.name for p in (tmp_path / "case_00002").iterdir()) == ["imaging.nii.gz", "segmentation.nii.gz"]
    image, geometry = read_image(case.image, "case_00002")
    label, _ = read_label(case.label, "case_00002", (0, 1, 2), grid=geometry)  # same grid, labels 0-2
    assert image.dtype == np.int16 and label.dtype == np.uint8
    # the same (seed, index) gives the same case, also in a fresh generation
    other = tmp_path / "again.nii.gz"
    fetch_image("case_00002", cfg, 7, str(other))
    np.testing.assert_array_equal(read_image(other, "case_00002")[0], image)
    with pytest.raises(CaseDataError, match="case_00003"):
        fetch_image("case_00003", cfg, 7, str(tmp_path / "x.nii.gz"))


def test_fetch_case_generates_a_phantom_case_once_and_writes_both_files(tmp_path, monkeypatch):
    from kidney_seg.data import phantom, sources

    cfg = {"source": "phantom", "root": str(tmp_path), "phantom": SMALL_PHANTOM}
    case = list_cases(cfg)[1]
    sources._generate.cache_clear()
    made = []
    real = phantom.generate_case
    monkeypatch.setattr(phantom, "generate_case", lambda *a: made.append(a) or real(*a))
    fetch_case("case_00001", cfg, 7, case.image, case.label)
    assert len(made) == 1  # the image and the label come from one generation
    image, geometry = read_image(case.image, "case_00001")
    label, _ = read_label(case.label, "case_00001", (0, 1, 2), grid=geometry)
    expected = real(1, 7, phantom.PhantomParams.from_config(SMALL_PHANTOM))
    np.testing.assert_array_equal(image, expected.image)
    np.testing.assert_array_equal(label, expected.label)


def test_local_unlabelled_scans_are_predicted_by_default():
    cases = [Case("case_00000", "a.nii.gz", "a_seg.nii.gz"), Case("case_00001", "b.nii.gz", None)]
    labelled, unlabelled = select(cases, {"source": "local", "unlabelled_cases": None})
    assert [c.case_id for c in labelled] == ["case_00000"] and [c.case_id for c in unlabelled] == ["case_00001"]
    assert select(cases, {"source": "local", "unlabelled_cases": "none"})[1] == []
    assert select(cases, {"source": "kits19"})[1] == []
