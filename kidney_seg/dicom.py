"""DICOM in and out: CT series read into NIfTI layout, CT series written from it, and DICOM SEG output.

Conventions. A series folder holds the single-frame files of one CT series (hidden files
and DICOMDIR are passed over; sub-folders are not read; every other file must be DICOM of
that series, with pixel data this pydicom can decode). :func:`read_series` returns the
volume in NIfTI voxel layout: axis 0 is the column index (along the row direction cosine
of ImageOrientationPatient), axis 1 the row index (along the column direction cosine),
axis 2 the slice index in increasing position along the slice normal (row cosine x
column cosine). PixelSpacing is [spacing between rows, spacing between columns], so axis
0 steps by PixelSpacing[1] and axis 1 by PixelSpacing[0]; axis 2 steps by
(ImagePositionPatient of the last slice - that of the first) / (n - 1), and every
consecutive step must equal it (a missing slice or uneven spacing is refused). The 4x4
affine is nibabel's RAS+: DICOM's patient coordinates are LPS, so x and y are negated.
Voxel values are in HU: RescaleSlope and RescaleIntercept are applied slice by slice;
the volume is int16 when every slope is 1, every intercept an integer and the values fit,
else float32.

Every problem with a series raises :class:`~kidney_seg.errors.CaseDataError` naming the
case and the folder, on one line. :func:`kidney_seg.volume.read_image` is how the rest of
the project reads a series; this module is its DICOM back end.

:func:`write_series` writes a CT series from a NIfTI-layout array and its RAS affine (for
tests and benchmarks). :func:`write_seg` writes a DICOM Segmentation (highdicom, BINARY)
of a label map in the same layout: frame ``k`` (``labels[:, :, k].T``, rows x columns)
segments the ``k``-th sorted source slice, and highdicom records for each frame the SOP
instance it derives from and its ImagePositionPatient, so a reader maps frames back to
slices by either. One segment per foreground class, segment number = label value, coded
with SNOMED CT from pydicom's code dictionary (:func:`segment_codes`): kidney is category
Anatomical Structure (SCT 91723000, as pydicom's CID 7150 has it; some tools write the
older 123037004) with type Kidney (SCT 64033007); tumour is category Morphologically Abnormal
Structure (SCT 49755003) with type Neoplasm (SCT 108369006, in CID 7151) and anatomic
region Kidney (KiTS' tumour label holds benign and malignant masses, so not "renal cell
carcinoma"); cyst (KiTS21/23) is type Cyst (SCT 367643001) likewise.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kidney_seg import __version__
from kidney_seg.atomic import OutputWriteError, _umask, atomic_path
from kidney_seg.errors import CaseDataError

#: LPS (DICOM) <-> RAS (nibabel): x and y change sign.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: A slice step may differ from the mean step by this fraction of its length, or by SLICE_ATOL_MM, whichever is more.
SLICE_RTOL = 0.01
SLICE_ATOL_MM = 0.02
#: Orientation cosines and pixel spacings of the slices of a series may differ by this much.
GEOMETRY_ATOL = 1e-4
PACKAGE = "kidney-seg"


class SeriesHeader(NamedTuple):
    """The sorted headers of a series (no pixel data), its RAS affine and its shape in NIfTI layout."""

    datasets: list
    affine: np.ndarray
    shape: tuple[int, int, int]


# --------------------------------------------------------------------------- finding files


def _candidates(folder: Path) -> list[Path]:
    """The files of a folder that may be DICOM: not hidden, not DICOMDIR, not sub-folders (sorted)."""
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and p.is_file()
    )


def has_dicom_magic(path: str | os.PathLike) -> bool:
    """Whether a file starts with the 128-byte preamble and the ``DICM`` magic."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_series_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding at least one DICOM file (preamble and ``DICM`` magic)."""
    folder = Path(path)
    return folder.is_dir() and any(has_dicom_magic(p) for p in _candidates(folder))


def series_files(folder: str | os.PathLike) -> list[Path]:
    """The candidate files of a series folder (what :func:`read_series` reads)."""
    return _candidates(Path(folder))


# --------------------------------------------------------------------------- reading


