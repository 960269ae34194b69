"""A bounded, seeded fuzz test of the NIfTI readers (:func:`read_image`, :func:`read_label`).

About 1,000 files are made in tmp_path by mutating small valid images and labels (.nii
and .nii.gz): random header bytes, the dim, datatype/bitpix, pixdim, qform/sform
(including zero and NaN affines), vox_offset and scl_slope/scl_inter fields, voxel data
bytes, gzip stream bytes, and truncations of both the raw and the compressed file.
Property: each file either loads (finite data of the geometry's shape, positive finite
spacing) or raises :class:`CaseDataError` whose message names the file; any other
exception is a failure, and so is a read that takes more than a few seconds.
"""

from __future__ import annotations

import gzip
import struct
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kidney_seg.errors import CaseDataError
from kidney_seg.volume import internal_affine, read_image, read_label

SEED = 20240607
FILES_PER_MUTATION = 90
MAX_READ_S = 5.0
CASE = "case_00042"
LABELS = (0, 1, 2)
HEADER_BYTES = 348

# NIfTI-1 header fields: (byte offset, struct format), little endian as nibabel writes them here.
DIM = (40, "<8h")
DATATYPE = (70, "<h")
BITPIX = (72, "<h")
PIXDIM = (76, "<8f")
VOX_OFFSET = (108, "<f")
SCL_SLOPE = (112, "<f")
SCL_INTER = (116, "<f")
QFORM_CODE = (252, "<h")
SFORM_CODE = (254, "<h")
QUATERN = (256, "<6f")  # quatern_b, c, d, qoffset_x, y, z
SROW = (280, "<12f")

ODD_INTS = (0, 1, -1, 2, 3, 7, 255, 256, 4096, 32767, -32768)
ODD_FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, 3.4e38, float("nan"), float("inf"), float("-inf"))
DATATYPES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 7, 9999)


def _base_volumes() -> dict[str, tuple[bytes, bool]]:
    """Uncompressed bytes of small valid volumes, and whether each is a label."""
    rng = np.random.default_rng(SEED)
    affine = internal_affine((3.0, 0.8, 0.7))
    label = rng.integers(0, 3, size=(4, 5, 6)).astype(np.uint8)
    ct = rng.integers(-1000, 1500, size=(4, 5, 6)).astype(np.int16)
    scaled = nib.Nifti1Image(ct, affine)
    scaled.header.set_slope_inter(0.5, -10.0)
    ras = nib.Nifti1Image(np.ascontiguousarray(np.transpose(ct, (2, 1, 0))), np.diag([0.7, 0.8, 3.0, 1.0]))
    images = {
        "label_u8": (nib.Nifti1Image(label, affine), True),
        "label_i16": (nib.Nifti1Image(label.astype(np.int16), affine), True),
        "ct_i16": (nib.Nifti1Image(ct, affine), False),
        "ct_f32": (nib.Nifti1Image(ct.astype(np.float32), affine), False),
        "ct_scaled": (scaled, False),
        "ct_ras": (ras, False),
    }
    for img, _ in images.values():
        img.set_qform(img.affine, 1)
        img.set_sform(img.affine, 1)
    return {name: (img.to_bytes(), is_label) for name, (img, is_label) in images.items()}


def _put(blob: bytearray, field: tuple[int, str], index: int, value) -> None:
    """Overwrite one element of a header field."""
    offset, fmt = field
    values = list(struct.unpack_from(fmt, blob, offset))
    values[index % len(values)] = value
    struct.pack_into(fmt, blob, offset, *values)


def _odd_float(rng: np.random.Generator) -> float:
    """A value that breaks float fields: special values or random magnitudes."""
    if rng.random() < 0.7:
        return float(rng.choice(ODD_FLOATS))
    return float(rng.normal() * 10.0 ** rng.integers(-5, 6))


def _header_bytes(rng, raw: bytearray) -> bytearray:
    for _ in range(int(rng.integers(1, 9))):
        raw[int(rng.integers(0, HEADER_BYTES))] = int(rng.integers(0, 256))
    return raw


