"""Positive-slice batches with batchgenerators augmentation, reproducible batch by batch.

Batch ``k`` of a run is a pure function of ``(seed, k)``: its slices, crop centres,
scalings and flips are drawn from generators seeded with both. A resumed run therefore
sees the same batches as an uninterrupted one, and worker order cannot change the stream.

Crops (``training.crop``): ``paper`` crops every slice at random, so a slice drawn for its
foreground may lose it. ``foreground`` centres the crop of a slice drawn for a class on a
random voxel of that class (tumour for a tumour draw, any foreground for a foreground
draw); random slices keep random crops. nnU-Net v2's loader does the same for its forced
foreground patches (``nnUNetDataLoaderBase.get_bbox``, nnunetv2/training/dataloading/
base_data_loader.py): it centres its larger initial patch on the voxel and the spatial
transform then takes that patch's centre (``random_crop=False``). get_bbox clips only the
patch's lower corner (the final patch then starts inside an image at least its size) and
lets it reach past the image's far end; here the patch is never shifted, so the voxel
stays at its centre under any scaling or rotation, and where the patch reaches past the
slice it reads the padding value.

Padding: wherever a training crop (random crop, centred crop, scaling, rotation) or a
validation crop reaches past a slice, it reads :func:`kidney_seg.preprocessing.padding_value`
of that slice, what normalised background reads as, the value inference pads its tiles with.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kidney_seg.atomic import load_npy
from kidney_seg.augmentation import Augmentation, Augmenter, augment, make_augmenter
from kidney_seg.preprocessing import padding_value
from kidney_seg.vocabulary import TUMOR


@dataclass
class CaseSlices:
    """A preprocessed case: memory-mapped image and label, and its foreground and tumour slices."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    foreground: np.ndarray
    tumor: np.ndarray


def load_case(case_dir: str | Path) -> CaseSlices:
    """Open one case of the slice cache."""
    case_dir = Path(case_dir)
    meta = json.loads((case_dir / "meta.json").read_text())
    image, label = load_npy(case_dir / "image.npy"), load_npy(case_dir / "label.npy")
    if image.shape != label.shape:
        raise ValueError(f"{case_dir}: image {image.shape} and label {label.shape} differ")
    slices = meta["slices"]
    return CaseSlices(
        meta["case_id"],
        image,
        label,
        np.asarray(slices["foreground"], dtype=np.int64),
        np.asarray(slices.get(f"class_{TUMOR}", []), dtype=np.int64),
    )


def _pairs(cases: list[CaseSlices], attr: str) -> np.ndarray:
    """(case, slice) pairs of the slices listed in one attribute of each case."""
    return np.array([(i, s) for i, c in enumerate(cases) for s in getattr(c, attr)], dtype=np.int64).reshape(-1, 2)


