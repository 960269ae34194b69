"""The one home of volumes (NIfTI files, DICOM series folders): reading, writing, geometry, internal orientation.

Internal orientation: every volume is reoriented to the KiTS19 convention, axis codes
(I, P, L). Axis 0 is then the slice axis: the voxel axis whose direction is closest to
the patient's superior-inferior axis (nibabel's ``io_orientation`` picks, for each voxel
axis, the world axis it is most aligned with). In-plane axes follow as posterior and
left. What is needed to go back (the orientation transform and original shape) is kept
in a :class:`Geometry`, so predictions are written on the input file's exact grid.

Readers: :func:`read_image` (CT) and :func:`read_label` (labels, predictions) are the
only ways the project reads voxel data; :func:`read_geometry` reads a header alone.
Every problem with a file (missing, unreadable header, corrupt or truncated gzip stream,
not 3D, fewer than 2 voxels along an axis, a size the file cannot hold, a NaN or
degenerate affine, bad voxel sizes, NaN or inf values, label values outside the allowed
set, another grid than the image's) raises :class:`CaseDataError` naming the case and
the file. Reading is lean: a .nii.gz is decompressed once, in pieces, straight into one
array in the file's own dtype and memory layout (its CRC is checked on the way), a .nii
is memory-mapped, and the result is a reoriented *view* of that array (no float32 or
C-order copy of the whole scan). Checks stream over the data in chunks along the axis
with the largest stride (:func:`chunks`), so they stay cache-friendly whatever the layout.

DICOM: wherever a CT image file is accepted (:func:`read_image`, :func:`read_geometry`,
the ``reference`` of :func:`save_like`), a folder holding one CT series is accepted too.
:func:`kidney_seg.dicom.read_series` reads it into NIfTI layout with its RAS affine (an
in-memory ``Nifti1Image``), and from there it goes through the same checks and
reorientation as a file; a prediction for a series is written as a NIfTI with that
affine. Label volumes are NIfTI files only.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from kidney_seg.atomic import atomic_path
from kidney_seg.errors import CaseDataError

INTERNAL_AXCODES: tuple[str, str, str] = ("I", "P", "L")
#: Largest volume read, in voxels (a KiTS scan has at most ~1.6e8): a header claiming more is refused.
MAX_VOXELS = 1 << 31
#: deflate expands data at most ~1032-fold, so a .nii.gz of n bytes holds at most this many times n bytes.
MAX_DEFLATE_RATIO = 1032
#: Work arrays of about this size when streaming over a volume.
CHUNK_BYTES = 32 << 20
_GZIP_PIECE = 16 << 20  # bytes decompressed per read into the final array


@dataclass(frozen=True)
class Geometry:
    """Where a volume came from and how to put an internal array back on its grid."""

    shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]
    transform: tuple[tuple[float, float], ...]
    spacing: tuple[float, float, float]

    def to_dict(self) -> dict:
        """A JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        """Inverse of :meth:`to_dict`."""
        return cls(
            shape=tuple(int(v) for v in d["shape"]),
            affine=tuple(tuple(float(v) for v in row) for row in d["affine"]),
            transform=tuple((float(a), float(b)) for a, b in d["transform"]),
            spacing=tuple(float(v) for v in d["spacing"]),
        )

    @property
    def internal_world_affine(self) -> np.ndarray:
        """The world affine of the volume in the internal orientation (the same grid, internal voxel order)."""
        return np.asarray(self.affine) @ ornt.inv_ornt_aff(np.asarray(self.transform), self.shape)

    @property
    def internal_shape(self) -> tuple[int, int, int]:
        """Shape of the volume in the internal orientation."""
        order = [int(a) for a, _ in self.transform]
        out = [0, 0, 0]
        for src, dst in enumerate(order):
            out[dst] = self.shape[src]
        return tuple(out)


# --------------------------------------------------------------------------- orientation


def internal_affine(spacing: Sequence[float]) -> np.ndarray:
    """The affine of a grid laid out in the internal (I, P, L) orientation, with ``spacing`` and no translation."""
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for voxel_axis, (world_axis, flip) in enumerate(ornt.axcodes2ornt(INTERNAL_AXCODES)):
        affine[int(world_axis), voxel_axis] = flip * float(spacing[voxel_axis])
    return affine


def geometry_of(img: nib.Nifti1Image) -> Geometry:
    """The grid of an image, spacing taken from its affine; ValueError when the affine is degenerate or not finite."""
    return grid_geometry(img.shape[:3], img.affine)


