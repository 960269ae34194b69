"""From a raw CT case to the cached, normalised 2D slices the model trains on.

Settings: :func:`resolve_preprocessing` turns the ``preprocessing`` config section (and,
for ``clip: auto`` or ``normalization: dataset``, the training-set fingerprint of
:func:`compute_fingerprint`) into one concrete dict: the ``preprocessing`` of the plan
(:mod:`kidney_seg.plan`, plans.json), which preprocessing, training and prediction all
read, so that prediction repeats exactly the same steps.

Steps, shared by training and inference (:func:`preprocess_image`):
1. crop to the body's bounding box (:func:`body_box`, voxels above -500 HU), when
   ``crop_to_body``; the box is returned and saved so that prediction can undo it;
2. clip HU to a window (the paper's [-75.76, 349.49] by default, or the training set's
   foreground 0.5/99.5 percentiles);
3. normalise: per-slice z-score (the paper) or the training set's foreground mean/std
   (after nnU-Net's CT scheme; our mean and std are those of the clipped foreground,
   :func:`compute_fingerprint`);
4. resample to the target spacing, nnU-Net's way for anisotropic data: nearest (order 0)
   across slices, cubic (order 3) in-plane slice by slice. Labels: one-hot per class,
   linear in-plane, nearest across slices, argmax.

The order actually run is crop -> pick slices (nearest along axis 0) -> clip ->
normalise -> in-plane cubic. That gives the same result as crop -> clip -> normalise ->
resample, because nearest-neighbour slice selection commutes with clipping, with both
normalisations (pointwise or per slice) and with per-slice in-plane resampling; doing it
first means a 611-slice 0.5 mm volume going to 3 mm is reduced to ~100 slices before
any float work. All float work is on float32 arrays, in place or one slice at a time.

Files are read by :func:`kidney_seg.volume.read_image` and :func:`~kidney_seg.volume.read_label`:
the volume stays in the file's own dtype and memory layout, as a reoriented *view* (no
float32 or C-order copy of the whole scan); cropping and slice selection copy only what
is kept, working in chunks along the axis with the largest stride
(:func:`kidney_seg.volume.chunks`), so they stay cache-friendly whatever the file layout.

The cache per case is ``image.npy`` (float32, slices x rows x cols, memory-mappable),
``label.npy`` (uint8) and ``meta.json`` (geometry, crop box, the plan's digest and
per-class slice lists).
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from kidney_seg.atomic import save_npy_atomic, write_json_atomic
from kidney_seg.quality import kidney_intensity
from kidney_seg.vocabulary import ALL_LABELS
from kidney_seg.volume import CHUNK_BYTES, chunk_axis, chunks, read_image, read_label, take

log = logging.getLogger(__name__)

EPS = 1e-6
BODY_HU = -500.0  # air is about -1000 HU, fat about -100: anything above -500 is body (or table)
BODY_MARGIN = 4  # voxels added around the body box on each in-plane side
NORMALIZATIONS = ("zscore_slice", "dataset")
#: The keys of resolved preprocessing settings (:func:`resolve_preprocessing`).
SETTINGS_KEYS = ("target_spacing", "clip", "normalization", "mean", "std", "crop_to_body")

Box = tuple[slice, slice, slice]


# --------------------------------------------------------------------------- settings


def needs_fingerprint(preprocessing_cfg: dict) -> bool:
    """Whether the config needs the training-set fingerprint (``clip: auto`` or ``normalization: dataset``)."""
    return preprocessing_cfg["clip"] == "auto" or preprocessing_cfg["normalization"] == "dataset"


def _fingerprint_value(fingerprint: dict | None, key: str, why: str) -> float:
    if fingerprint is None:
        raise ValueError(
            f"preprocessing: {why} needs the training-set fingerprint (compute_fingerprint, "
            "results_dir/fingerprint.json), but none was given"
        )
    if key not in fingerprint:
        raise ValueError(
            f"preprocessing: {why} needs {key!r}, which the fingerprint lacks (keys: {sorted(fingerprint)})"
        )
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
    """Concrete preprocessing settings from the validated config section and (where needed) the fingerprint.

    Returns ``{"target_spacing": [z, y, x] or None, "clip": [lo, hi], "normalization":
    "zscore_slice" | "dataset", "mean": float | None, "std": float | None, "crop_to_body": bool}``
    (a plan's ``preprocessing``, :mod:`kidney_seg.plan`).
    ``clip: auto`` takes the fingerprint's ``percentile_00_5``/``percentile_99_5``;
    ``normalization: dataset`` takes its ``mean``/``std`` (mean and std of the clipped
    foreground samples). The section must hold every key (defaults come from the schema:
    :func:`kidney_seg.config.with_defaults`). Raises ValueError if the fingerprint is
    needed but None, or on an invalid value.
    """
    cfg = dict(preprocessing_cfg)
    normalization = cfg["normalization"]
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"preprocessing: unknown normalization {normalization!r} (expected one of {NORMALIZATIONS})")
    clip = cfg["clip"]
    if clip == "auto":
        clip = [
            _fingerprint_value(fingerprint, "percentile_00_5", "clip 'auto'"),
            _fingerprint_value(fingerprint, "percentile_99_5", "clip 'auto'"),
        ]
    mean = std = None
    if normalization == "dataset":
        mean = _fingerprint_value(fingerprint, "mean", "normalization 'dataset'")
        std = _fingerprint_value(fingerprint, "std", "normalization 'dataset'")
        if std < 0:
            raise ValueError(f"preprocessing: fingerprint std {std} is negative")
    crop = cfg["crop_to_body"]
    if not isinstance(crop, (bool, np.bool_)):
        raise ValueError(f"preprocessing: crop_to_body must be true or false, got {crop!r}")
    return {
        "target_spacing": _check_spacing(cfg["target_spacing"]),
        "clip": _check_window(clip),
        "normalization": normalization,
        "mean": mean,
        "std": std,
        "crop_to_body": bool(crop),
    }


def check_settings(settings: dict) -> dict:
    """Check resolved preprocessing settings (a plan's ``preprocessing``, as read from a file); return them normalised.

    Called by :func:`kidney_seg.plan.check_plan`, the one place a plan is checked.
    """
    missing = [k for k in SETTINGS_KEYS if k not in settings]
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if missing or unknown:
        raise ValueError(f"preprocessing settings: missing keys {missing}, unknown keys {unknown}")
    normalization = settings["normalization"]
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"preprocessing settings: unknown normalization {normalization!r}")
    if settings["clip"] == "auto":
        raise ValueError(
            "preprocessing settings: clip 'auto' is unresolved; pass the settings through resolve_preprocessing first"
        )
    if not isinstance(settings["crop_to_body"], bool):
        raise ValueError(
            f"preprocessing settings: crop_to_body must be true or false, got {settings['crop_to_body']!r}"
        )
    if normalization == "dataset" and (settings["mean"] is None or settings["std"] is None):
        raise ValueError(
            "preprocessing settings: normalization 'dataset' needs 'mean' and 'std' (from the training fingerprint)"
        )
    return {
        **settings,
        "target_spacing": _check_spacing(settings["target_spacing"]),
        "clip": _check_window(settings["clip"]),
    }


# --------------------------------------------------------------------------- fingerprint


def _foreground_values(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Intensities (float32) of the voxels with label > 0, in internal C order."""
    return np.asarray(image[label > 0], dtype=np.float32)


def compute_fingerprint(
    cases: list[tuple[str, str, str]], out_json: str | os.PathLike, seed: int = 0, samples_per_case: int = 10000
) -> dict:
    """CT intensity statistics over the foreground of the given (training) cases (after nnU-Net's; differences below).

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
        label, _ = read_label(label_path, case_id, ALL_LABELS, geometry)
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
    log.info(
        "fingerprint of %d cases (%d samples): clip [%.2f, %.2f], mean %.2f, std %.2f",
        len(ids),
        pooled.size,
        low,
        high,
        fingerprint["mean"],
        fingerprint["std"],
    )
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


def padding_value(normalised_slice: np.ndarray) -> float:
    """What background reads as in one normalised slice: its minimum; every padding uses it.

    CT intensities are clipped before normalising, so air and everything below the clip
    window's lower bound read as the normalised lower bound, the slice's minimum wherever
    the slice holds background (any scan slice does: air around the body). With
    ``normalization: dataset`` that bound is one number, (clip low - mean) / std; with the
    per-slice z-score it differs from slice to slice, hence a function of the slice.
    Inference tiles (:func:`kidney_seg.inference.pad_to`), training crops and validation
    crops (:mod:`kidney_seg.sampling`) all pad with it.
    """
    plane = np.asarray(normalised_slice)
    if plane.size == 0:
        raise ValueError("padding_value: empty slice")
    return float(plane.min())


def normalize(image: np.ndarray, settings: dict, inplace: bool = False) -> np.ndarray:
    """Clip to ``settings["clip"]``, then the configured normalisation (float32).

    ``zscore_slice``: per-slice z-score. ``dataset``: (clip(image) - mean) / max(std, eps)
    with the training fingerprint's mean/std. With ``inplace`` a float32 ``image`` is
    overwritten (no copy).
    """
    method = settings["normalization"]
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}")
    out = image if inplace else np.array(image, dtype=np.float32)
    if out.dtype != np.float32:
        raise TypeError("normalize(inplace=True) needs a float32 array")
    clip_hu(out, settings["clip"], out=out)
    if method == "zscore_slice":
        return zscore_slices(out, inplace=True)
    mean, std = settings["mean"], settings["std"]
    if mean is None or std is None:
        raise ValueError("normalization 'dataset' needs settings 'mean' and 'std' (see resolve_preprocessing)")
    out -= np.float32(mean)
    out /= np.float32(max(float(std), EPS))
    return out


# --------------------------------------------------------------------------- body crop


def _foreground_projection(image: np.ndarray, threshold: float) -> np.ndarray:
    """(rows, cols) count of slices in which each in-plane position is above ``threshold``."""
    count = np.zeros(image.shape[1:], dtype=np.int32)
    for axis, sl in chunks(image, nbytes=CHUNK_BYTES // 2):
        block = take(image, axis, sl) > threshold
        if axis == 0:
            count += block.sum(axis=0, dtype=np.int32)
        else:
            take(count, axis - 1, sl)[...] = block.sum(axis=0, dtype=np.int32)
    return count


def body_box(
    image: np.ndarray, threshold: float = BODY_HU, margin: int = BODY_MARGIN, min_fraction: float = 0.02
) -> Box:
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
    return (
        slice(0, int(image.shape[0])),
        slice(max(rows.start - margin, 0), min(rows.stop + margin, image.shape[1])),
        slice(max(cols.start - margin, 0), min(cols.stop + margin, image.shape[2])),
    )


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
    return ndimage.zoom(
        plane,
        factors,
        output=out if out is not None else np.float32,
        order=order,
        mode="nearest",
        grid_mode=True,
        prefilter=order > 1,
    )


def _gather_slices(volume: np.ndarray, indices: np.ndarray, dtype=np.float32) -> np.ndarray:
    """C-order copy of ``volume[indices]`` (axis 0) as ``dtype``, read in memory-friendly chunks."""
    out = np.empty((len(indices),) + tuple(volume.shape[1:]), dtype=dtype)
    if len(indices) == 0 or out.size == 0:
        return out
    axis = chunk_axis(volume)
    if axis == 0:
        for k, i in enumerate(indices):
            out[k] = volume[i]
    else:
        for _, sl in chunks(volume, axis=axis):
            take(out, axis, sl)[...] = take(volume, axis, sl)[indices]
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


def label_on_plan_grid(label: np.ndarray, box: Box, shape: tuple[int, int, int]) -> np.ndarray:
    """A label volume (internal orientation) cut to ``box`` and resampled nearest to ``shape`` (uint8).

    Nearest along every axis with the positions :func:`nearest_indices` gives, so along
    the slice axis it keeps the very slices :func:`preprocess_image` keeps of the scan:
    the truth a plan-grid prediction is scored against (``plan_grid_*`` metrics).
    """
    cropped = np.asarray(label)[tuple(box)]
    if cropped.ndim != 3 or len(shape) != 3:
        raise ValueError(f"label_on_plan_grid: needs a 3D label and a 3D shape, got {cropped.shape} -> {shape}")
    axes = [nearest_indices(n_in, int(n_out)) for n_in, n_out in zip(cropped.shape, shape)]
    picked = _gather_slices(cropped, axes[0], dtype=np.uint8)
    return np.ascontiguousarray(picked[:, axes[1][:, None], axes[2][None, :]])


class ResampledScan:
    """A preprocessed volume whose slices are resampled in-plane (cubic) when first asked for.

    Built from the cropped, normalised slices at the target slice count (:func:`prepare_image`);
    localised inference asks only for the slices it predicts. A finished volume (resampled
    already) can be wrapped too.
    """

    def __init__(self, picked: np.ndarray, shape: Sequence[int]):
        self.shape = tuple(int(n) for n in shape)
        if picked.shape[0] != self.shape[0]:
            raise ValueError(f"{picked.shape[0]} slices for a volume of shape {self.shape}")
        self._picked = picked
        finished = tuple(picked.shape[1:]) == self.shape[1:]
        self._out = picked if finished else np.empty(self.shape, dtype=np.float32)
        self._done = np.full(self.shape[0], finished)

    def __len__(self) -> int:
        return self.shape[0]

    def slices(self, index: slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """``volume[index]`` along the slice axis, resampling the slices not resampled yet."""
        wanted = np.arange(self.shape[0])[index]
        for k in np.atleast_1d(wanted)[~self._done[wanted]]:
            _zoom2d(self._picked[k], self.shape[1:], order=3, out=self._out[k])
            self._done[k] = True
        return self._out[index]

    def volume(self) -> np.ndarray:
        """The whole preprocessed volume (float32, C order)."""
        out = self.slices(slice(None))
        self._picked = out  # every slice resampled: the source slices are no longer needed
        return out


def prepare_image(image: np.ndarray, spacing, settings: dict) -> tuple[ResampledScan, Box]:
    """Crop, pick slices, clip and normalise an internal-orientation HU volume; its in-plane resampling to the
    target spacing is left to the :class:`ResampledScan` (see :func:`preprocess_image`)."""
    box = body_box(image) if settings["crop_to_body"] else tuple(slice(0, int(n)) for n in image.shape)
    cropped = image[box]
    shape = resampled_shape(cropped.shape, spacing, settings["target_spacing"])
    picked = _gather_slices(cropped, nearest_indices(cropped.shape[0], shape[0]))  # the only copy of the scan
    normalize(picked, settings, inplace=True)
    return ResampledScan(picked, shape), box


def preprocess_image(image: np.ndarray, spacing, settings: dict) -> tuple[np.ndarray, Box]:
    """Crop, clip, normalise and resample an internal-orientation HU volume.

    ``image`` may be any real dtype and any memory layout (e.g. the view of
    :func:`kidney_seg.volume.read_image`); it is not modified. ``settings`` is the dict of
    :func:`resolve_preprocessing` (or a model's inference.json). Returns the float32
    volume at the target spacing (C order) and the crop box (on ``image``'s grid;
    the full volume when ``crop_to_body`` is false).
    """
    scan, box = prepare_image(image, spacing, settings)
    return scan.volume(), box


def slice_index(label: np.ndarray, num_classes: int) -> dict[str, list[int]]:
    """Slices (axis 0) that contain each foreground class, and any foreground."""
    present = {"foreground": np.flatnonzero(label.reshape(label.shape[0], -1).max(axis=1) > 0).tolist()}
    for c in range(1, num_classes):
        present[f"class_{c}"] = np.flatnonzero((label == c).reshape(label.shape[0], -1).any(axis=1)).tolist()
    return present


def class_volumes_ml(label: np.ndarray, num_classes: int, spacing) -> list[float]:
    """Millilitres of each class value 0..num_classes-1 in a label volume (streamed in chunks)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for axis, sl in chunks(label):
        counts += np.bincount(take(label, axis, sl).ravel(), minlength=num_classes)[:num_classes]
    return [float(n) * float(np.prod(spacing)) / 1000.0 for n in counts]


def preprocess_case(
    case_id: str,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: dict,
    valid_labels: tuple[int, ...],
    plan_digest: str | None = None,
) -> dict:
    """Load one labelled case, preprocess it and write the slice cache; returns meta.

    Writes ``image.npy`` (float32), ``label.npy`` (uint8) and ``meta.json`` atomically
    in ``out_dir``. meta holds the case id, the original geometry (shape, affine,
    orientation transform, spacing), ``original_shape`` (internal orientation),
    ``crop_box`` ([[start, stop]] x 3 on the internal grid before resampling), the
    digest of the plan the settings come from (:func:`kidney_seg.plan.plan_digest`; None
    outside the workflow), the output shape and spacing, and the per-class slice index
    ``slices`` (keys ``foreground`` and ``class_<c>``) and the volume of each class in ml
    at the original resolution, ``class_volumes_ml``, and the kidney's median HU and
    noise, ``kidney_hu`` (:func:`kidney_seg.quality.kidney_intensity`): the QC reference's training
    range. An empty or one-slice volume raises :class:`CaseDataError` naming the case and file.
    """
    image, geometry = read_image(image_path, case_id)
    num_classes = len(valid_labels)
    data, box = preprocess_image(image, geometry.spacing, settings)
    label, _ = read_label(label_path, case_id, tuple(valid_labels), geometry)
    kidney_hu = kidney_intensity(image, label)  # the QC reference's training range
    del image  # peak memory: the scan, its uint8 label and the preprocessed crop
    seg = resample_label(label[box], data.shape, num_classes)
    volumes_ml = class_volumes_ml(label, num_classes, geometry.spacing)
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
        "plan_digest": plan_digest,
        "output_spacing": [float(n * sp / m) for n, sp, m in zip(cropped, geometry.spacing, data.shape)],
        "shape": list(data.shape),
        "num_classes": num_classes,
        "slices": slice_index(seg, num_classes),
        "class_volumes_ml": volumes_ml,
        "kidney_hu": kidney_hu,
    }
    write_json_atomic(out / "meta.json", meta)
    log.info(
        "%s: %s at %s mm, crop %s -> %s at %s mm",
        case_id,
        geometry.internal_shape,
        geometry.spacing,
        meta["crop_box"],
        data.shape,
        settings["target_spacing"],
    )
    return meta
