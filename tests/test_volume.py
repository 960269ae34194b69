import errno
import gzip
import os
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest

from kidney_seg import volume
from kidney_seg.atomic import OutputWriteError, atomic_path
from kidney_seg.errors import CaseDataError
from kidney_seg.volume import (
    INTERNAL_AXCODES,
    from_internal,
    geometry_of,
    internal_affine,
    read_geometry,
    read_image,
    read_label,
    save_like,
)
from tests.conftest import kits_affine, write_nifti


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == target.parent
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x"


def test_kits_layout_is_already_internal(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    path = write_nifti(tmp_path / "img.nii.gz", data, kits_affine((3.0, 0.7, 0.8)))
    image, geometry = read_image(path)
    np.testing.assert_array_equal(image, data)
    assert geometry.spacing == pytest.approx((3.0, 0.7, 0.8))
    assert geometry.internal_shape == (4, 5, 6)


def ras_slices_last(data: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Re-express a KiTS-layout array (I, P, L) as RAS with slices on the last axis."""
    ras = np.flip(np.transpose(data, (2, 1, 0)), axis=(0, 1, 2))
    s0, s1, s2 = spacing
    return np.ascontiguousarray(ras), np.diag([s2, s1, s0, 1.0])


def test_ras_volume_maps_to_the_same_internal_array(tmp_path):
    data = np.random.default_rng(1).integers(0, 3, size=(4, 5, 6)).astype(np.uint8)
    ras, affine = ras_slices_last(data, (3.0, 0.7, 0.8))
    path = write_nifti(tmp_path / "ras.nii.gz", ras, affine)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    internal, geometry = read_label(path, "case_00001", (0, 1, 2))
    np.testing.assert_array_equal(internal, data)
    assert geometry == geometry_of(nib.load(str(path)))
    assert geometry.spacing == pytest.approx((3.0, 0.7, 0.8))
    np.testing.assert_array_equal(from_internal(internal, geometry), ras)


def test_save_like_keeps_grid_and_codes(tmp_path):
    affine = kits_affine((2.5, 0.9, 0.9))
    ref = write_nifti(tmp_path / "ref.nii.gz", np.zeros((3, 4, 5), np.int16), affine, qcode=1, scode=2)
    labels = np.ones((3, 4, 5), np.uint8)
    save_like(tmp_path / "pred.nii.gz", labels, ref)
    out = nib.load(str(tmp_path / "pred.nii.gz"))
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, affine)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels)


def test_truncated_gzip_names_case_and_file(tmp_path):
    path = write_nifti(tmp_path / "img.nii.gz", np.zeros((8, 16, 16), np.float32), kits_affine())
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CaseDataError, match=r"case_00007.*img\.nii\.gz.*truncated"):
        read_image(path, "case_00007")


def test_not_nifti_is_rejected(tmp_path):
    path = tmp_path / "img.nii.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"not a nifti header at all" * 20)
    with pytest.raises(CaseDataError, match="case_00003"):
        read_image(path, "case_00003")


def test_nan_image_is_rejected(tmp_path):
    data = np.zeros((2, 3, 4), np.float32)
    data[1, 1, 1] = np.nan
    path = write_nifti(tmp_path / "img.nii.gz", data, kits_affine())
    with pytest.raises(CaseDataError, match="NaN"):
        read_image(path, "case_00002")


def test_scl_slope_is_applied(tmp_path):
    img = nib.Nifti1Image(np.full((2, 3, 4), 10, np.int16), kits_affine())
    img.header.set_slope_inter(2.0, -5.0)
    nib.save(img, str(tmp_path / "img.nii.gz"))
    image, _ = read_image(tmp_path / "img.nii.gz")
    assert image.dtype == np.float32 and np.all(image == 15.0)


def test_wrong_label_values_and_grid(tmp_path):
    image_path = write_nifti(tmp_path / "img.nii.gz", np.zeros((2, 3, 4), np.float32), kits_affine())
    _, geometry = read_image(image_path, "case_00009")
    bad = write_nifti(tmp_path / "seg.nii.gz", np.full((2, 3, 4), 5, np.uint8), kits_affine())
    with pytest.raises(CaseDataError, match=r"case_00009.*seg\.nii\.gz.*unexpected label values \[5\]"):
        read_label(bad, "case_00009", (0, 1, 2), geometry)
    moved = write_nifti(tmp_path / "seg2.nii.gz", np.zeros((2, 3, 4), np.uint8), kits_affine((3.0, 0.9, 0.8)))
    with pytest.raises(CaseDataError, match="grid mismatch"):
        read_label(moved, "case_00009", (0, 1, 2), geometry)
    small = write_nifti(tmp_path / "seg3.nii.gz", np.zeros((2, 3, 5), np.uint8), kits_affine())
    with pytest.raises(CaseDataError, match="shape"):
        read_label(small, "case_00009", (0, 1, 2), geometry)


def test_a_label_on_the_same_grid_in_another_voxel_order_is_accepted(tmp_path):
    """Same voxels in the world, stored slices-last: one grid (compared in the internal orientation)."""
    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    _, geometry = read_image(write_nifti(tmp_path / "img.nii.gz", image, kits_affine()), "case_00009")
    label = (np.arange(24).reshape(2, 3, 4) % 3).astype(np.uint8)
    flipped = np.ascontiguousarray(np.transpose(label, (2, 1, 0))[:, :, ::-1])
    affine = kits_affine()[:, [2, 1, 0, 3]]
    affine[:3, 3] += affine[:3, 2] * (label.shape[0] - 1)  # the last slice first
    affine[:3, 2] *= -1
    path = write_nifti(tmp_path / "seg.nii.gz", flipped, affine)
    read, _ = read_label(path, "case_00009", (0, 1, 2), geometry)
    np.testing.assert_array_equal(read, label)
    affine[:3, 3] += 0.5  # half a millimetre off
    with pytest.raises(CaseDataError, match="grid mismatch: affine"):
        read_label(write_nifti(tmp_path / "moved.nii.gz", flipped, affine), "case_00009", (0, 1, 2), geometry)


def test_real_kits_headers_round_trip(kits_labels_dir, tmp_path):
    path = kits_labels_dir / "case_00037" / "segmentation.nii.gz"  # uint16 on disk
    img = nib.load(str(path))
    assert nib.aff2axcodes(img.affine) == ("I", "P", "L")
    label, geometry = read_label(path, "case_00037", (0, 1, 2))
    assert geometry.spacing == pytest.approx((5.0, 0.9375, 0.9375))
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1, 2}
    ras, affine = ras_slices_last(label, geometry.spacing)
    write_nifti(tmp_path / "ras.nii.gz", ras, affine)
    np.testing.assert_array_equal(read_label(tmp_path / "ras.nii.gz", "case_00037", (0, 1, 2))[0], label)
    save_like(tmp_path / "back.nii.gz", from_internal(label, geometry), path)
    back = nib.load(str(tmp_path / "back.nii.gz"))
    np.testing.assert_allclose(back.affine, img.affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(img.dataobj))


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    with atomic_path(tmp_path / "x.txt") as tmp:
        tmp.write_text("x")
    mode = (tmp_path / "x.txt").stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask


@pytest.mark.parametrize("shape", [(8, 9), (4, 5, 6, 2)])
def test_2d_and_4d_images_are_rejected(tmp_path, shape):
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), str(tmp_path / "img.nii.gz"))
    with pytest.raises(CaseDataError, match=r"case_00005.*img\.nii\.gz.*3D"):
        read_image(tmp_path / "img.nii.gz", "case_00005")


def test_inf_image_is_rejected(tmp_path):
    data = np.zeros((2, 3, 4), np.float32)
    data[0, 0, 0] = np.inf
    path = write_nifti(tmp_path / "img.nii.gz", data, kits_affine())
    with pytest.raises(CaseDataError, match="case_00006.*inf"):
        read_image(path, "case_00006")


def odd_layout(data):
    """Slices-last RAS-like layout with a flip: exercises the reoriented views."""
    arr = np.ascontiguousarray(np.transpose(data, (1, 0, 2))[:, :, ::-1])
    affine = np.array([[0, 0, 0.8, -10], [0.9, 0, 0, 5], [0, 2.5, 0, 100], [0, 0, 0, 1]], float)
    return arr, affine


def nibabel_internal(path) -> np.ndarray:
    """A file's scaled data reoriented to (I, P, L) by nibabel alone: the reference for the readers."""
    img = nib.load(str(path))
    transform = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("IPL"))
    return nib.orientations.apply_orientation(np.asanyarray(img.dataobj), transform)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_readers_match_nibabel_in_any_layout(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, (5, 12, 9)).astype(dtype)
    label = rng.integers(0, 3, (5, 12, 9)).astype(np.uint16)
    arr, affine = odd_layout(data)
    ip = write_nifti(tmp_path / f"img{suffix}", arr, affine)
    lp = write_nifti(tmp_path / f"seg{suffix}", odd_layout(label)[0], affine)
    image, geometry = read_image(ip, "case_00001")
    assert image.dtype == dtype and geometry == read_geometry(ip) == geometry_of(nib.load(str(ip)))
    np.testing.assert_array_equal(image, nibabel_internal(ip))
    lab, label_geometry = read_label(lp, "case_00001", (0, 1, 2), geometry)
    assert lab.dtype == np.uint8 and label_geometry == geometry
    np.testing.assert_array_equal(lab, nibabel_internal(lp))


def test_read_image_applies_scaling_in_float32(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, kits_affine())
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "x.nii.gz"))
    image, _ = read_image(tmp_path / "x.nii.gz", "case_00002")
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, data * 2.0 - 1024.0)


