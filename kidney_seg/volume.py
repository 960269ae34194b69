"""The one home of NIfTI volumes: reading, writing, geometry and the internal orientation.

Internal orientation: every volume is reoriented to the KiTS19 convention, axis codes
(I, P, L). Axis 0 is then the slice axis: the voxel axis whose direction is closest to
the patient's superior-inferior axis (nibabel's ``io_orientation`` picks, for each voxel
axis, the world axis it is most aligned with). In-plane axes follow as posterior and
left. What is needed to go back (the orientation transform and original shape) is kept
in a :class:`Geometry`, so predictions are written on the input file's exact grid.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from kidney_seg.atomic import atomic_path
from kidney_seg.errors import CaseDataError

INTERNAL_AXCODES: tuple[str, str, str] = ("I", "P", "L")


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