def _read_header(path: Path, folder: Path, case_id: str | None):
    """One file's header (pixel data not read); an unreadable or non-DICOM file raises, naming it."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise CaseDataError(case_id, folder, f"{path.name} is not a DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom raises many types for truncated or malformed files
        raise _unreadable(path, folder, case_id, exc) from exc


def _unreadable(path: Path, folder: Path, case_id: str | None, exc: Exception) -> CaseDataError:
    """The error for a file pydicom cannot parse."""
    return CaseDataError(case_id, folder, f"{path.name} is not readable DICOM ({type(exc).__name__}: {exc})")


def _one_series(headers: list, folder: Path, case_id: str | None) -> None:
    """Raise when the files belong to more than one series, listing each SeriesInstanceUID and its file count."""
    counts = Counter(str(ds.get("SeriesInstanceUID", "(none)")) for ds in headers)
    if len(counts) > 1:
        listed = ", ".join(f"{uid} ({n} files)" for uid, n in counts.most_common())
        raise CaseDataError(case_id, folder, f"holds {len(counts)} series: {listed}; put each series in its own folder")


def _check_ct(headers: list, folder: Path, case_id: str | None) -> None:
    """Raise unless every file is a single-frame CT image."""
    modalities = sorted({str(ds.get("Modality", "")) for ds in headers})
    if modalities != ["CT"]:
        raise CaseDataError(case_id, folder, f"Modality {'/'.join(m or '(none)' for m in modalities)}, not CT")
    frames = {int(ds.get("NumberOfFrames", 1) or 1) for ds in headers}
    if frames != {1}:
        raise CaseDataError(case_id, folder, f"multi-frame files ({max(frames)} frames); expected one slice per file")


def _required(ds, keyword: str, folder: Path, case_id: str | None):
    """A header attribute that must be present, else an error naming the file."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise CaseDataError(case_id, folder, f"{Path(ds.filename).name} has no {keyword}")
    return value


def _same_across(headers: list, keyword: str, folder: Path, case_id: str | None) -> np.ndarray:
    """The value of ``keyword`` shared by every slice (within GEOMETRY_ATOL); a difference raises, naming both files."""
    first = np.asarray(_required(headers[0], keyword, folder, case_id), dtype=float)
    for ds in headers[1:]:
        value = np.asarray(_required(ds, keyword, folder, case_id), dtype=float)
        if value.shape != first.shape or not np.allclose(value, first, rtol=0, atol=GEOMETRY_ATOL):
            raise CaseDataError(
                case_id,
                folder,
                f"{keyword} differs across slices: {_show(first)} in {Path(headers[0].filename).name}, "
                f"{_show(value)} in {Path(ds.filename).name}",
            )
    return first


def _show(value: np.ndarray) -> str:
    """Numbers as DICOM writes a multi-valued attribute: ``0.75\\0.75``."""
    return "\\".join(f"{float(x):g}" for x in np.ravel(value))


