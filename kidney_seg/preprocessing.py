"""From a raw CT case to the cached, normalised 2D slices the model trains on.

Settings: :func:`resolve_preprocessing` turns the ``preprocessing`` config section (and,
for ``clip: auto`` or ``normalization: dataset``, the training-set fingerprint of
:func:`compute_fingerprint`) into one concrete dict, which training saves with the model
(inference.json) so that prediction repeats exactly the same steps.

Steps, shared by training and inference (:func:`preprocess_image`):
1. crop to the body's bounding box (:func:`body_box`, voxels above -500 HU), when
   ``crop_to_body``; the box is returned and saved so that prediction can undo it;
2. clip HU to a window (the paper's [-75.76, 349.49] by default, or the training set's
   foreground 0.5/99.5 percentiles);
3. normalise: per-slice z-score (the paper) or the training set's foreground mean/std
   (nnU-Net's CT scheme);
4. resample to the target spacing, nnU-Net's way for anisotropic data: nearest (order 0)
   across slices, cubic (order 3) in-plane slice by slice. Labels: one-hot per class,
   linear in-plane, nearest across slices, argmax.

The order actually run is crop -> pick slices (nearest along axis 0) -> clip ->
normalise -> in-plane cubic. That gives the same result as crop -> clip -> normalise ->
resample, because nearest-neighbour slice selection commutes with clipping, with both
normalisations (pointwise or per slice) and with per-slice in-plane resampling; doing it
first means a 611-slice 0.5 mm volume going to 3 mm is reduced to ~100 slices before
any float work. All float work is on float32 arrays, in place or one slice at a time.

Lean loading (:func:`read_image`, :func:`read_label`): the volume stays in the file's
own dtype and memory layout, as a reoriented *view* (no float32 or C-order copy of the
whole scan); cropping and slice selection copy only what is kept. Readers of these views
work in chunks along the axis with the largest stride, so they stay cache-friendly
whatever the file layout.

The cache per case is ``image.npy`` (float32, slices x rows x cols, memory-mappable),
``label.npy`` (uint8) and ``meta.json`` (geometry, crop box, settings and per-class
slice lists).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from pathlib import Path

import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage

from kidney_seg.errors import CaseDataError
from kidney_seg.atomic import save_npy_atomic, write_json_atomic
from kidney_seg.volume import Geometry, check_same_grid, geometry_of, load_label, load_nifti

log = logging.getLogger(__name__)

EPS = 1e-6
BODY_HU = -500.0  # air is about -1000 HU, fat about -100: anything above -500 is body (or table)
BODY_MARGIN = 4  # voxels added around the body box on each in-plane side
NORMALIZATIONS = ("zscore_slice", "dataset")
FINGERPRINT_LABELS = (0, 1, 2, 3)  # KiTS19 uses 0-2, KiTS21/23 add 3 (cyst): all > 0 are foreground
_CHUNK_BYTES = 32 << 20  # work arrays of about this size when streaming over a volume

Box = tuple[slice, slice, slice]


# --------------------------------------------------------------------------- settings


def needs_fingerprint(preprocessing_cfg: dict) -> bool:
    """Whether the config needs the training-set fingerprint (``clip: auto`` or ``normalization: dataset``)."""
    return preprocessing_cfg.get("clip") == "auto" or preprocessing_cfg.get("normalization", "zscore_slice") == "dataset"


def _fingerprint_value(fingerprint: dict | None, key: str, why: str) -> float:
    if fingerprint is None:
        raise ValueError(f"preprocessing: {why} needs the training-set fingerprint (compute_fingerprint, "
                         "results_dir/fingerprint.json), but none was given")
    if key not in fingerprint:
        raise ValueError(f"preprocessing: {why} needs {key!r}, which the fingerprint lacks (keys: {sorted(fingerprint)})")
    value = float(fingerprint[key])
    if not math.isfinite(value):
        raise ValueError(f"preprocessing: fingerprint {key!r} is {value}")
    return value


def _check_window(clip) -> list[float]:
    if isinstance(clip, str) or not hasattr(clip, "__len__") or len(clip) != 2:
        raise ValueError(f"preprocessing: clip must be [low, high] or 'auto', got {clip!r}")
    low, high = float(clip[0]), float(clip[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"preprocessing: clip window {clip!r} must be finite with low < high")
    return [low, high]


def _check_spacing(target_spacing) -> list[float] | None:
    if target_spacing is None:
        return None
    if isinstance(target_spacing, str) or not hasattr(target_spacing, "__len__") or len(target_spacing) != 3:
        raise ValueError(f"preprocessing: target_spacing must be [z, y, x] in mm or null, got {target_spacing!r}")
    out = [float(t) for t in target_spacing]
    if not all(math.isfinite(t) and t > 0 for t in out):
        raise ValueError(f"preprocessing: target_spacing {target_spacing!r} must be positive")
    return out


def resolve_preprocessing(preprocessing_cfg: dict, fingerprint: dict | None) -> dict:
    """Concrete preprocessing settings from the config section and (where needed) the fingerprint.

    Returns ``{"target_spacing": [z, y, x] or None, "clip": [lo, hi], "normalization":
    "zscore_slice" | "dataset", "mean": float | None, "std": float | None, "crop_to_body": bool}``.
    ``clip: auto`` takes the fingerprint's ``percentile_00_5``/``percentile_99_5``;
    ``normalization: dataset`` takes its ``mean``/``std`` (mean and std of the clipped
    foreground samples). Missing optional keys take the schema defaults
    (``zscore_slice``, ``crop_to_body: true``). Raises ValueError if the fingerprint is
    needed but None, or on an invalid value.
    """
    cfg = dict(preprocessing_cfg)
    normalization = cfg.get("normalization", "zscore_slice")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"preprocessing: unknown normalization {normalization!r} (expected one of {NORMALIZATIONS})")
    clip = cfg.get("clip")
    if clip == "auto":
        clip = [_fingerprint_value(fingerprint, "percentile_00_5", "clip 'auto'"),
                _fingerprint_value(fingerprint, "percentile_99_5", "clip 'auto'")]
    mean = std = None
    if normalization == "dataset":
        mean = _fingerprint_value(fingerprint, "mean", "normalization 'dataset'")
        std = _fingerprint_value(fingerprint, "std", "normalization 'dataset'")
        if std < 0:
            raise ValueError(f"preprocessing: fingerprint std {std} is negative")
    crop = cfg.get("crop_to_body", True)
    if not isinstance(crop, (bool, np.bool_)):
        raise ValueError(f"preprocessing: crop_to_body must be true or false, got {crop!r}")
    return {
        "target_spacing": _check_spacing(cfg.get("target_spacing")),
        "clip": _check_window(clip),
        "normalization": normalization,
        "mean": mean,
        "std": std,
        "crop_to_body": bool(crop),
    }


def check_settings(settings: dict) -> dict:
    """Validate resolved settings (e.g. a model's inference.json); fill keys older files lack.

    Models saved before cropping and dataset normalisation existed have no
    ``crop_to_body``/``mean``/``std``: they were trained uncropped, so the defaults here
    are ``crop_to_body: False`` and no mean/std.
    """
    normalization = settings.get("normalization", "zscore_slice")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"settings: unknown normalization {normalization!r}")
    if settings.get("clip") == "auto":
        raise ValueError("settings: clip 'auto' is unresolved; pass the settings through resolve_preprocessing first")
    out = dict(settings)
    out.update(target_spacing=_check_spacing(settings.get("target_spacing")), clip=_check_window(settings.get("clip")),
               normalization=normalization, mean=settings.get("mean"), std=settings.get("std"),
               crop_to_body=bool(settings.get("crop_to_body", False)))
    if normalization == "dataset" and (out["mean"] is None or out["std"] is None):
        raise ValueError("settings: normalization 'dataset' needs 'mean' and 'std' (from the training fingerprint)")
    return out


# --------------------------------------------------------------------------- lean loading


def _chunk_axis(array: np.ndarray) -> int:
    """The axis with the largest stride: chunks along it are contiguous blocks of memory."""
    return int(np.argmax([abs(s) if n > 1 else 0 for s, n in zip(array.strides, array.shape)]))


def _chunks(array: np.ndarray, axis: int | None = None, nbytes: int | None = None):
    """Yield (axis, slice) pairs splitting ``array`` into blocks of about ``nbytes`` (default
    ``_CHUNK_BYTES``) along ``axis`` (default: the largest-stride axis)."""
    axis = _chunk_axis(array) if axis is None else axis
    nbytes = _CHUNK_BYTES if nbytes is None else nbytes
    n = array.shape[axis]
    per = max(1, array.nbytes // max(n, 1))
    step = max(1, nbytes // per)
    for start in range(0, n, step):
        yield axis, slice(start, min(start + step, n))


def _take(array: np.ndarray, axis: int, sl) -> np.ndarray:
    index = [slice(None)] * array.ndim
    index[axis] = sl
    return array[tuple(index)]


def _oriented_view(raw: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The internal-orientation (I, P, L) view of file-layout data (flips and a transpose: no copy)."""
    return ornt.apply_orientation(raw, np.asarray(geometry.transform))


def _read_gzip_lean(path, proxy) -> np.ndarray | None:
    """Voxel data of a .nii.gz straight into one preallocated array (None: not applicable).

    nibabel reads a gzip stream with ``readinto`` on the whole buffer, which CPython's
    GzipFile implements as read-then-copy: a transient second copy of the volume. Reading
    in 16 MB pieces into the final array avoids it.
    """
    if not str(path).endswith(".gz") or not all(hasattr(proxy, a) for a in ("offset", "dtype", "shape", "order")):
        return None
    order = "F" if str(proxy.order).upper() == "F" else "C"
    arr = np.empty(tuple(int(s) for s in proxy.shape), dtype=np.dtype(proxy.dtype), order=order)
    view = memoryview(arr.reshape(-1, order=order)).cast("B")
    with gzip.open(path, "rb") as fh:
        fh.seek(int(proxy.offset))
        pos, total = 0, view.nbytes
        while pos < total:
            n = fh.readinto(view[pos : min(pos + (16 << 20), total)])
            if not n:
                raise OSError(f"expected {total} bytes of voxel data, got {pos}")
            pos += n
    return arr


def _raw_data(img, case_id, path) -> tuple[np.ndarray, float, float]:
    """Voxel data in the file's own dtype and layout, with the NIfTI slope and intercept."""
    proxy = img.dataobj
    try:
        if hasattr(proxy, "get_unscaled"):
            raw = _read_gzip_lean(path, proxy)
            if raw is None:
                raw = np.asanyarray(proxy.get_unscaled())
            slope, inter = float(proxy.slope), float(proxy.inter)
        else:  # already an array (e.g. a 4D file with one volume, sliced by load_nifti)
            raw, slope, inter = np.asanyarray(proxy), 1.0, 0.0
    except Exception as exc:
        raise CaseDataError(case_id, path, f"cannot read voxel data ({exc})") from exc
    if raw.dtype.kind not in "uif":
        raise CaseDataError(case_id, path, f"unsupported voxel type {raw.dtype}")
    if not (math.isfinite(slope) and math.isfinite(inter)):
        raise CaseDataError(case_id, path, f"invalid scaling slope={slope} inter={inter}")
    return raw, slope, inter


def _check_finite(raw: np.ndarray, case_id, path) -> None:
    if raw.dtype.kind != "f":
        return
    for axis, sl in _chunks(raw):
        if not np.isfinite(_take(raw, axis, sl)).all():
            raise CaseDataError(case_id, path, "voxel data contains NaN or inf")


def read_image(path: str | os.PathLike, case_id: str | None = None) -> tuple[np.ndarray, Geometry]:
    """A CT volume in HU, internal orientation, without copying the whole scan; and its geometry.

    Same checks as :func:`kidney_seg.volume.load_image` (readable 3D NIfTI, finite values),
    but the result is a reoriented view of the file's own data: integer files with no
    scaling stay integer (int16 CT is half the size of float32), float32 files stay as
    read. Only files whose slope/intercept must be applied (or float64 files) are
    converted, in chunks, to one float32 array. Callers must not write into the result.
    """
    img = load_nifti(path, case_id)
    geometry = geometry_of(img)
    raw, slope, inter = _raw_data(img, case_id, path)
    del img
    _check_finite(raw, case_id, path)
    if (slope, inter) == (1.0, 0.0) and raw.dtype != np.float64:
        return _oriented_view(raw, geometry), geometry
    internal = _oriented_view(raw, geometry)
    out = np.empty(internal.shape, dtype=np.float32)
    for axis, sl in _chunks(out, axis=0):
        block = out[sl]
        block[...] = internal[sl]
        if slope != 1.0:
            block *= np.float32(slope)
        if inter != 0.0:
            block += np.float32(inter)
    _check_finite(out, case_id, path)
    return out, geometry


def check_extent(shape: tuple[int, ...], case_id: str | None, path: object) -> None:
    """Refuse an empty or single-slice volume (nothing to resample or segment), naming the case and file."""
    if min(shape) < 2:
        raise CaseDataError(case_id, path,
                            f"volume of shape {tuple(shape)} is empty or a single slice; need >= 2 voxels per axis")


def _label_values(raw: np.ndarray) -> set[int]:
    """Distinct values of an integer array, streamed in chunks (no full-size temporaries)."""
    found: set[int] = set()
    nonneg = raw.dtype.kind == "u" or raw.size == 0 or raw.min() >= 0
    big = raw.dtype.itemsize > 2
    for axis, sl in _chunks(raw, nbytes=_CHUNK_BYTES // 4):
        block = _take(raw, axis, sl).ravel(order="K")
        if nonneg and not big:
            found.update(np.flatnonzero(np.bincount(block)).tolist())
        else:
            found.update(np.unique(block).tolist())
    return {int(v) for v in found}


def read_label(path: str | os.PathLike, case_id: str | None, valid_labels: tuple[int, ...],
               image_geometry: Geometry | None = None) -> np.ndarray:
    """A label volume as uint8 in the internal orientation (a view where the file is uint8).

    Same checks as :func:`kidney_seg.volume.load_label` (integer values among
    ``valid_labels``, same grid as the image) without its float64 copy: integer files are
    checked in chunks in their own dtype. Float or scaled label files fall back to
    :func:`kidney_seg.volume.load_label`. Callers must not write into the result.
    """
    img = load_nifti(path, case_id)
    geometry = geometry_of(img)
    if image_geometry is not None:
        check_same_grid(image_geometry, geometry, case_id, path)
    proxy = img.dataobj
    scaled = (float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))) != (1.0, 0.0)
    if img.get_data_dtype().kind not in "ui" or scaled or max(valid_labels) > 255:
        del img, proxy
        return load_label(path, case_id, tuple(valid_labels), image_geometry)
    raw, _, _ = _raw_data(img, case_id, path)
    del img, proxy
    bad = sorted(_label_values(raw) - {int(v) for v in valid_labels})
    if bad:
        raise CaseDataError(case_id, path, f"unexpected label values {bad}; allowed {list(valid_labels)}")
    if raw.dtype != np.uint8:
        raw = raw.astype(np.uint8, order="K")
    return _oriented_view(raw, geometry)