def slice_table(cases: list[CaseSlices]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(case, slice) pairs of all slices, of the foreground slices and of the tumour slices."""
    every = np.array([(i, s) for i, c in enumerate(cases) for s in range(c.image.shape[0])], dtype=np.int64)
    return every, _pairs(cases, "foreground"), _pairs(cases, "tumor")


#: How a slice of a batch was drawn: for its tumour, for its foreground, or at random.
TUMOR_DRAW, FOREGROUND_DRAW, RANDOM_DRAW = 0, 1, 2
#: The values of ``training.crop``.
CROPS = ("paper", "foreground")


def draw_counts(tables, batch_size: int, n_fg: int, n_tumor: int = 0) -> tuple[int, int, int]:
    """How many tumour, foreground and random draws a batch makes (none of a class the cases lack)."""
    _, fg, tumor = tables
    n_fg = n_fg if len(fg) else 0
    n_tumor = min(n_tumor, n_fg) if len(tumor) else 0
    return n_tumor, n_fg - n_tumor, batch_size - n_fg


def draw_kinds(tables, batch_size: int, n_fg: int, n_tumor: int = 0) -> np.ndarray:
    """The kind of draw of each slice of a batch, in the order :func:`choose_slices` returns them."""
    counts = draw_counts(tables, batch_size, n_fg, n_tumor)
    return np.repeat(np.array([TUMOR_DRAW, FOREGROUND_DRAW, RANDOM_DRAW]), counts)


def choose_slices(rng: np.random.Generator, tables, batch_size: int, n_fg: int, n_tumor: int = 0) -> np.ndarray:
    """Draw ``n_tumor`` tumour slices, ``n_fg - n_tumor`` foreground slices and random ones for the rest."""
    every, fg, tumor = tables
    n_tumor, n_fg_only, n_random = draw_counts(tables, batch_size, n_fg, n_tumor)
    picks = (
        [tumor[rng.integers(len(tumor), size=n_tumor)], fg[rng.integers(len(fg), size=n_fg_only)]]
        if n_tumor + n_fg_only
        else []
    )
    picks.append(every[rng.integers(len(every), size=n_random)])
    return np.concatenate(picks)


def centre_voxel(rng: np.random.Generator, label: np.ndarray, kind: int) -> np.ndarray | None:
    """A random voxel of the class a slice was drawn for (None: a random draw, or the slice lacks the class)."""
    if kind == RANDOM_DRAW:
        return None
    where = np.argwhere(label == TUMOR if kind == TUMOR_DRAW else label > 0)
    return where[rng.integers(len(where))] if len(where) else None


def cut_region(array: np.ndarray, centre, size, at, pad_value) -> np.ndarray:
    """The ``size`` window of a 2D array holding ``centre`` at index ``at``, padded where it leaves the array."""
    out = np.full(tuple(size), pad_value, dtype=array.dtype)
    src, dst = [], []
    for n, s, c, i in zip(array.shape, size, centre, at):
        first = int(c) - int(i)  # array index of the window's first element
        a, b = max(first, 0), min(first + int(s), n)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - first, a - first + max(b - a, 0)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def sample_slice(
    augmenter: Augmenter, image: np.ndarray, label: np.ndarray, seed: int, kind: int, crop: str = "paper"
) -> tuple[np.ndarray, np.ndarray]:
    """One training crop of a slice: random (``paper``, random draws) or centred on a voxel of the drawn class."""
    centre = centre_voxel(np.random.default_rng(seed), label, kind) if crop == "foreground" else None
    if centre is None:
        return augment(augmenter, image, label, seed)
    image, label = np.asarray(image), np.asarray(label)
    size, at = augmenter.region(), augmenter.centre_index()
    pad = padding_value(image)
    region = cut_region(image, centre, size, at, pad)
    return augment(augmenter, region, cut_region(label, centre, size, at, 0), seed, centred=True, pad=pad)


def batch_plan(k: int, tables, batch_size: int, n_fg: int, seed: int, n_tumor: int = 0):
    """Batch ``k``'s slices as (case, slice) pairs, the kind of each draw and each slice's seed."""
    rng = np.random.default_rng([seed, k])
    picks = choose_slices(rng, tables, batch_size, n_fg, n_tumor)
    return picks, draw_kinds(tables, batch_size, n_fg, n_tumor), rng.integers(0, 2**31, size=len(picks))


def make_batch(
    k: int,
    cases: list[CaseSlices],
    tables,
    augmenter: Augmenter,
    batch_size: int,
    n_fg: int,
    seed: int,
    n_tumor: int = 0,
    crop: str = "paper",
):
    """Batch number ``k``: images (B, H, W, 1) float32 and labels (B, H, W) uint8."""
    check_crop(crop)
    picks, kinds, seeds = batch_plan(k, tables, batch_size, n_fg, seed, n_tumor)
    images, labels = zip(
        *(
            sample_slice(augmenter, cases[c].image[s], cases[c].label[s], int(sd), int(kind), crop)
            for (c, s), sd, kind in zip(picks, seeds, kinds)
        )
    )
    return np.stack(images)[..., None], np.stack(labels)


def check_crop(crop: str) -> None:
    """ValueError unless ``crop`` is one of :data:`CROPS`."""
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r} (expected one of {list(CROPS)})")


def batch_stream(
    cases, augmenter: Augmenter, batch_size: int, n_fg: int, seed: int, start: int = 0, n_tumor: int = 0, crop="paper"
):
    """Endless batches ``start, start+1, ...`` in order."""
    tables = slice_table(cases)
    k = start
    while True:
        yield make_batch(k, cases, tables, augmenter, batch_size, n_fg, seed, n_tumor, crop)
        k += 1


@dataclass(frozen=True)
class StreamSpec:
    """Everything (picklable) that defines a batch stream: case folders, augmentation and sampling settings, seed.

    ``augmentation`` None is the paper's augmentation alone (as a block with every probability 0).
    """

    case_dirs: tuple[str, ...]
    patch_size: tuple[int, ...]
    scale_range: tuple[float, ...]
    p_scale: float
    p_mirror: float
    batch_size: int
    n_fg: int
    seed: int
    n_tumor: int = 0
    crop: str = "paper"
    augmentation: Augmentation | None = None

    def __post_init__(self) -> None:
        check_crop(self.crop)

    def augmenter(self) -> Augmenter:
        """The stream's transforms."""
        return make_augmenter(self.patch_size, self.scale_range, self.p_scale, self.p_mirror, self.augmentation)


_WORKER: dict = {}


def _worker_init(spec: StreamSpec) -> None:
    """Open the memory-mapped cases and build the transforms once per worker process."""
    cases = [load_case(d) for d in spec.case_dirs]
    _WORKER.update(
        spec=spec,
        cases=cases,
        tables=slice_table(cases),
        augmenter=spec.augmenter(),
    )


def _worker_batch(k: int):
    """Batch ``k`` in a worker process."""
    w, spec = _WORKER, _WORKER["spec"]
    return make_batch(
        k, w["cases"], w["tables"], w["augmenter"], spec.batch_size, spec.n_fg, spec.seed, spec.n_tumor, spec.crop
    )


def _worker_ready() -> bool:
    """A no-op task that makes the executor start a worker."""
    return True


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Keep spawned workers from re-running the parent's __main__ script (Snakemake scripts have no main guard)."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    if main is not None:
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


class BatchLoader:
    """Batches ``start, start+1, ...`` made by ``num_workers`` spawned processes (0 = in-process), in order.

    At most ``2 * num_workers`` batches are in flight. Use as a context manager so the
    pool is always shut down; the stream is identical for any worker count.
    """

    def __init__(self, spec: StreamSpec, start: int = 0, num_workers: int = 1, poll_s: float = 0.5):
        self.spec, self.start, self.num_workers, self.poll_s = spec, int(start), int(num_workers), poll_s
        self.pool = None
        self.closed = False

    def __enter__(self) -> BatchLoader:
        if self.num_workers > 0:
            with _main_script_hidden():
                # an executor, not multiprocessing.Pool: a worker that dies raises BrokenProcessPool instead of
                # hanging, and shutting down cannot deadlock on the pool's task-queue lock
                self.pool = ProcessPoolExecutor(
                    self.num_workers,
                    mp_context=mp.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(self.spec,),
                )
                # workers start on demand: start them all now, while the main script is hidden
                for ready in [self.pool.submit(_worker_ready) for _ in range(self.num_workers)]:
                    ready.result()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers and wait for them to exit."""
        self.closed = True
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)  # queued batches dropped, running ones (ms) finish
            self.pool = None

    def batches(self):
        """Endless batches in order; ends quietly once the loader is closed."""
        if self.num_workers == 0:
            spec = self.spec
            cases = [load_case(d) for d in spec.case_dirs]
            yield from batch_stream(
                cases, spec.augmenter(), spec.batch_size, spec.n_fg, spec.seed, self.start, spec.n_tumor, spec.crop
            )
            return
        pending, k = deque(), self.start
        while not self.closed:
            while len(pending) < 2 * self.num_workers and self.pool is not None:
                pending.append(self.pool.submit(_worker_batch, k))
                k += 1
            batch = self._wait(pending.popleft()) if pending else None
            if batch is None:
                return
            yield batch

    def _wait(self, result):
        """The result of one task, or None once the loader is closed."""
        while not self.closed:
            try:
                return result.result(timeout=self.poll_s)
            except FuturesTimeout:
                continue
        return None


def crop_or_pad(array: np.ndarray, size, center, pad_value: float) -> np.ndarray:
    """A ``size`` window of a 2D array around ``center``, padded where it leaves the array."""
    out = np.full(tuple(size), pad_value, dtype=array.dtype)
    src, dst = [], []
    for n, s, c in zip(array.shape, size, center):
        start = int(np.clip(round(c - s / 2), 0, max(n - s, 0))) if n >= s else 0
        length = min(s, n)
        offset = 0 if n >= s else (s - n) // 2
        src.append(slice(start, start + length))
        dst.append(slice(offset, offset + length))
    out[tuple(dst)] = array[tuple(src)]
    return out


def validation_set(cases: list[CaseSlices], n_slices: int, patch_size, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed validation crops: mostly foreground slices, centred on the foreground."""
    rng = np.random.default_rng([seed, 7919])
    every, fg, _ = slice_table(cases)
    n_fg = min(len(fg), int(round(n_slices * 5 / 7)))
    picks = np.concatenate([fg[rng.permutation(len(fg))[:n_fg]], every[rng.permutation(len(every))[: n_slices - n_fg]]])
    xs, ys = [], []
    for c, s in picks:
        img, lab = np.asarray(cases[c].image[s]), np.asarray(cases[c].label[s])
        where = np.argwhere(lab > 0)
        center = where.mean(axis=0) if len(where) else np.asarray(lab.shape) / 2
        xs.append(crop_or_pad(img, patch_size, center, padding_value(img)))
        ys.append(crop_or_pad(lab, patch_size, center, 0))
    return np.stack(xs)[..., None].astype(np.float32), np.stack(ys).astype(np.uint8)