def _slice_vector(positions: np.ndarray, names: list[str], folder: Path, case_id: str | None) -> np.ndarray:
    """(last - first) / (n - 1) of sorted slice positions; raise on a repeated position, a gap or uneven spacing."""
    steps = np.diff(positions, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    if lengths.min() < 1e-6:
        k = int(np.argmin(lengths))
        raise CaseDataError(
            case_id, folder, f"{names[k]} and {names[k + 1]} lie at the same position {positions[k].tolist()}"
        )
    mean = (positions[-1] - positions[0]) / (len(positions) - 1)
    tolerance = max(SLICE_RTOL * float(np.linalg.norm(mean)), SLICE_ATOL_MM)
    if np.all(np.linalg.norm(steps - mean, axis=1) <= tolerance):
        return mean
    rounded = np.round(lengths, 2)
    typical = min(set(rounded), key=lambda v: (-np.sum(rounded == v), abs(v - np.linalg.norm(mean)), v))
    usual = steps[int(np.argmax(rounded == typical))]  # the most common step; ties: closest to the mean, shortest
    off = np.linalg.norm(steps - usual, axis=1) > tolerance
    k = int(np.argmax(off)) if off.any() else int(np.argmax(np.linalg.norm(steps - mean, axis=1)))  # the first odd step
    ratio = lengths[k] / float(np.linalg.norm(usual))
    gap = round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.1
    what = f"{round(ratio) - 1} missing slice(s)" if gap else "uneven slice spacing"
    raise CaseDataError(
        case_id,
        folder,
        f"{what}: the step from slice {k} ({names[k]}) to slice {k + 1} ({names[k + 1]}) is {lengths[k]:.4g} mm, "
        f"expected {float(np.linalg.norm(usual)):.4g} mm (the usual step {np.round(usual, 4).tolist()})",
    )


def _check_decodable(headers: list, folder: Path, case_id: str | None) -> None:
    """Raise when a file's transfer syntax has no pixel data decoder available here, naming it and what to install."""
    from pydicom.pixels import get_decoder

    for uid in sorted({str(ds.file_meta.get("TransferSyntaxUID", "")) for ds in headers}):
        problem = None
        try:
            decoder = get_decoder(uid)
            if not decoder.is_available:
                problem = "no decoder installed; install one of: " + "; ".join(decoder.missing_dependencies)
        except (NotImplementedError, ValueError) as exc:
            problem = str(exc)
        if problem:
            raise CaseDataError(case_id, folder, f"{_syntax_name(uid)} pixel data cannot be decoded ({problem})")


def _syntax_name(uid: str) -> str:
    """A transfer syntax's name and UID, for messages."""
    from pydicom.uid import UID

    name = UID(uid).name if uid else "(no TransferSyntaxUID)"
    return f"{name} ({uid})" if name != uid else f"transfer syntax {uid}"


def read_series_header(folder: str | os.PathLike, case_id: str | None = None) -> SeriesHeader:
    """The checked, sorted headers of a series folder, its RAS affine and shape; no pixel data is read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseDataError(case_id, folder, "DICOM series folder not found")
    files = _candidates(folder)
    if not files:
        nested = any(p.is_dir() for p in folder.iterdir())
        raise CaseDataError(
            case_id, folder, "no DICOM files in the folder" + (" (each series folder is read alone)" if nested else "")
        )
    headers = [_read_header(p, folder, case_id) for p in files]
    _one_series(headers, folder, case_id)
    _check_ct(headers, folder, case_id)
    if len(headers) < 2:
        raise CaseDataError(case_id, folder, f"a single slice ({files[0].name}); need >= 2 slices")
    orientation = _same_across(headers, "ImageOrientationPatient", folder, case_id)
    spacing = _same_across(headers, "PixelSpacing", folder, case_id)
    rows = int(_same_across(headers, "Rows", folder, case_id))
    columns = int(_same_across(headers, "Columns", folder, case_id))
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    if orientation.shape != (6,) or np.linalg.norm(normal) < 0.5 or spacing.shape != (2,) or spacing.min() <= 0:
        raise CaseDataError(
            case_id,
            folder,
            f"invalid ImageOrientationPatient {orientation.tolist()} or PixelSpacing {spacing.tolist()}",
        )
    positions = np.array([np.asarray(_required(ds, "ImagePositionPatient", folder, case_id), float) for ds in headers])
    order = np.argsort(positions @ normal, kind="stable")
    headers, positions = [headers[i] for i in order], positions[order]
    step = _slice_vector(positions, [Path(ds.filename).name for ds in headers], folder, case_id)
    _check_decodable(headers, folder, case_id)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * spacing[1], col_cos * spacing[0], step, positions[0]
    return SeriesHeader(headers, LPS_TO_RAS @ lps, (columns, rows, len(headers)))


def _decode(path: Path, shape: tuple[int, int], folder: Path, case_id: str | None):
    """A file's stored pixel values (rows, columns) and its rescale slope and intercept."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise _unreadable(path, folder, case_id, exc) from exc
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        uid = str(ds.file_meta.get("TransferSyntaxUID", ""))
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CaseDataError(
            case_id,
            folder,
            f"{path.name}: {_syntax_name(uid)} pixel data cannot be decoded ({detail}); for compressed syntaxes "
            "install pylibjpeg with pylibjpeg-libjpeg and pylibjpeg-openjpeg, or python-gdcm",
        ) from exc
    if pixels.shape != shape:
        raise CaseDataError(case_id, folder, f"{path.name}: pixel data of shape {pixels.shape}, expected {shape}")
    return pixels, _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)


def _number(ds, keyword: str, default: float) -> float:
    """A numeric attribute, or ``default`` when absent or empty."""
    value = ds.get(keyword)
    return default if value is None or value == "" else float(value)