def _dims(rng, raw: bytearray) -> bytearray:
    value = int(rng.choice(ODD_INTS)) if rng.random() < 0.8 else int(rng.integers(-32768, 32768))
    _put(raw, DIM, int(rng.integers(0, 8)), value)
    return raw


def _datatype(rng, raw: bytearray) -> bytearray:
    if rng.random() < 0.7:
        _put(raw, DATATYPE, 0, int(rng.choice(DATATYPES)))
    if rng.random() < 0.6:
        _put(raw, BITPIX, 0, int(rng.choice((0, 1, 8, 16, 32, 64, 128, 7, -8))))
    return raw


def _geometry(rng, raw: bytearray) -> bytearray:
    choice = int(rng.integers(0, 5))
    if choice == 0:  # a voxel size
        _put(raw, PIXDIM, int(rng.integers(0, 4)), _odd_float(rng))
    elif choice == 1:  # a degenerate sform: zero or NaN rows, the sform in use
        value = float(rng.choice((0.0, float("nan"))))
        for i in rng.choice(12, size=int(rng.integers(1, 13)), replace=False):
            _put(raw, SROW, int(i), value)
        _put(raw, SFORM_CODE, 0, 1)
    elif choice == 2:  # an sform element
        _put(raw, SROW, int(rng.integers(0, 12)), _odd_float(rng))
    elif choice == 3:  # the qform only: quaternion and offsets, with zero or odd pixdims
        _put(raw, SFORM_CODE, 0, 0)
        _put(raw, QUATERN, int(rng.integers(0, 6)), _odd_float(rng))
        if rng.random() < 0.5:
            _put(raw, PIXDIM, int(rng.integers(1, 4)), 0.0)
    else:  # the form codes
        _put(raw, QFORM_CODE, 0, int(rng.choice((0, 1, 2, 5, -1, 300))))
        _put(raw, SFORM_CODE, 0, int(rng.choice((0, 1, 2, 5, -1, 300))))
    return raw


def _vox_offset(rng, raw: bytearray) -> bytearray:
    options = (0.0, 1.0, 347.0, 348.0, 352.0, 353.0, 356.0, 1e9, -352.0, float("nan"), float("inf"))
    value = float(rng.choice(options)) if rng.random() < 0.8 else float(rng.integers(0, 2000))
    _put(raw, VOX_OFFSET, 0, value)
    return raw


def _scaling(rng, raw: bytearray) -> bytearray:
    _put(raw, SCL_SLOPE if rng.random() < 0.5 else SCL_INTER, 0, _odd_float(rng))
    return raw


def _data_bytes(rng, raw: bytearray) -> bytearray:
    for _ in range(int(rng.integers(1, 17))):
        raw[int(rng.integers(352, len(raw)))] = int(rng.integers(0, 256))
    return raw


def _truncate(rng, raw: bytearray) -> bytearray:
    return raw[: int(rng.integers(0, len(raw)))]


#: name -> mutation of the uncompressed file bytes (applied before compressing a .nii.gz).
RAW_MUTATIONS: dict[str, Callable[[np.random.Generator, bytearray], bytearray]] = {
    "header_bytes": _header_bytes,
    "dims": _dims,
    "datatype": _datatype,
    "geometry": _geometry,
    "vox_offset": _vox_offset,
    "scaling": _scaling,
    "data_bytes": _data_bytes,
    "truncate": _truncate,
}


def _gzip_bytes(rng, packed: bytearray) -> bytearray:
    for _ in range(int(rng.integers(1, 5))):
        packed[int(rng.integers(0, len(packed)))] = int(rng.integers(0, 256))
    return packed


#: name -> mutation of the compressed bytes of a .nii.gz.
GZ_MUTATIONS: dict[str, Callable[[np.random.Generator, bytearray], bytearray]] = {
    "gzip_bytes": _gzip_bytes,
    "gzip_truncate": _truncate,
}