def test_read_label_rejects_bad_values_in_any_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(volume, "CHUNK_BYTES", 64)  # many chunks
    label = np.zeros((4, 6, 6), np.uint8)
    label[3, 5, 5] = 7
    lp = write_nifti(tmp_path / "seg.nii.gz", label, kits_affine())
    with pytest.raises(CaseDataError, match=r"case_00003.*seg\.nii\.gz.*unexpected label values \[7\]"):
        read_label(lp, "case_00003", (0, 1, 2))


@pytest.mark.parametrize(
    "dtype, value, labels, refused",
    [
        (np.uint8, 1, (0, 2), "[1]"),  # a gap in the allowed labels: inside the range, still refused
        (np.int16, -3, (0, 1, 2), "[-3]"),  # below the range in a signed file
        (np.uint16, 300, (0, 1, 2, 3), "[300]"),
        (np.uint8, 2, (0, 2), None),  # a gap that the file respects
        (np.int32, 3, (0, 1, 2, 3), None),
    ],
)
def test_read_label_checks_every_value_against_the_allowed_set(tmp_path, dtype, value, labels, refused):
    label = np.zeros((3, 5, 5), dtype)
    label[2, 4, 4] = value
    lp = write_nifti(tmp_path / "seg.nii.gz", label, kits_affine())
    if refused is None:
        assert read_label(lp, "case_00011", labels)[0].max() == value
    else:
        with pytest.raises(CaseDataError, match=rf"case_00011.*unexpected label values \{refused[:-1]}\]"):
            read_label(lp, "case_00011", labels)


