"""DICOM CT series in, DICOM SEG out: kidney_seg/dicom.py and the DICOM paths of volume.py and the CLI.

The end-to-end check with the trained model (a series and a NIfTI of the same scan give the
same prediction; the SEG holds it) is in tests/test_workflow.py, beside the other tests of
the shared trained run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from kidney_seg import __version__
from kidney_seg.cli import case_name, main, scan_inputs
from kidney_seg.dicom import (
    has_dicom_magic,
    is_series_folder,
    read_series,
    read_series_header,
    series_files,
    write_seg,
    write_series,
)
from kidney_seg.errors import CaseDataError
from kidney_seg.volume import read_geometry, read_image, read_label, save_like
from tests.conftest import kits_affine, write_nifti

CLASSES = ["background", "kidney", "tumor"]


def ras_affine(spacing=(0.75, 0.75, 2.5), origin=(-100.0, 80.0, -300.0)) -> np.ndarray:
    """An axis-aligned RAS affine (DICOM's usual axial LPS grid: x and y flipped)."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def oblique_affine() -> np.ndarray:
    """A rotated grid (30 degrees about the slice normal, 10 about x) with unequal spacings."""
    a, b = np.radians(30), np.radians(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rx @ rz @ np.diag([0.7, 0.9, 3.0])
    affine[:3, 3] = [12.5, -40.0, 7.25]
    return affine


def ct(shape=(6, 5, 4), seed=0) -> np.ndarray:
    """A random int16 CT-like volume in HU."""
    return np.random.default_rng(seed).integers(-1024, 1500, size=shape).astype(np.int16)


@pytest.fixture
def series(tmp_path):
    """(folder, array, affine) of a small axial series, files renamed so that name order is not slice order."""
    array, affine = ct(), ras_affine()
    folder = tmp_path / "scan_a"
    paths = write_series(array, affine, folder)
    for i, p in enumerate(paths):
        p.rename(folder / f"IM{(7 * i) % len(paths)}")
    return folder, array, affine


def edit(path, **attributes) -> None:
    """Set attributes of one DICOM file in place (``file_meta__X`` for file meta elements)."""
    ds = pydicom.dcmread(path)
    for key, value in attributes.items():
        if key.startswith("file_meta__"):
            setattr(ds.file_meta, key.removeprefix("file_meta__"), value)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def sorted_files(folder):
    """The files of a series folder in slice order."""
    return [ds.filename for ds in read_series_header(folder).datasets]


# ----------------------------------------------------------------------------- reading and writing series


def test_round_trip_axial_int16(series):
    folder, array, affine = series
    volume, read_affine, datasets = read_series(folder)
    assert volume.dtype == np.int16 and volume.shape == array.shape
    np.testing.assert_array_equal(volume, array)
    np.testing.assert_array_equal(read_affine, affine)
    assert [int(ds.InstanceNumber) for ds in datasets] == [1, 2, 3, 4]  # sorted by position, not file name
    assert all("PixelData" not in ds for ds in datasets)
    ds = pydicom.dcmread(datasets[0].filename)
    assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert float(ds.RescaleIntercept) == -1024 and ds.PixelRepresentation == 0  # stored as uint16, rescaled on reading
    assert ds.PixelSpacing == [0.75, 0.75] and ds.ImageOrientationPatient == [1, 0, 0, 0, 1, 0]


def test_round_trip_oblique_with_slope_and_per_slice_intercepts(tmp_path):
    array = ct(seed=1).astype(np.float32) * 0.5  # multiples of the slope
    intercepts = [-1024.0, -1000.0, -1024.5, 0.0]
    write_series(array, oblique_affine(), tmp_path / "s", slope=0.5, intercept=intercepts)
    volume, affine, _ = read_series(tmp_path / "s")
    assert volume.dtype == np.float32
    np.testing.assert_array_equal(volume, array)
    np.testing.assert_allclose(affine, oblique_affine(), atol=1e-6)


def test_float_output_when_values_do_not_fit_int16(tmp_path):
    array = np.full((3, 3, 2), 40000, dtype=np.int32)
    array[0, 0, 0] = -1024
    write_series(array, ras_affine(), tmp_path / "s")
    volume, _, _ = read_series(tmp_path / "s")
    assert volume.dtype == np.float32 and np.array_equal(volume, array)


def test_slices_against_the_normal_read_back_reversed(tmp_path):
    array, affine = ct(seed=2), ras_affine()
    flipped = affine.copy()
    flipped[:3, 2] *= -1  # slice axis pointing against row x column cosines
    write_series(array, flipped, tmp_path / "s")
    volume, read_affine, _ = read_series(tmp_path / "s")
    np.testing.assert_array_equal(volume, array[:, :, ::-1])
    expected = flipped.copy()
    expected[:3, 3] = flipped[:3, :3] @ [0, 0, array.shape[2] - 1] + flipped[:3, 3]
    expected[:3, 2] *= -1
    np.testing.assert_allclose(read_affine, expected, atol=1e-9)


def test_write_series_is_atomic_and_refuses_an_existing_series(tmp_path, series):
    folder, array, affine = series
    with pytest.raises(FileExistsError, match="not empty"):
        write_series(array, affine, folder)
    with pytest.raises(ValueError, match="not integers"):
        write_series(array + 0.25, affine, tmp_path / "bad")
    sheared = affine.copy()
    sheared[0, 1] = 0.1
    with pytest.raises(ValueError, match="not orthogonal"):
        write_series(array, sheared, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and [p.name for p in tmp_path.iterdir()] == [folder.name]
    with pytest.raises(CaseDataError, match=r"no DICOM files in the folder \(each series folder is read alone\)"):
        read_image(tmp_path)


def test_is_series_folder(tmp_path, series):
    folder, _, _ = series
    assert is_series_folder(folder) and has_dicom_magic(next(folder.iterdir()))
    write_nifti(tmp_path / "n" / "scan.nii.gz", ct(), ras_affine())
    (tmp_path / "empty").mkdir()
    assert not is_series_folder(tmp_path / "n") and not is_series_folder(tmp_path / "empty")
    assert not is_series_folder(tmp_path / "n" / "scan.nii.gz") and not is_series_folder(tmp_path / "absent")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    shutil.copyfile(next(folder.iterdir()), hidden / ".IM0")
    shutil.copyfile(next(folder.iterdir()), hidden / "DICOMDIR")
    assert not is_series_folder(hidden) and series_files(hidden) == []


# ----------------------------------------------------------------------------- bad series


def _several_series(folder, tmp_path):
    write_series(ct(), ras_affine(), tmp_path / "other")
    shutil.copyfile(sorted(series_files(tmp_path / "other"))[0], folder / "stray.dcm")


def _missing_slice(folder, tmp_path):
    Path(sorted_files(folder)[2]).unlink()


def _uneven(folder, tmp_path):
    edit(sorted_files(folder)[1], ImagePositionPatient=[100.0, -80.0, -297.0])


def _not_ct(folder, tmp_path):
    for p in series_files(folder):
        edit(p, Modality="MR")


def _undecodable(folder, tmp_path):
    """The first slice's raw pixel data encapsulated and labelled JPEG 2000: no codec can decode it."""
    path = sorted_files(folder)[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)


def _iop(folder, tmp_path):
    edit(sorted_files(folder)[3], ImageOrientationPatient=[1, 0, 0, 0, 0.8, 0.6])


def _columns(folder, tmp_path):
    edit(sorted_files(folder)[3], Columns=7)


def _spacing(folder, tmp_path):
    edit(sorted_files(folder)[3], PixelSpacing=[0.75, 0.8])


def _one_slice(folder, tmp_path):
    for p in sorted_files(folder)[1:]:
        Path(p).unlink()


def _no_files(folder, tmp_path):
    for p in series_files(folder):
        p.unlink()
    (folder / ".hidden").write_text("x")


def _not_dicom(folder, tmp_path):
    (folder / "notes.txt").write_text("not DICOM")


def _same_position(folder, tmp_path):
    files = sorted_files(folder)
    edit(files[1], ImagePositionPatient=pydicom.dcmread(files[0]).ImagePositionPatient)


BAD = {
    "several series": (_several_series, r"holds 2 series: [0-9.]+ \(4 files\), [0-9.]+ \(1 files\)"),
    "missing slice": (_missing_slice, r"1 missing slice\(s\): the step from slice 1 .* is 5 mm, expected 2.5 mm"),
    "uneven spacing": (_uneven, r"uneven slice spacing: the step from slice \d .* expected 2.5 mm"),
    "not CT": (_not_ct, r"Modality MR, not CT"),
    "undecodable": (_undecodable, r"JPEG 2000 .*\(1.2.840.10008.1.2.4.90\) pixel data cannot be decoded"),
    "orientation": (_iop, r"ImageOrientationPatient differs across slices"),
    "columns": (_columns, r"Columns differs across slices: 6 in IM\d, 7 in IM\d"),
    "pixel spacing": (_spacing, r"PixelSpacing differs across slices: 0.75\\0.75 in IM\d, 0.75\\0.8 in IM\d"),
    "one slice": (_one_slice, r"a single slice .*need >= 2 slices"),
    "no files": (_no_files, r"no DICOM files in the folder"),
    "not DICOM": (_not_dicom, r"notes.txt is not a DICOM file"),
    "same position": (_same_position, r"lie at the same position"),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_series_give_one_line_errors_naming_case_and_folder(series, tmp_path, problem):
    folder, _, _ = series
    damage, pattern = BAD[problem]
    damage(folder, tmp_path)
    with pytest.raises(CaseDataError, match=pattern) as info:
        read_series(folder, "case_00007")
    message = str(info.value)
    assert message.startswith(f"case case_00007: {folder}: ") and "\n" not in message
    with pytest.raises(CaseDataError, match=pattern):  # the pipeline's reader says the same
        read_image(folder, "case_00007")


def test_undecodable_names_what_to_install(series, tmp_path):
    folder, _, _ = series
    _undecodable(folder, tmp_path)
    with pytest.raises(CaseDataError, match=r"install.*pylibjpeg.*openjpeg"):
        read_series(folder)


def test_syntax_without_a_decoder_is_refused_before_decoding(series, monkeypatch):
    folder, _, _ = series
    edit(sorted_files(folder)[0], file_meta__TransferSyntaxUID="1.2.3.4.5")
    with pytest.raises(CaseDataError, match=r"transfer syntax 1.2.3.4.5 pixel data cannot be decoded"):
        read_series_header(folder)


# ----------------------------------------------------------------------------- through volume.py


def test_read_image_of_a_series_equals_read_image_of_the_same_nifti(series, tmp_path):
    folder, array, affine = series
    nifti = write_nifti(tmp_path / "scan.nii.gz", array, affine)
    from_dicom, geometry = read_image(folder, "case_00001")
    from_nifti, nifti_geometry = read_image(nifti, "case_00001")
    assert from_dicom.dtype == from_nifti.dtype == np.int16
    np.testing.assert_array_equal(from_dicom, from_nifti)
    assert geometry == nifti_geometry == read_geometry(folder) == read_geometry(nifti)
    assert geometry.spacing == (2.5, 0.75, 0.75)


def test_labels_and_predictions_on_a_series_grid(series, tmp_path):
    folder, array, affine = series
    _, geometry = read_image(folder)
    labels = (array > 0).astype(np.uint8)
    read, _ = read_label(write_nifti(tmp_path / "seg.nii.gz", labels, affine), "c", (0, 1, 2), geometry)
    assert read.shape == geometry.internal_shape
    with pytest.raises(CaseDataError, match="grid mismatch"):
        read_label(write_nifti(tmp_path / "small.nii.gz", labels[1:], affine), "c", (0, 1, 2), geometry)
    with pytest.raises(CaseDataError, match=r"a folder, not a NIfTI file"):
        read_label(folder, "c", (0, 1, 2))
    save_like(tmp_path / "pred.nii.gz", labels, reference=folder)
    written = nib.load(tmp_path / "pred.nii.gz")
    np.testing.assert_array_equal(written.affine, affine)
    assert written.get_data_dtype() == np.uint8 and int(written.header["sform_code"]) == 1
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    with pytest.raises(ValueError, match="reference shape"):
        save_like(tmp_path / "bad.nii.gz", labels[1:], reference=folder)


# ----------------------------------------------------------------------------- DICOM SEG


def seg_labels(path, datasets) -> np.ndarray:
    """A SEG's label map in NIfTI layout, frames matched to the source slices by their SOP instance UIDs."""
    seg = hd.seg.segread(path)
    frames = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in datasets], combine_segments=True)
    return np.transpose(frames, (2, 1, 0))


@pytest.mark.parametrize("tumour", [True, False])
def test_seg_round_trip(series, tmp_path, tumour):
    folder, array, _ = series
    _, _, datasets = read_series(folder)
    labels = np.zeros(array.shape, np.uint8)
    labels[1:4, 1:3, 1:3] = 1
    labels[0, 4, 3] = 1  # on the last slice, in the last row
    if tumour:
        labels[2, 2, 2] = 2
    write_seg(labels, datasets, tmp_path / "seg.dcm", CLASSES, "test model")
    np.testing.assert_array_equal(seg_labels(tmp_path / "seg.dcm", datasets), labels)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY and list(seg.segment_numbers) == [1, 2]
    kidney, tumour_segment = seg.get_segment_description(1), seg.get_segment_description(2)
    assert (kidney.segmented_property_type.value, kidney.segmented_property_category.value) == ("64033007", "91723000")
    assert tumour_segment.segmented_property_type.value == "108369006"  # Neoplasm
    assert tumour_segment.segmented_property_category.value == "49755003"  # Morphologically Abnormal Structure
    assert [c.value for c in tumour_segment.anatomic_regions] == ["64033007"]
    assert {c.scheme_designator for c in seg.segmented_property_types} == {"SCT"}
    algorithm = kidney.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("kidney-seg", __version__)
    assert "test model" in algorithm.AlgorithmParameters
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == datasets[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in datasets
    }
    assert (
        seg.StudyInstanceUID == datasets[0].StudyInstanceUID
        and seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    )


def test_seg_frames_follow_the_source_positions_of_an_oblique_series(tmp_path):
    array = ct(seed=3)
    write_series(array, oblique_affine(), tmp_path / "s")
    _, _, datasets = read_series(tmp_path / "s")
    labels = (np.arange(array.size).reshape(array.shape) % 3).astype(np.uint8)
    write_seg(labels, datasets, tmp_path / "seg.dcm", CLASSES, "m")
    np.testing.assert_array_equal(seg_labels(tmp_path / "seg.dcm", datasets), labels)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame lies where the slice it references lies
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(position, by_uid[source.ReferencedSOPInstanceUID].ImagePositionPatient, atol=1e-4)


def test_write_seg_checks_its_inputs(series, tmp_path):
    folder, array, _ = series
    datasets = read_series_header(folder).datasets
    with pytest.raises(ValueError, match="do not match the series"):
        write_seg(np.zeros((5, 6, 4), np.uint8), datasets, tmp_path / "s.dcm", CLASSES, "m")
    with pytest.raises(ValueError, match="has no class name"):
        write_seg(np.full(array.shape, 3, np.uint8), datasets, tmp_path / "s.dcm", CLASSES, "m")
    with pytest.raises(ValueError, match="no SNOMED CT code for class 'liver'"):
        write_seg(np.zeros(array.shape, np.uint8), datasets, tmp_path / "s.dcm", ["background", "liver"], "m")
    assert not (tmp_path / "s.dcm").exists()


# ----------------------------------------------------------------------------- the CLI's inputs


def test_cli_finds_series_folders(tmp_path, series):
    folder, array, affine = series
    write_series(array, affine, tmp_path / "more" / "scan_b")
    write_nifti(tmp_path / "more" / "scan_c.nii.gz", array, kits_affine())
    assert scan_inputs([str(folder)]) == [folder]
    found = scan_inputs([str(tmp_path / "more")])
    assert [case_name(p) for p in found] == ["scan_c", "scan_b"]


def test_dicom_seg_output_refuses_nifti_inputs_before_predicting(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.keras").write_text("not loaded: the inputs are refused first")
    (model / "inference.json").write_text("{}")
    scan = write_nifti(tmp_path / "scan.nii.gz", ct(), ras_affine())
    argv = ["predict", str(model), str(scan), "-o", str(tmp_path / "out"), "--output-format", "dicom-seg"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--output-format dicom-seg needs DICOM series folders" in err and str(scan) in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
