"""NIfTI reading and writing, the internal orientation, and atomic writes.

Internal orientation: every volume is reoriented to the KiTS19 convention, axis codes
(I, P, L). Axis 0 is then the slice axis: the voxel axis whose direction is closest to
the patient's superior-inferior axis (nibabel's ``io_orientation`` picks, for each voxel
axis, the world axis it is most aligned with). In-plane axes follow as posterior and
left. What is needed to go back (the orientation transform and original shape) is kept
in a :class:`Geometry`, so predictions are written on the input file's exact grid.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from kidney_seg.errors import CaseDataError

INTERNAL_AXCODES: tuple[str, str, str] = ("I", "P", "L")


def _umask() -> int:
    """The process umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputWriteError(OSError):
    """An output file could not be written (disk full, quota, read-only file system...).

    The message names the final output path; ``errno`` and ``strerror`` are the original
    error's, ``filename`` is the final path and ``__cause__`` the original exception. An
    instance is also an instance of the original error's class (e.g. ``PermissionError``),
    so existing ``except`` clauses keep working.
    """

    def __init__(self, path: str | os.PathLike, cause: OSError, stage: str = "writing"):
        super().__init__(cause.errno, cause.strerror or str(cause), os.fspath(path))
        self.path = Path(path)
        self.cause = cause
        self.stage = stage

    def __reduce__(self):  # picklable (e.g. across worker processes), dynamic subclasses included
        base = type(self.cause)
        return _rebuild_write_error, (base, self.filename, self.errno, self.strerror, self.stage)

    def __str__(self) -> str:
        code = f"[Errno {self.errno}] " if self.errno is not None else ""
        detail = f"{code}{self.strerror}"
        other = getattr(self.cause, "filename", None)
        if other is not None and not Path(os.fspath(other)).name.startswith(f".{self.path.name}."):
            detail += f" ({os.fspath(other)})"  # the error concerns another file, e.g. a copy's source
        return f"cannot write {self.filename}: {detail} (while {self.stage}; the file was left unchanged)"


_ERROR_TYPES: dict[type, type] = {}


def _write_error(path: Path, cause: OSError, stage: str) -> OutputWriteError:
    """An :class:`OutputWriteError` that is also of ``cause``'s own OSError subclass."""
    base = type(cause)
    if base is OSError or issubclass(base, OutputWriteError):
        cls: type = OutputWriteError
    else:
        cls = _ERROR_TYPES.get(base)
        if cls is None:
            try:
                cls = type(f"OutputWriteError_{base.__name__}", (OutputWriteError, base), {"__module__": __name__})
            except TypeError:  # an OSError subclass that cannot be combined
                cls = OutputWriteError
            _ERROR_TYPES[base] = cls
    try:
        return cls(path, cause, stage)
    except Exception:  # an odd subclass constructor: fall back to the plain class
        return OutputWriteError(path, cause, stage)


def _rebuild_write_error(base: type, path: str, errno_: int | None, strerror: str | None, stage: str) -> OutputWriteError:
    """Unpickle an :class:`OutputWriteError`."""
    try:
        cause = base(errno_, strerror) if errno_ is not None else base(strerror)
    except Exception:
        cause = OSError(errno_, strerror)
    return _write_error(Path(path), cause, stage)


def _short_write_cause(exc: OSError, folder: Path) -> OSError | None:
    """ENOSPC for an errno-less error on a full file system, else None.

    Some writers report a short write without an errno (numpy's ``tofile``, behind
    ``np.save``: "262144 requested and 131040 written"); on a full disk the reason is
    ENOSPC. Checked before the temporary file is removed, while the space is still taken.
    """
    if exc.errno is not None:
        return None
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    if st.f_bavail and st.f_bfree:
        return None
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write: {exc})")