def test_read_label_float_and_scaled_files(tmp_path):
    label = np.zeros((3, 6, 6), np.float32)
    label[1, 2, 2] = 1
    lp = write_nifti(tmp_path / "seg.nii.gz", label, kits_affine())
    np.testing.assert_array_equal(read_label(lp, "case_00007", (0, 1, 2))[0], label.astype(np.uint8))
    label[1, 2, 3] = 0.5
    write_nifti(lp, label, kits_affine())
    with pytest.raises(CaseDataError, match=r"case_00007.*seg\.nii\.gz.*non-integer"):
        read_label(lp, "case_00007", (0, 1, 2))
    img = nib.Nifti1Image(np.full((2, 3, 4), 3, np.int16), kits_affine())
    img.header.set_slope_inter(1.0, -1.0)  # stored 3 means label 2
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    assert np.all(read_label(tmp_path / "scaled.nii.gz", "case_00007", (0, 1, 2))[0] == 2)
    img.header.set_slope_inter(1.0, -10.0)
    nib.save(img, str(tmp_path / "negative.nii.gz"))
    with pytest.raises(CaseDataError, match=r"unexpected label values \[-7\]"):
        read_label(tmp_path / "negative.nii.gz", "case_00007", (0, 1, 2))


def _with_header(path, **fields):
    """Rewrite an uncompressed NIfTI file with some raw header fields changed."""
    img = nib.load(str(path))
    header = img.header.copy()
    for key, value in fields.items():
        header[key] = value
    blob = header.binaryblock + path.read_bytes()[len(header.binaryblock) :]
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("srow", ["zero", "nan", "rank2"])
def test_degenerate_affine_names_the_file(tmp_path, srow):
    """A zero, NaN or rank-deficient sform used to escape as nibabel's bare 'Unable to find out axis'."""
    path = write_nifti(tmp_path / "img.nii", np.zeros((2, 3, 4), np.int16), kits_affine())
    rows = {
        "zero": np.zeros((3, 4)),
        "nan": np.full((3, 4), np.nan),
        "rank2": np.array([[0, 0, -0.8, 0], [0, 0, -0.8, 0], [-3.0, 0, 0, 0]]),
    }[srow]
    _with_header(path, qform_code=0, sform_code=1, srow_x=rows[0], srow_y=rows[1], srow_z=rows[2])
    with pytest.raises(CaseDataError, match=r"case_00004.*img\.nii.*(degenerate|NaN|not a readable)"):
        read_image(path, "case_00004")