def read_series(
    folder: str | os.PathLike, case_id: str | None = None, header: SeriesHeader | None = None
) -> tuple[np.ndarray, np.ndarray, list]:
    """A CT series as (HU volume in NIfTI layout, RAS affine, sorted headers without pixel data).

    ``header``: the folder's :func:`read_series_header`, when the caller has read it already.
    """
    folder = Path(folder)
    header = header or read_series_header(folder, case_id)
    columns, rows, n = header.shape
    volume = np.empty(header.shape, dtype=np.int16, order="F")  # F order: volume[:, :, k] is one contiguous slice
    for k, ds in enumerate(header.datasets):
        pixels, slope, inter = _decode(Path(ds.filename), (rows, columns), folder, case_id)
        if volume.dtype == np.int16 and not _fits_int16(pixels, slope, inter):
            volume = volume.astype(np.float32, order="F")
        if volume.dtype == np.int16:
            volume[:, :, k] = (pixels.astype(np.int32) + int(inter)).T
        else:
            volume[:, :, k] = (pixels.astype(np.float64) * slope + inter).T
        del pixels
    return volume, header.affine, header.datasets


def _fits_int16(pixels: np.ndarray, slope: float, inter: float) -> bool:
    """Whether one slice rescales to integers within int16."""
    if slope != 1.0 or not inter.is_integer() or pixels.dtype.kind not in "ui":
        return False
    return int(pixels.min()) + inter >= np.iinfo(np.int16).min and int(pixels.max()) + inter <= np.iinfo(np.int16).max


# --------------------------------------------------------------------------- writing a CT series


@contextlib.contextmanager
def _atomic_folder(folder: Path):
    """Yield a hidden temporary folder beside ``folder``; rename it into place on success (``folder`` must not
    exist or be empty)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; refusing to overwrite a series")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, folder)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise OutputWriteError(folder, exc) from exc
        raise


def _ds(value: float) -> str:
    """A number as a DICOM decimal string (at most 16 characters)."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _stored_dtype(array: np.ndarray, slope: float, intercepts: np.ndarray) -> type:
    """uint16 when every stored value ``(array - intercept) / slope`` fits it, else int16; raise when neither fits."""
    lows = [(float(array[:, :, k].min()) - b) / slope for k, b in enumerate(intercepts)]
    highs = [(float(array[:, :, k].max()) - b) / slope for k, b in enumerate(intercepts)]
    low, high = min(min(lows), min(highs)), max(max(lows), max(highs))  # a negative slope swaps them
    for dtype in (np.uint16, np.int16):
        if round(low) >= np.iinfo(dtype).min and round(high) <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"stored values {low:g}..{high:g} fit neither uint16 nor int16; choose another slope or intercept")


def _stored_slice(values: np.ndarray, slope: float, intercept: float, dtype: type) -> np.ndarray:
    """One slice's stored values (rows, columns): ``(values - intercept) / slope``, which must be integers."""
    stored = (np.asarray(values, dtype=np.float64) - intercept) / slope
    rounded = np.round(stored)
    if not np.allclose(stored, rounded, rtol=0, atol=1e-3):
        raise ValueError("values are not integers once the intercept and slope are taken off; choose another slope")
    return np.ascontiguousarray(rounded.astype(dtype).T)


def _patient_module(ds, patient_id: str, study_uid: str, series_uid: str, frame_uid: str) -> None:
    """Patient, study, series and frame of reference attributes of a written CT slice."""
    now = datetime.datetime.now()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"{patient_id}^", patient_id, "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Modality, ds.SeriesNumber, ds.PositionReferenceIndicator = "CT", 1, ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = PACKAGE, PACKAGE, __version__