def _fsync_file(path: Path) -> None:
    """Flush a written file's data to the device (errors such as a deferred ENOSPC surface here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; best effort (some file systems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success.

    The temporary file is hidden (``.<name>.<random><suffixes>``), lives in the final
    folder (so the rename is atomic) and is removed whatever goes wrong: the final path
    never holds a partial file, and an existing file there keeps its complete previous
    content until the new one replaces it. On success the data is fsync'ed before the
    rename (``fsync=False`` skips it, e.g. for scratch files). An :class:`OSError` while
    creating, writing, flushing or renaming (disk full, quota, read-only file system)
    becomes an :class:`OutputWriteError` naming ``path``, chained to the original and
    keeping its errno. Other exceptions pass through unchanged.
    """
    final = Path(path)
    stage = "creating a temporary file beside it"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(final.suffixes) or ".tmp"
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(final, exc, stage) from exc
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        stage = "writing"
        yield tmp_path
        if fsync:
            stage = "flushing to disk"
            _fsync_file(tmp_path)
        stage = "renaming into place"
        os.replace(tmp_path, final)
    except BaseException as exc:
        cause = _short_write_cause(exc, final.parent) if isinstance(exc, OSError) else None
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise _write_error(final, cause or exc, stage) from exc
        raise
    if fsync:
        _fsync_dir(final.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write JSON atomically (sorted keys, so reruns give identical bytes)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save a NumPy array atomically in .npy format (memory-mappable, no pickle)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Load a .npy array without pickle, memory-mapped by default; an object (pickled) array is refused, naming the file."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:  # numpy's message names neither the file nor the reason for refusing
        raise ValueError(f"{os.fspath(path)}: refused: {exc} (pickled object arrays are never loaded)") from exc


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
    def from_dict(cls, d: dict) -> "Geometry":
        """Inverse of :meth:`to_dict`."""
        return cls(
            shape=tuple(int(v) for v in d["shape"]),
            affine=tuple(tuple(float(v) for v in row) for row in d["affine"]),
            transform=tuple((float(a), float(b)) for a, b in d["transform"]),
            spacing=tuple(float(v) for v in d["spacing"]),
        )

    @property
    def internal_shape(self) -> tuple[int, int, int]:
        """Shape of the volume in the internal orientation."""
        order = [int(a) for a, _ in self.transform]
        out = [0, 0, 0]
        for src, dst in enumerate(order):
            out[dst] = self.shape[src]
        return tuple(out)


def _check_gzip(path: Path, case_id: str | None) -> None:
    """Fail clearly on a truncated or corrupt gzip stream."""
    if not path.name.endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise CaseDataError(case_id, path, f"corrupt or truncated gzip stream ({exc})") from exc


def load_nifti(path: str | os.PathLike, case_id: str | None = None) -> nib.Nifti1Image:
    """Open a 3D NIfTI file, failing with a message naming the case and file."""
    path = Path(path)
    if not path.is_file():
        raise CaseDataError(case_id, path, "file not found")
    _check_gzip(path, case_id)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for bad headers
        raise CaseDataError(case_id, path, f"not a readable NIfTI file ({exc})") from exc
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise CaseDataError(case_id, path, f"expected a 3D volume, got shape {img.shape}")
    if not np.all(np.isfinite(img.affine)):
        raise CaseDataError(case_id, path, "affine contains NaN or inf")
    return img


def read_array(img: nib.Nifti1Image, case_id: str | None, path: object, dtype=np.float32) -> np.ndarray:
    """Read voxel data with scl_slope/scl_inter applied; reject NaN and inf."""
    try:
        data = np.asanyarray(img.dataobj).astype(dtype, copy=False)
    except Exception as exc:
        raise CaseDataError(case_id, path, f"cannot read voxel data ({exc})") from exc
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise CaseDataError(case_id, path, "voxel data contains NaN or inf")
    return data


def geometry_of(img: nib.Nifti1Image) -> Geometry:
    """The orientation transform and internal spacing of an image."""
    current = ornt.io_orientation(img.affine)
    target = ornt.axcodes2ornt(INTERNAL_AXCODES)
    transform = ornt.ornt_transform(current, target)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    spacing = [0.0, 0.0, 0.0]
    for src, (dst, _) in enumerate(transform):
        spacing[int(dst)] = float(zooms[src])
    return Geometry(
        shape=tuple(int(s) for s in img.shape[:3]),
        affine=tuple(tuple(float(v) for v in row) for row in img.affine),
        transform=tuple((float(a), float(b)) for a, b in transform),
        spacing=tuple(spacing),
    )


def to_internal(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Reorient an array from its file layout to the internal (I, P, L) layout."""
    return np.ascontiguousarray(ornt.apply_orientation(array, np.asarray(geometry.transform)))


def from_internal(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Put an internal-layout array back into the file's own layout."""
    inverse = ornt.ornt_transform(ornt.axcodes2ornt(INTERNAL_AXCODES), ornt.io_orientation(np.asarray(geometry.affine)))
    out = np.ascontiguousarray(ornt.apply_orientation(array, inverse))
    if out.shape != geometry.shape:
        raise ValueError(f"shape {out.shape} after reorientation differs from the original {geometry.shape}")
    return out


def load_image(path: str | os.PathLike, case_id: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Load a CT volume as float32 in the internal orientation, with its geometry."""
    img = load_nifti(path, case_id)
    data = read_array(img, case_id, path, np.float32)
    geometry = geometry_of(img)
    return to_internal(data, geometry), geometry


def load_label(
    path: str | os.PathLike, case_id: str | None, valid_labels: tuple[int, ...], image_geometry: Geometry | None = None
) -> np.ndarray:
    """Load a label volume in the internal orientation, checking values and grid."""
    img = load_nifti(path, case_id)
    raw = read_array(img, case_id, path, np.float64)
    if not np.all(raw == np.round(raw)):
        raise CaseDataError(case_id, path, "label volume holds non-integer values")
    values = np.unique(raw).astype(int)
    bad = sorted(set(values.tolist()) - set(valid_labels))
    if bad:
        raise CaseDataError(case_id, path, f"unexpected label values {bad}; allowed {list(valid_labels)}")
    geometry = geometry_of(img)
    if image_geometry is not None:
        check_same_grid(image_geometry, geometry, case_id, path)
    return to_internal(raw.astype(np.uint8), geometry)


def check_same_grid(a: Geometry, b: Geometry, case_id: str | None, path: object, atol: float = 1e-3) -> None:
    """Raise unless two volumes share shape and affine (within ``atol`` mm)."""
    if tuple(a.shape) != tuple(b.shape):
        raise CaseDataError(case_id, path, f"grid mismatch: shape {b.shape} != image shape {a.shape}")
    if not np.allclose(np.asarray(a.affine), np.asarray(b.affine), atol=atol):
        raise CaseDataError(case_id, path, "grid mismatch: affine differs from the image's affine")


def save_like(path: str | os.PathLike, array: np.ndarray, reference: str | os.PathLike, dtype=np.uint8) -> None:
    """Write ``array`` (file layout) atomically with the reference file's affine and codes."""
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


def read_json(path: str | os.PathLike | None) -> dict | None:
    """A JSON file as a dict, or None when no path is given."""
    if not path:
        return None
    return json.loads(Path(path).read_text())