def grid_geometry(shape: Sequence[int], affine: np.ndarray) -> Geometry:
    """The grid of a volume of ``shape`` with ``affine`` (see :func:`geometry_of`)."""
    affine = np.asarray(affine, dtype=float)
    if not np.all(np.isfinite(affine)):
        raise ValueError("affine contains NaN or inf")
    current = ornt.io_orientation(affine)
    if np.isnan(current).any():
        raise ValueError("degenerate affine: some voxel axes have no direction in space")
    transform = ornt.ornt_transform(current, ornt.axcodes2ornt(INTERNAL_AXCODES))
    zooms = [float(z) for z in nib.affines.voxel_sizes(affine)]  # the affine's own, whatever pixdim says
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise ValueError(f"voxel sizes {zooms} must be positive and finite")
    spacing = [0.0, 0.0, 0.0]
    for src, (dst, _) in enumerate(transform):
        spacing[int(dst)] = zooms[src]
    return Geometry(
        shape=tuple(int(s) for s in shape[:3]),
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        transform=tuple((float(a), float(b)) for a, b in transform),
        spacing=tuple(spacing),
    )


def to_internal(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The internal (I, P, L) view of a file-layout array (flips and a transpose: no copy)."""
    return ornt.apply_orientation(array, np.asarray(geometry.transform))


def from_internal(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Put an internal-layout array back into the file's own layout (C-order copy)."""
    inverse = ornt.ornt_transform(ornt.axcodes2ornt(INTERNAL_AXCODES), ornt.io_orientation(np.asarray(geometry.affine)))
    out = np.ascontiguousarray(ornt.apply_orientation(array, inverse))
    if out.shape != geometry.shape:
        raise ValueError(f"shape {out.shape} after reorientation differs from the original {geometry.shape}")
    return out


def check_same_grid(a: Geometry, b: Geometry, case_id: str | None, path: object, atol: float = 1e-3) -> None:
    """Raise unless two volumes lie on one grid: the same voxels in the world (within ``atol`` mm).

    The voxel order may differ (a label stored slices-first beside a DICOM series read
    slices-last): both are compared in the internal orientation, where every stage reads them.
    """
    if tuple(a.internal_shape) != tuple(b.internal_shape):
        raise CaseDataError(case_id, path, f"grid mismatch: shape {b.shape} != image shape {a.shape}")
    if not np.allclose(a.internal_world_affine, b.internal_world_affine, atol=atol):
        raise CaseDataError(case_id, path, "grid mismatch: affine differs from the image's affine")


# --------------------------------------------------------------------------- chunked streaming


def chunk_axis(array: np.ndarray) -> int:
    """The axis with the largest stride: chunks along it are contiguous blocks of memory."""
    return int(np.argmax([abs(s) if n > 1 else 0 for s, n in zip(array.strides, array.shape)]))


def chunks(array: np.ndarray, axis: int | None = None, nbytes: int | None = None) -> Iterator[tuple[int, slice]]:
    """(axis, slice) pairs splitting ``array`` into blocks of about ``nbytes`` (:data:`CHUNK_BYTES`) along ``axis``.

    The default axis is :func:`chunk_axis`, the one with the largest stride.
    """
    axis = chunk_axis(array) if axis is None else axis
    nbytes = CHUNK_BYTES if nbytes is None else nbytes
    n = array.shape[axis]
    per = max(1, array.nbytes // max(n, 1))
    step = max(1, nbytes // per)
    for start in range(0, n, step):
        yield axis, slice(start, min(start + step, n))


def take(array: np.ndarray, axis: int, sl: slice | np.ndarray) -> np.ndarray:
    """``array`` indexed by ``sl`` along ``axis``."""
    index = [slice(None)] * array.ndim
    index[axis] = sl
    return array[tuple(index)]


# --------------------------------------------------------------------------- reading


def _open(path: Path, case_id: str | None) -> tuple[nib.Nifti1Image, Geometry]:
    """A NIfTI file's header, checked (3D, voxel type, size, affine, voxel sizes); no voxel data is read."""
    if path.is_dir():
        raise CaseDataError(
            case_id, path, "a folder, not a NIfTI file (DICOM series folders are read as CT images only)"
        )
    if not path.is_file():
        raise CaseDataError(case_id, path, "file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel and gzip raise many types for bad headers and streams
        reason = _gzip_problem(path) or f"not a readable NIfTI file ({type(exc).__name__}: {exc})"
        raise CaseDataError(case_id, path, reason) from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise CaseDataError(case_id, path, f"not a NIfTI file (read as {type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise CaseDataError(case_id, path, f"expected a 3D volume, got shape {shape}")
    check_extent(shape[:3], case_id, path)
    _check_data_header(img, path, case_id)
    try:
        geometry = geometry_of(img)
    except ValueError as exc:
        raise CaseDataError(case_id, path, str(exc)) from exc
    return img, geometry


def _gzip_problem(path: Path) -> str | None:
    """Why a .nii.gz file's gzip stream is unreadable (corrupt or truncated), or None."""
    if not path.name.endswith(".gz"):
        return None
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(_GZIP_PIECE):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        return f"corrupt or truncated gzip stream ({type(exc).__name__}: {exc})"
    return None


def check_extent(shape: tuple[int, ...], case_id: str | None, path: object) -> None:
    """Refuse an empty or single-slice volume (nothing to resample or segment), naming the case and file."""
    if min(shape) < 2:
        raise CaseDataError(
            case_id, path, f"volume of shape {tuple(shape)} is empty or a single slice; need >= 2 voxels per axis"
        )


def _check_data_header(img: nib.Nifti1Image, path: Path, case_id: str | None) -> None:
    """Refuse a voxel type that is not real numbers, and a size above the limit or beyond what the file can hold."""
    try:
        dtype = np.dtype(img.get_data_dtype())
        offset = int(img.dataobj.offset)
    except Exception as exc:
        raise CaseDataError(case_id, path, f"unreadable data type or offset in the header ({exc})") from exc
    if dtype.kind not in "uif":
        raise CaseDataError(case_id, path, f"unsupported voxel type {dtype}")
    n = math.prod(int(s) for s in img.shape)
    if n > MAX_VOXELS:
        raise CaseDataError(case_id, path, f"header shape {img.shape} has {n} voxels, above the limit of {MAX_VOXELS}")
    needed = offset + n * dtype.itemsize
    size = path.stat().st_size
    compressed = path.name.endswith(".gz")
    if needed > size * (MAX_DEFLATE_RATIO if compressed else 1):
        most = size * MAX_DEFLATE_RATIO
        what = f"a {size}-byte gzip file holds at most {most}" if compressed else f"the file has {size}"
        raise CaseDataError(
            case_id,
            path,
            f"header shape {img.shape} of {dtype} at offset {offset} needs {needed} "
            f"bytes, but {what}: truncated file or wrong header",
        )


def _read_gzip(path: Path, proxy, case_id: str | None) -> np.ndarray:
    """Voxel data of a .nii.gz decompressed once, in pieces, straight into one array; the CRC is checked too.

    nibabel reads a gzip stream with ``readinto`` on the whole buffer, which CPython's
    GzipFile implements as read-then-copy: a transient second copy of the volume.
    """
    order = "F" if str(proxy.order).upper() == "F" else "C"
    arr = np.empty(tuple(int(s) for s in proxy.shape), dtype=np.dtype(proxy.dtype), order=order)
    view = memoryview(arr.reshape(-1, order=order)).cast("B")
    try:
        with gzip.open(path, "rb") as fh:
            fh.seek(int(proxy.offset))
            pos, total = 0, view.nbytes
            while pos < total:
                n = fh.readinto(view[pos : min(pos + _GZIP_PIECE, total)])
                if not n:
                    raise CaseDataError(case_id, path, f"truncated: expected {total} bytes of voxel data, got {pos}")
                pos += n
            while fh.read(1 << 20):  # the rest of the stream, so that its CRC and length are checked
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise CaseDataError(case_id, path, f"corrupt or truncated gzip stream ({type(exc).__name__}: {exc})") from exc
    return arr


def _voxels(img: nib.Nifti1Image, path: Path, case_id: str | None) -> tuple[np.ndarray, float, float]:
    """Voxel data in the file's own dtype and layout (3D), with the NIfTI slope and intercept."""
    proxy = img.dataobj
    try:
        raw = _read_gzip(path, proxy, case_id) if path.name.endswith(".gz") else np.asanyarray(proxy.get_unscaled())
        slope, inter = float(proxy.slope), float(proxy.inter)
    except CaseDataError:
        raise
    except Exception as exc:
        raise CaseDataError(case_id, path, f"cannot read voxel data ({type(exc).__name__}: {exc})") from exc
    if not (math.isfinite(slope) and math.isfinite(inter)):
        raise CaseDataError(case_id, path, f"invalid scaling slope={slope} inter={inter}")
    return raw[(Ellipsis,) + (0,) * (raw.ndim - 3)], slope, inter


def _check_finite(array: np.ndarray, case_id: str | None, path: object) -> None:
    """Raise when a float array holds NaN or inf (checked in chunks)."""
    if array.dtype.kind != "f":
        return
    for axis, sl in chunks(array):
        if not np.isfinite(take(array, axis, sl)).all():
            raise CaseDataError(case_id, path, "voxel data contains NaN or inf")


def _series_geometry(shape: Sequence[int], affine: np.ndarray, case_id: str | None, path: Path) -> Geometry:
    """The checked geometry of a DICOM series: extent, size, affine and voxel sizes, as :func:`_open` checks a file."""
    shape = tuple(int(s) for s in shape)
    check_extent(shape, case_id, path)
    n = math.prod(shape)
    if n > MAX_VOXELS:
        raise CaseDataError(case_id, path, f"series of shape {shape} has {n} voxels, above the limit of {MAX_VOXELS}")
    try:
        return grid_geometry(shape, affine)
    except ValueError as exc:
        raise CaseDataError(case_id, path, str(exc)) from exc


def _read_series_image(path: Path, case_id: str | None) -> tuple[np.ndarray, Geometry]:
    """A DICOM series folder as (file-layout HU volume, geometry), via an in-memory NIfTI image of it."""
    from kidney_seg.dicom import read_series, read_series_header

    header = read_series_header(path, case_id)
    _series_geometry(header.shape, header.affine, case_id, path)  # refuse a bad grid before decoding any pixels
    array, affine, _ = read_series(path, case_id, header=header)
    img = nib.Nifti1Image(array, affine)
    return np.asanyarray(img.dataobj), _series_geometry(img.shape, img.affine, case_id, path)


def read_geometry(path: str | os.PathLike, case_id: str | None = None) -> Geometry:
    """The checked geometry of a NIfTI file, from its header alone, or of a DICOM series folder, from its headers."""
    path = Path(path)
    if path.is_dir():
        from kidney_seg.dicom import read_series_header

        header = read_series_header(path, case_id)
        return _series_geometry(header.shape, header.affine, case_id, path)
    return _open(path, case_id)[1]


def read_image(path: str | os.PathLike, case_id: str | None = None) -> tuple[np.ndarray, Geometry]:
    """A CT volume (NIfTI file or DICOM series folder) in the internal orientation (read-only use), and its geometry.

    No second copy of the scan is made: files without scaling come back in their own
    dtype (int16 CT is half the size of float32) as a reoriented view; files with a
    slope/intercept, or floats wider than 32 bits, are converted in chunks to one
    float32 array. Callers must not write into the result.
    """
    path = Path(path)
    if path.is_dir():
        raw, geometry = _read_series_image(path, case_id)
        slope, inter = 1.0, 0.0  # read_series applied each slice's rescale
    else:
        img, geometry = _open(path, case_id)
        raw, slope, inter = _voxels(img, path, case_id)
        del img
    _check_finite(raw, case_id, path)
    internal = to_internal(raw, geometry)
    if (slope, inter) == (1.0, 0.0) and not (raw.dtype.kind == "f" and raw.dtype.itemsize > 4):
        return internal, geometry
    out = np.empty(internal.shape, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is refused just below
        for _, sl in chunks(out, axis=0):
            block = out[sl]
            block[...] = internal[sl]
            if slope != 1.0:
                block *= np.float32(slope)
            if inter != 0.0:
                block += np.float32(inter)
    _check_finite(out, case_id, path)
    return out, geometry


def _integer_values(raw: np.ndarray) -> set[int]:
    """Distinct values of an integer array, streamed in chunks (no full-size temporaries)."""
    found: set[int] = set()
    small = raw.dtype.itemsize <= 2 and (raw.dtype.kind == "u" or raw.min() >= 0)
    for axis, sl in chunks(raw, nbytes=CHUNK_BYTES // 4):
        block = take(raw, axis, sl).ravel(order="K")
        found.update((np.flatnonzero(np.bincount(block)) if small else np.unique(block)).tolist())
    return {int(v) for v in found}


def _within_gapless_labels(raw: np.ndarray, labels: tuple[int, ...]) -> bool:
    """Whether an integer array holds only values of ``labels`` where those form one gapless range (0, 1, 2):
    a min/max check in chunks, about 10x faster than gathering the distinct values; False tells nothing."""
    lo, hi = min(labels), max(labels)
    if set(labels) != set(range(lo, hi + 1)):
        return False
    check_min = raw.dtype.kind == "i" or lo > 0
    for axis, sl in chunks(raw):
        block = take(raw, axis, sl)
        if block.max() > hi or (check_min and block.min() < lo):
            return False
    return True


def _scaled_labels(
    raw: np.ndarray, slope: float, inter: float, case_id: str | None, path: object
) -> tuple[np.ndarray, set[int]]:
    """A float or scaled label file as uint8 (values clipped to 0-255) and its distinct values; non-integers raise."""
    out = np.empty_like(raw, dtype=np.uint8)
    found: set[int] = set()
    for axis, sl in chunks(raw, nbytes=CHUNK_BYTES // 8):
        block = take(raw, axis, sl).astype(np.float64) * slope + inter
        if not np.isfinite(block).all():
            raise CaseDataError(case_id, path, "voxel data contains NaN or inf")
        if not (block == np.round(block)).all():
            raise CaseDataError(case_id, path, "label volume holds non-integer values")
        found.update(int(v) for v in np.unique(block).tolist())
        take(out, axis, sl)[...] = np.clip(block, 0, 255)
    return out, found


def _check_label_values(found: set[int], labels: tuple[int, ...], case_id: str | None, path: object) -> None:
    """Raise unless every value found is an allowed label (the one place that refuses label values)."""
    bad = sorted(found - {int(v) for v in labels})
    if bad:
        shown = bad if len(bad) <= 10 else bad[:10] + ["..."]
        raise CaseDataError(case_id, path, f"unexpected label values {shown}; allowed {list(labels)}")


def read_label(
    path: str | os.PathLike, case_id: str | None, labels: tuple[int, ...], grid: Geometry | None = None
) -> tuple[np.ndarray, Geometry]:
    """A label volume as uint8 in the internal orientation, and its geometry.

    Checks: integer values among ``labels``, and the grid (shape and affine) of ``grid``
    when given (which may be a DICOM series' geometry, from :func:`read_image` or
    :func:`read_geometry`). Integer files are checked in chunks in their own dtype and come
    back as a view where the file is uint8. Labels are NIfTI files: a folder is refused.
    Callers must not write into the result.
    """
    labels = tuple(int(v) for v in labels)
    if not labels or min(labels) < 0 or max(labels) > 255:
        raise ValueError(f"label values must lie in 0-255, got {labels}")
    path = Path(path)
    img, geometry = _open(path, case_id)
    if grid is not None:
        check_same_grid(grid, geometry, case_id, path)
    raw, slope, inter = _voxels(img, path, case_id)
    del img
    if raw.dtype.kind in "ui" and (slope, inter) == (1.0, 0.0):
        out, found = raw, set(labels) if _within_gapless_labels(raw, labels) else _integer_values(raw)
    else:
        out, found = _scaled_labels(raw, slope, inter, case_id, path)
    _check_label_values(found, labels, case_id, path)
    if out.dtype != np.uint8:
        out = out.astype(np.uint8, order="K")
    return to_internal(out, geometry), geometry


# --------------------------------------------------------------------------- writing


def save_like(path: str | os.PathLike, array: np.ndarray, reference: str | os.PathLike, dtype=np.uint8) -> None:
    """Write ``array`` (file layout) atomically with the reference file's affine and codes.

    A DICOM series folder as ``reference`` gives a new NIfTI with the series' RAS affine
    (qform and sform codes scanner), ``array`` being in the layout :func:`read_image` read it in.
    """
    if Path(reference).is_dir():
        from kidney_seg.dicom import read_series_header

        series = read_series_header(reference)
        if tuple(array.shape) != series.shape:
            raise ValueError(f"array shape {array.shape} != reference shape {series.shape} ({reference})")
        save_nifti(path, np.asarray(array), series.affine, dtype=dtype)
        return
    ref = nib.load(str(reference))
    if tuple(array.shape) != tuple(ref.shape[:3]):
        raise ValueError(f"array shape {array.shape} != reference shape {ref.shape[:3]} ({reference})")
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(np.asarray(array, dtype=dtype), ref.affine, header=header)
    qform, qcode = ref.header.get_qform(coded=True)
    sform, scode = ref.header.get_sform(coded=True)
    out.set_qform(qform if qform is not None else ref.affine, int(qcode or 0))
    out.set_sform(sform if sform is not None else ref.affine, int(scode or 0))
    out.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(out, str(tmp))


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype=None) -> None:
    """Write a new NIfTI atomically, with qform and sform codes set to scanner (1)."""
    data = np.asarray(array if dtype is None else array.astype(dtype))
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=float))
    img.set_qform(np.asarray(affine, dtype=float), 1)
    img.set_sform(np.asarray(affine, dtype=float), 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