def _make_files(folder: Path) -> list[tuple[Path, str, bool]]:
    """The mutated files: (path, what was done, made from a label)."""
    rng = np.random.default_rng(SEED)
    bases = _base_volumes()
    names = sorted(bases)
    files = []
    for kind in list(RAW_MUTATIONS) + list(GZ_MUTATIONS):
        for k in range(FILES_PER_MUTATION):
            base = names[k % len(names)]
            raw, is_label = bases[base]
            gz = kind in GZ_MUTATIONS or rng.random() < 0.5
            blob = bytes(RAW_MUTATIONS[kind](rng, bytearray(raw))) if kind in RAW_MUTATIONS else raw
            if gz:
                blob = gzip.compress(blob, mtime=0)
                if kind in GZ_MUTATIONS:
                    blob = bytes(GZ_MUTATIONS[kind](rng, bytearray(blob)))
            path = folder / f"{kind}_{k:03d}_{base}.nii{'.gz' if gz else ''}"
            path.write_bytes(blob)
            files.append((path, f"{kind} of {base}", is_label))
    return files


def _check_outcome(path: Path, read: Callable[[], tuple[np.ndarray, object]]) -> tuple[str | None, bool]:
    """(what went wrong or None, whether it loaded); ``read`` must load or raise a CaseDataError naming ``path``."""
    start, loaded = time.perf_counter(), False
    try:
        array, geometry = read()
    except CaseDataError as exc:
        problem = None if str(path) in str(exc) else f"CaseDataError without the path: {exc}"
    except Exception as exc:  # anything else is a reader bug
        problem = f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_tb(exc.__traceback__)[-3:])}"
    else:
        problem, loaded = None, True
        if tuple(array.shape) != tuple(geometry.internal_shape):
            problem = f"shape {array.shape} != geometry {geometry.internal_shape}"
        elif array.dtype.kind == "f" and not np.isfinite(array).all():
            problem = "loaded non-finite data"
        elif not all(np.isfinite(s) and s > 0 for s in geometry.spacing):
            problem = f"loaded bad spacing {geometry.spacing}"
    elapsed = time.perf_counter() - start
    if elapsed > MAX_READ_S:
        problem = f"read took {elapsed:.1f} s" + (f"; {problem}" if problem else "")
    return problem, loaded


@pytest.mark.timeout(120)
def test_mutated_files_load_or_raise_case_data_error_naming_the_file(tmp_path):
    files = _make_files(tmp_path)
    assert len(files) == FILES_PER_MUTATION * (len(RAW_MUTATIONS) + len(GZ_MUTATIONS)) >= 900
    failures, loaded = [], 0
    for path, what, is_label in files:
        readers = [("read_image", lambda p=path: read_image(p, CASE))]
        if is_label:
            readers.append(("read_label", lambda p=path: read_label(p, CASE, LABELS)))
        for name, read in readers:
            problem, ok = _check_outcome(path, read)
            loaded += ok and name == "read_image"
            if problem:
                failures.append(f"{name}({path.name}) [{what}]: {problem}")
    assert not failures, f"{len(failures)} of {len(files)} files broke the readers:\n" + "\n".join(failures[:15])
    assert 0.05 * len(files) < loaded < 0.95 * len(files), (
        f"{loaded} of {len(files)} loaded: mutations too mild or harsh"
    )


def test_bases_load_exactly(tmp_path):
    """The unmutated bases load, as .nii and .nii.gz, with the values written."""
    for name, (raw, is_label) in _base_volumes().items():
        for suffix, blob in ((".nii", raw), (".nii.gz", gzip.compress(raw))):
            path = tmp_path / f"{name}{suffix}"
            path.write_bytes(blob)
            image, geometry = read_image(path, CASE)
            assert geometry.internal_shape == (4, 5, 6) and geometry.spacing == pytest.approx((3.0, 0.8, 0.7))
            if is_label:
                label, _ = read_label(path, CASE, LABELS, grid=geometry)
                np.testing.assert_array_equal(label, image)