@pytest.mark.parametrize("pixdim", [np.nan, np.inf])
def test_bad_voxel_size_names_the_file(tmp_path, pixdim):
    path = write_nifti(tmp_path / "img.nii", np.zeros((2, 3, 4), np.int16), kits_affine(), qcode=1, scode=0)
    _with_header(path, pixdim=[1.0, 3.0, 0.8, pixdim, 1, 1, 1, 1])  # the qform's voxel sizes
    with pytest.raises(CaseDataError, match=r"case_00004.*img\.nii"):
        read_image(path, "case_00004")


def test_spacing_comes_from_the_affine(tmp_path):
    path = write_nifti(tmp_path / "img.nii", np.zeros((2, 3, 4), np.int16), kits_affine((2.5, 0.9, 0.7)), scode=1)
    _with_header(path, pixdim=[1.0, 7.0, 7.0, 7.0, 1, 1, 1, 1])  # disagrees with the sform in use
    assert read_geometry(path).spacing == pytest.approx((2.5, 0.9, 0.7))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_absurd_dimensions_are_refused_before_allocating(tmp_path, suffix):
    raw = write_nifti(tmp_path / "img.nii", np.zeros((2, 3, 4), np.int16), kits_affine())
    _with_header(raw, dim=[3, 32767, 32767, 32767, 1, 1, 1, 1])
    path = tmp_path / f"big{suffix}"
    path.write_bytes(gzip.compress(raw.read_bytes()) if suffix == ".nii.gz" else raw.read_bytes())
    with pytest.raises(CaseDataError, match=r"big\.nii.*(above the limit|truncated file or wrong header)"):
        read_image(path, "case_00004")
    _with_header(raw, dim=[3, 2, 3, 400, 1, 1, 1, 1])  # fits the limit, not the file
    with pytest.raises(CaseDataError, match=r"needs \d+ bytes.*truncated file or wrong header"):
        read_image(raw, "case_00004")


def test_4d_file_with_one_volume_reads_as_3d(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data[..., None], kits_affine()), str(tmp_path / "img.nii.gz"))
    image, geometry = read_image(tmp_path / "img.nii.gz", "case_00001")
    assert geometry.shape == (2, 3, 4)
    np.testing.assert_array_equal(image, data)


@pytest.mark.parametrize("shape", [(1, 16, 16), (4, 1, 16)])
def test_single_slice_volume_is_refused(tmp_path, shape):
    path = write_nifti(tmp_path / "img.nii.gz", np.zeros(shape, np.int16), kits_affine())
    with pytest.raises(CaseDataError, match=r"case_00009.*img\.nii\.gz.*single slice"):
        read_image(path, "case_00009")


def test_missing_file_names_case_and_file(tmp_path):
    with pytest.raises(CaseDataError, match=r"case_00001.*nope\.nii\.gz: file not found"):
        read_label(tmp_path / "nope.nii.gz", "case_00001", (0, 1, 2))