# --------------------------------------------------------------------------- fingerprint


def _foreground_values(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Intensities (float32) of the voxels with label > 0, in internal C order."""
    return np.asarray(image[label > 0], dtype=np.float32)


def compute_fingerprint(cases: list[tuple[str, str, str]], out_json: str | os.PathLike, seed: int = 0,
                        samples_per_case: int = 10000) -> dict:
    """nnU-Net's CT intensity statistics over the foreground of the given (training) cases.

    For each (case_id, image_path, label_path), one case at a time: the intensities of
    the voxels with label > 0 (labels 0-3 allowed), of which up to ``samples_per_case``
    are drawn without replacement by a generator seeded with (``seed``, case id), so
    the result does not depend on the order of ``cases``. Over all samples:
    ``percentile_00_5``, ``percentile_99_5``, and the ``mean`` and ``std`` of the samples
    clipped to those percentiles (nnU-Net itself takes mean/std before clipping; the
    clipped ones are what ``normalization: dataset`` divides, so the normalised
    foreground has mean 0 and std 1). Also ``n_cases``, ``n_voxels`` (samples used),
    ``n_foreground_voxels``, the case ids and the sampling parameters. Written atomically
    to ``out_json`` (sorted keys, reproducible bytes) and returned.
    """
    if not cases:
        raise ValueError("compute_fingerprint: no cases given")
    if samples_per_case < 1:
        raise ValueError(f"compute_fingerprint: samples_per_case must be >= 1, got {samples_per_case}")
    samples, total, ids, empty = [], 0, [], []
    for case_id, image_path, label_path in sorted((str(c), i, lab) for c, i, lab in cases):
        image, geometry = read_image(image_path, case_id)
        label = read_label(label_path, case_id, FINGERPRINT_LABELS, geometry)
        values = _foreground_values(image, label)
        del image, label
        ids.append(case_id)
        total += int(values.size)
        if values.size == 0:
            empty.append(case_id)
            log.warning("%s: no foreground voxels; it adds nothing to the fingerprint", case_id)
            continue
        if values.size > samples_per_case:
            rng = np.random.default_rng([int(seed), zlib.crc32(case_id.encode())])
            values = values[np.sort(rng.choice(values.size, samples_per_case, replace=False))]
        samples.append(values.astype(np.float64))
    if not samples:
        raise ValueError(f"compute_fingerprint: none of the {len(ids)} cases has foreground voxels (label > 0)")
    pooled = np.concatenate(samples)
    low, high = (float(v) for v in np.percentile(pooled, [0.5, 99.5]))
    clipped = np.clip(pooled, low, high)
    fingerprint = {
        "percentile_00_5": low,
        "percentile_99_5": high,
        "mean": float(clipped.mean()),
        "std": float(clipped.std()),
        "min": float(pooled.min()),
        "max": float(pooled.max()),
        "n_cases": len(ids),
        "n_cases_without_foreground": len(empty),
        "n_voxels": int(pooled.size),
        "n_foreground_voxels": total,
        "samples_per_case": int(samples_per_case),
        "seed": int(seed),
        "cases": ids,
    }
    write_json_atomic(out_json, fingerprint)
    log.info("fingerprint of %d cases (%d samples): clip [%.2f, %.2f], mean %.2f, std %.2f",
             len(ids), pooled.size, low, high, fingerprint["mean"], fingerprint["std"])
    return fingerprint


# --------------------------------------------------------------------------- intensities


def clip_hu(image: np.ndarray, window, out: np.ndarray | None = None) -> np.ndarray:
    """Clip intensities to ``[low, high]`` HU (float32; in place when ``out is image``)."""
    low, high = float(window[0]), float(window[1])
    if not low < high:
        raise ValueError(f"clip window {window} must have low < high")
    if out is None:
        return np.clip(image, low, high).astype(np.float32, copy=False)
    return np.clip(image, low, high, out=out)


def zscore_slices(image: np.ndarray, eps: float = EPS, inplace: bool = False) -> np.ndarray:
    """Normalise each slice (axis 0) to zero mean and unit variance (float32).

    With ``inplace`` the float32 ``image`` itself is overwritten; statistics are
    accumulated in float64 one slice at a time.
    """
    out = image if inplace else np.array(image, dtype=np.float32)
    if out.dtype != np.float32:
        raise TypeError("zscore_slices(inplace=True) needs a float32 array")
    for s in out:
        mean = s.mean(dtype=np.float64)
        std = s.std(dtype=np.float64)
        s -= np.float32(mean)
        s /= np.float32(max(std, eps))
    return out


def normalize(image: np.ndarray, settings: dict, inplace: bool = False) -> np.ndarray:
    """Clip to ``settings["clip"]``, then the configured normalisation (float32).

    ``zscore_slice``: per-slice z-score. ``dataset``: (clip(image) - mean) / max(std, eps)
    with the training fingerprint's mean/std. With ``inplace`` a float32 ``image`` is
    overwritten (no copy).
    """
    method = settings.get("normalization", "zscore_slice")
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}")
    out = image if inplace else np.array(image, dtype=np.float32)
    if out.dtype != np.float32:
        raise TypeError("normalize(inplace=True) needs a float32 array")
    clip_hu(out, settings["clip"], out=out)
    if method == "zscore_slice":
        return zscore_slices(out, inplace=True)
    mean, std = settings.get("mean"), settings.get("std")
    if mean is None or std is None:
        raise ValueError("normalization 'dataset' needs settings 'mean' and 'std' (see resolve_preprocessing)")
    out -= np.float32(mean)
    out /= np.float32(max(float(std), EPS))
    return out


# --------------------------------------------------------------------------- body crop


def _foreground_projection(image: np.ndarray, threshold: float) -> np.ndarray:
    """(rows, cols) count of slices in which each in-plane position is above ``threshold``."""
    count = np.zeros(image.shape[1:], dtype=np.int32)
    for axis, sl in _chunks(image, nbytes=_CHUNK_BYTES // 2):
        block = _take(image, axis, sl) > threshold
        if axis == 0:
            count += block.sum(axis=0, dtype=np.int32)
        else:
            _take(count, axis - 1, sl)[...] = block.sum(axis=0, dtype=np.int32)
    return count


def body_box(image: np.ndarray, threshold: float = BODY_HU, margin: int = BODY_MARGIN,
             min_fraction: float = 0.02) -> Box:
    """Bounding box of the body: the voxels above ``threshold`` HU (-500), cheaply.

    The mask is projected along the slice axis: a (rows, cols) map counting in how many
    slices each position is inside the body. Positions inside in at most ``min_fraction``
    of the slices are dropped (stray bright pixels, noise), and of the 8-connected
    components of the rest the one with the largest voxel count is kept, so a CT table
    separated from the patient by air, or bright pixels at the image edge, do not widen
    the box. The in-plane box of that component gets ``margin`` voxels on each side
    (clipped to the volume). Along axis 0 the box is the full extent: every slice is
    kept, so every slice gets a prediction. A volume without body voxels gives the whole
    volume. One pass over the data (chunked: no full-size temporaries), the rest is 2D.
    """
    full = tuple(slice(0, int(n)) for n in image.shape)
    if image.size == 0:
        return full
    count = _foreground_projection(image, threshold)
    keep = count > min_fraction * image.shape[0]
    if not keep.any():
        keep = count > 0
        if not keep.any():
            return full
    labels, n = ndimage.label(keep, structure=np.ones((3, 3), dtype=bool))
    mass = ndimage.sum_labels(count, labels, index=np.arange(1, n + 1))
    rows, cols = ndimage.find_objects(labels)[int(np.argmax(mass))]
    return (slice(0, int(image.shape[0])),
            slice(max(rows.start - margin, 0), min(rows.stop + margin, image.shape[1])),
            slice(max(cols.start - margin, 0), min(cols.stop + margin, image.shape[2])))


def box_to_list(box: Box) -> list[list[int]]:
    """A crop box as JSON: [[start, stop], ...]."""
    return [[int(s.start), int(s.stop)] for s in box]


def box_from_list(items) -> Box:
    """Inverse of :func:`box_to_list`."""
    return tuple(slice(int(a), int(b)) for a, b in items)


# --------------------------------------------------------------------------- resampling


def resampled_shape(shape: tuple[int, ...], spacing, target_spacing) -> tuple[int, int, int]:
    """Shape of a volume after resampling from ``spacing`` to ``target_spacing`` (None: unchanged)."""
    if target_spacing is None:
        return tuple(int(s) for s in shape)
    return tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target_spacing))


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output position for nearest-neighbour resizing along one axis.

    Exactly what ``ndimage.zoom(order=0, mode="nearest", grid_mode=True)`` picks (it is
    computed by zooming the index ramp), so slice selection equals the former full-volume
    zoom along axis 0.
    """
    if n_in == n_out:
        return np.arange(n_in, dtype=np.intp)
    ramp = np.arange(n_in, dtype=np.float64)
    idx = ndimage.zoom(ramp, n_out / n_in, order=0, mode="nearest", grid_mode=True)
    if idx.shape != (n_out,):
        raise AssertionError(f"zoom produced {idx.shape[0]} positions, expected {n_out}")
    return np.rint(idx).astype(np.intp)


def _zoom2d(plane: np.ndarray, shape: tuple[int, int], order: int, out: np.ndarray | None = None) -> np.ndarray:
    """Resize one 2D slice to exactly ``shape`` with pixel-extent alignment (grid_mode)."""
    if tuple(plane.shape) == tuple(shape):
        if out is None:
            return plane
        out[...] = plane
        return out
    factors = [n / o for n, o in zip(shape, plane.shape)]
    return ndimage.zoom(plane, factors, output=out if out is not None else np.float32, order=order, mode="nearest",
                        grid_mode=True, prefilter=order > 1)


def _gather_slices(volume: np.ndarray, indices: np.ndarray, dtype=np.float32) -> np.ndarray:
    """C-order copy of ``volume[indices]`` (axis 0) as ``dtype``, read in memory-friendly chunks."""
    out = np.empty((len(indices),) + tuple(volume.shape[1:]), dtype=dtype)
    if len(indices) == 0 or out.size == 0:
        return out
    axis = _chunk_axis(volume)
    if axis == 0:
        for k, i in enumerate(indices):
            out[k] = volume[i]
    else:
        for _, sl in _chunks(volume, axis=axis):
            _take(out, axis, sl)[...] = _take(volume, axis, sl)[indices]
    return out


def resample_image(image: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest across slices first, then cubic in-plane per slice (nnU-Net's anisotropic scheme); float32."""
    picked = _gather_slices(image, nearest_indices(image.shape[0], shape[0]))
    if picked.shape[1:] == tuple(shape[1:]):
        return picked
    out = np.empty(tuple(shape), dtype=np.float32)
    for k in range(shape[0]):
        _zoom2d(picked[k], shape[1:], order=3, out=out[k])
    return out


def _present_values(label: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.bincount(label.ravel(order="K"), minlength=1))


def resample_label(label: np.ndarray, shape: tuple[int, int, int], num_classes: int) -> np.ndarray:
    """Nearest across slices first, then per slice one-hot, linear in-plane, argmax (uint8).

    Only classes present in a slice compete there, and each class's interpolated one-hot
    map is 0 where the class is absent, so the output never holds a value that the input
    lacks. ``num_classes`` is kept for the caller's contract (values must be below it).
    """
    picked = _gather_slices(label, nearest_indices(label.shape[0], shape[0]), dtype=np.uint8)
    if picked.size and int(picked.max()) >= max(num_classes, 1):
        raise ValueError(f"label value {int(picked.max())} >= num_classes {num_classes}")
    if picked.shape[1:] == tuple(shape[1:]):
        return picked
    out = np.zeros(tuple(shape), dtype=np.uint8)
    for k in range(shape[0]):
        plane = picked[k]
        classes = _present_values(plane)
        if len(classes) == 1:
            out[k] = classes[0]
            continue
        best = np.full(shape[1:], -1.0, dtype=np.float32)
        for c in classes:
            prob = _zoom2d((plane == c).astype(np.float32), shape[1:], order=1)
            better = prob > best
            out[k][better] = c
            best[better] = prob[better]
    return out


def preprocess_image(image: np.ndarray, spacing, settings: dict) -> tuple[np.ndarray, Box]:
    """Crop, clip, normalise and resample an internal-orientation HU volume.

    ``image`` may be any real dtype and any memory layout (e.g. the view of
    :func:`read_image`); it is not modified. ``settings`` is the dict of
    :func:`resolve_preprocessing` (or a model's inference.json). Returns the float32
    volume at the target spacing (C order) and the crop box (on ``image``'s grid;
    the full volume when ``crop_to_body`` is false).
    """
    settings = check_settings(settings)
    box = body_box(image) if settings["crop_to_body"] else tuple(slice(0, int(n)) for n in image.shape)
    cropped = image[box]
    shape = resampled_shape(cropped.shape, spacing, settings["target_spacing"])
    picked = _gather_slices(cropped, nearest_indices(cropped.shape[0], shape[0]))  # the only copy of the scan
    normalize(picked, settings, inplace=True)
    if picked.shape[1:] == tuple(shape[1:]):
        return picked, box
    out = np.empty(shape, dtype=np.float32)
    for k in range(shape[0]):
        _zoom2d(picked[k], shape[1:], order=3, out=out[k])
    return out, box


def slice_index(label: np.ndarray, num_classes: int) -> dict[str, list[int]]:
    """Slices (axis 0) that contain each foreground class, and any foreground."""
    present = {"foreground": np.flatnonzero(label.reshape(label.shape[0], -1).max(axis=1) > 0).tolist()}
    for c in range(1, num_classes):
        present[f"class_{c}"] = np.flatnonzero((label == c).reshape(label.shape[0], -1).any(axis=1)).tolist()
    return present


def preprocess_case(
    case_id: str,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: dict,
    valid_labels: tuple[int, ...],
) -> dict:
    """Load one labelled case, preprocess it and write the slice cache; returns meta.

    Writes ``image.npy`` (float32), ``label.npy`` (uint8) and ``meta.json`` atomically
    in ``out_dir``. meta holds the case id, the original geometry (shape, affine,
    orientation transform, spacing), ``original_shape`` (internal orientation),
    ``crop_box`` ([[start, stop]] x 3 on the internal grid before resampling), the
    settings used, the output shape and spacing, and the per-class slice index
    ``slices`` (keys ``foreground`` and ``class_<c>``). An empty or one-slice volume
    raises :class:`CaseDataError` naming the case and file.
    """
    settings = check_settings(settings)
    image, geometry = read_image(image_path, case_id)
    check_extent(image.shape, case_id, image_path)
    num_classes = len(valid_labels)
    data, box = preprocess_image(image, geometry.spacing, settings)
    del image  # the raw scan goes before the label is read: peak memory is one volume, not two
    label = read_label(label_path, case_id, tuple(valid_labels), geometry)
    seg = resample_label(label[box], data.shape, num_classes)
    del label
    cropped = [s.stop - s.start for s in box]
    out = Path(out_dir)
    save_npy_atomic(out / "image.npy", data)
    save_npy_atomic(out / "label.npy", seg)
    meta = {
        "case_id": case_id,
        "geometry": geometry.to_dict(),
        "spacing": list(geometry.spacing),
        "original_shape": list(geometry.internal_shape),
        "crop_box": box_to_list(box),
        "settings": {k: settings[k] for k in ("target_spacing", "clip", "normalization", "mean", "std", "crop_to_body")},
        "target_spacing": settings["target_spacing"],
        "output_spacing": [float(n * sp / m) for n, sp, m in zip(cropped, geometry.spacing, data.shape)],
        "shape": list(data.shape),
        "num_classes": num_classes,
        "slices": slice_index(seg, num_classes),
    }
    write_json_atomic(out / "meta.json", meta)
    log.info("%s: %s at %s mm, crop %s -> %s at %s mm", case_id, geometry.internal_shape, geometry.spacing,
             meta["crop_box"], data.shape, settings["target_spacing"])
    return meta