def write_series(
    array: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    patient_id: str = "ANONYMOUS",
    series_description: str = "CT written by kidney-seg",
    slope: float = 1.0,
    intercept: float | Sequence[float] = -1024.0,
) -> list[Path]:
    """Write a NIfTI-layout array with its RAS affine as a CT series (one file per slice of axis 2), atomically.

    Stored values are ``(array - intercept) / slope`` (integers, uint16 when they fit,
    else int16); ``intercept`` may be one value per slice. The slice normal of the written
    orientation is the cross product of the first two affine columns (in LPS), so a series
    whose third column points against it reads back with its slices reversed.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    lps = np.asarray(LPS_TO_RAS @ np.asarray(affine, dtype=float))
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    if abs(float(row_cos @ col_cos)) > 1e-6:
        raise ValueError("the affine's first two columns are not orthogonal: DICOM rows and columns must be")
    intercepts = np.broadcast_to(np.asarray(intercept, dtype=float), (array.shape[2],))
    dtype = _stored_dtype(array, float(slope), intercepts)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    folder = Path(folder)
    paths = []
    with _atomic_folder(folder) as tmp:
        for k in range(array.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
            meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
            _patient_module(ds, patient_id, study_uid, series_uid, frame_uid)
            ds.SeriesDescription, ds.InstanceNumber = series_description, k + 1
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.ImagePositionPatient = [_ds(v) for v in lps[:3, 3] + k * lps[:3, 2]]
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
            ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # [between rows, between columns]
            ds.SliceThickness = _ds(spacing[2])
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[0])
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 0 if dtype == np.uint16 else 1
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercepts[k]), "HU"
            ds.KVP, ds.AcquisitionNumber = "", 1
            ds.PixelData = _stored_slice(array[:, :, k], float(slope), intercepts[k], dtype).tobytes()
            path = tmp / f"{k + 1:05d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            paths.append(folder / path.name)
    return paths


# --------------------------------------------------------------------------- DICOM SEG


def segment_codes() -> dict[str, dict]:
    """SNOMED CT codes of each class: the segmented property category and type, and the anatomic region."""
    from pydicom.sr.codedict import codes

    return {
        "kidney": {"category": codes.SCT.AnatomicalStructure, "type": codes.SCT.Kidney, "region": None},
        "tumor": {
            "category": codes.SCT.MorphologicallyAbnormalStructure,
            "type": codes.SCT.Neoplasm,
            "region": codes.SCT.Kidney,
        },
        "cyst": {
            "category": codes.SCT.MorphologicallyAbnormalStructure,
            "type": codes.SCT.Cyst,
            "region": codes.SCT.Kidney,
        },
    }


#: Segment labels shown by viewers, by class name.
SEGMENT_LABELS = {"kidney": "Kidney", "tumor": "Kidney tumour", "cyst": "Kidney cyst"}


def algorithm_identification(model_name: str):
    """highdicom's AlgorithmIdentificationSequence naming this package, its version and the model."""
    from highdicom import AlgorithmIdentificationSequence
    from pydicom.sr.codedict import codes

    return AlgorithmIdentificationSequence(
        name=PACKAGE,
        family=codes.DCM.ArtificialIntelligence,
        version=__version__,
        source=PACKAGE,
        parameters={"model": str(model_name)[:64]},
    )


def segment_descriptions(class_names: Sequence[str], model_name: str) -> list:
    """One highdicom SegmentDescription per foreground class (segment number = label value)."""
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription

    known = segment_codes()
    algorithm = algorithm_identification(model_name)
    out = []
    for value, name in enumerate(class_names[1:], start=1):
        if name not in known:
            raise ValueError(f"no SNOMED CT code for class {name!r} (label {value}); known: {sorted(known)}")
        code = known[name]
        out.append(
            SegmentDescription(
                segment_number=value,
                segment_label=SEGMENT_LABELS[name],
                segmented_property_category=code["category"],
                segmented_property_type=code["type"],
                algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                anatomic_regions=[code["region"]] if code["region"] is not None else None,
            )
        )
    return out


def write_seg(
    labels: np.ndarray,
    datasets: Sequence,
    out_path: str | os.PathLike,
    class_names: Sequence[str],
    model_name: str,
    series_number: int = 300,
    series_description: str = "kidney-seg segmentation",
) -> None:
    """Write a label map (NIfTI layout, as :func:`read_series` returned it) as a BINARY DICOM SEG, atomically.

    ``class_names`` names the label values (index 0 is background); every foreground
    class is one segment, empty ones included. Frame ``k`` segments ``datasets[k]``.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    labels = np.asarray(labels)
    expected = (int(datasets[0].Columns), int(datasets[0].Rows), len(datasets))
    if labels.shape != expected:
        raise ValueError(f"labels of shape {labels.shape} do not match the series (columns, rows, slices) {expected}")
    if labels.size and int(labels.max()) >= len(class_names):
        raise ValueError(f"label value {int(labels.max())} has no class name (classes {list(class_names)})")
    frames = np.ascontiguousarray(np.transpose(labels, (2, 1, 0)), dtype=np.uint8)  # (slices, rows, columns)
    seg = hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names, model_name),
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=PACKAGE,
        manufacturer_model_name=PACKAGE,
        software_versions=__version__,
        device_serial_number="none",
        omit_empty_frames=bool(labels.any()),  # highdicom keeps every frame of an all-empty SEG anyway (and warns)
        content_label="KIDNEYSEG",
        content_description=f"{PACKAGE} {__version__}, model {model_name}"[:64],
        series_description=series_description,
    )
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp)