def test_internal_affine_has_the_internal_axis_codes():
    affine = internal_affine((0.5, 0.92, 0.92))
    assert nib.aff2axcodes(affine) == INTERNAL_AXCODES
    np.testing.assert_array_equal(affine, kits_affine((0.5, 0.92, 0.92)))


# ----------------------------------------------------------------------------- write errors name the output


@pytest.mark.parametrize(
    "code",
    [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO],
    ids=["ENOSPC", "EDQUOT", "EROFS", "EFBIG", "EIO"],
)
def test_write_error_names_the_output_keeps_errno_and_cause(tmp_path, code):
    target = tmp_path / "out" / "metrics.json"
    original = OSError(code, os.strerror(code))
    with pytest.raises(OutputWriteError) as info:
        with atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise original
    err = info.value
    assert isinstance(err, OSError) and err.errno == code and err.strerror == os.strerror(code)
    assert err.filename == str(target) and err.path == target
    assert str(target) in str(err) and os.strerror(code) in str(err)
    assert err.__cause__ is original
    assert list((tmp_path / "out").iterdir()) == []


def test_write_error_keeps_the_original_class(tmp_path):
    with pytest.raises(PermissionError) as info:
        with atomic_path(tmp_path / "x.csv"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert isinstance(info.value, OutputWriteError) and "x.csv" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"cannot write .*model\.keras.*best\.keras"):
        with atomic_path(tmp_path / "model.keras") as tmp:
            shutil.copyfile(tmp_path / "best.keras", tmp)  # the source is missing: the message names both
    assert list(tmp_path.iterdir()) == []


def test_write_error_pickles(tmp_path):
    with pytest.raises(OutputWriteError) as info:
        with atomic_path(tmp_path / "x.npy"):
            raise PermissionError(errno.EACCES, "Permission denied")
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is type(info.value) and str(back) == str(info.value) and back.errno == errno.EACCES


def test_existing_output_survives_a_failed_rewrite(tmp_path):
    target = tmp_path / "summary.csv"
    target.write_text("metric,mean\ndice,0.9\n")
    with pytest.raises(OutputWriteError, match="summary.csv"):
        with atomic_path(target) as tmp:
            tmp.write_text("metric,me")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "metric,mean\ndice,0.9\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


@pytest.mark.parametrize("stage", ["mkstemp", "fsync", "replace"])
def test_errors_outside_the_body_also_name_the_output(tmp_path, monkeypatch, stage):
    """Creating the temporary file, flushing it (where a deferred ENOSPC shows) and the rename."""
    import tempfile

    target = tmp_path / "pred.nii.gz"

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC if stage == "fsync" else errno.EROFS, "simulated")

    owner = {"mkstemp": (tempfile, "mkstemp"), "fsync": (os, "fsync"), "replace": (os, "replace")}[stage]
    monkeypatch.setattr(*owner, fail)
    with pytest.raises(OutputWriteError, match=r"cannot write .*pred\.nii\.gz") as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"complete")
    assert info.value.errno in (errno.ENOSPC, errno.EROFS)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_interrupt_passes_through_and_cleans_up(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "x.txt") as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name file descriptors")
def test_data_is_flushed_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    with atomic_path(tmp_path / "x.txt") as tmp:
        tmp.write_text("data")
    assert synced[0] == str(tmp) and synced[-1] == str(tmp_path)  # the file, then its folder after the rename


@pytest.mark.parametrize("full", [True, False])
def test_short_write_without_errno_on_a_full_disk_is_enospc(tmp_path, monkeypatch, full):
    """numpy's tofile (behind np.save) reports a short write as a bare OSError; on a full disk that is ENOSPC."""
    import types

    free = 0 if full else 1000
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_bavail=free, f_bfree=free))
    with pytest.raises(OutputWriteError, match=r"arr\.npy") as info:
        with atomic_path(tmp_path / "arr.npy") as tmp:
            tmp.write_bytes(b"\x93NUMPY")
            raise OSError("262144 requested and 131040 written")
    assert info.value.errno == (errno.ENOSPC if full else None)
    assert "262144 requested and 131040 written" in str(info.value)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
