"""Real-geometry evaluation set: real KiTS19 label volumes, CT intensities from a generator unlike the phantom's.

    .venv/bin/python benchmarks/real_geometry.py --preset presets/demo.yaml --out results/real_geometry/NAME
        [--cases N] [--split 0.6 0.1 0.3] [--set training.epochs=2 ...] [--seed 13] [--cores 2]
        [--labels ../shared/data/kits19-labels] [--data results/real_geometry/data] [--build-only]

**The data.** Each label volume of ``--labels`` (the 23 KiTS19 cases of ../shared/data; the
KiTS23 copy of case_00000 is the same patient and is not used) keeps its real grid: shape,
spacing (0.5-5 mm between slices) and header. :func:`synthesize_ct` paints a plausible CT
around it, seeded per case (``default_rng([seed, case number])``), and :func:`write_case`
writes ``<data>/case_X/imaging.nii.gz`` (int16) with the label's own affine and qform/sform
codes, the label beside it, and ``params.json`` (the intensities drawn, for analysis). Every
third case (index 2, 5, ... of the sorted list) is re-saved in RAS with slices last, image and
label alike, the "mixed orientations" of issue 13. ``manifest_<N>.csv`` lists the first N
cases for ``dataset.source: local``. A case whose ``params.json`` matches (seed, generator
version, source file, orientation) is not generated again, so recipes share the data.

**The intensity model** is built around the real labels (nothing of the phantom is reused):
a body ellipse placed from the kidneys (10-35 mm of cavity, then the back wall's fat and muscle
behind them; grown until it holds every label voxel), subcutaneous fat of varying thickness,
a muscle wall, an abdominal cavity mixing visceral fat and soft tissue, lung bases above the kidneys, a CT table, spine,
paraspinal and psoas muscles, aorta and IVC, a liver beside and above the right kidney and a
spleen beside the left, both with kidney-like HU, 1-4 bowel-like blobs in front of the
kidneys, perirenal fat, a kidney cortex (a shell of the label, by depth) over a lobulated
medulla, and a tumour whose mean HU is the kidney's mean plus a drawn contrast, with
heterogeneous texture and sometimes a necrotic core. Then a smooth additive bias field and
cupping, a slice-profile and in-plane blur set by the voxel spacing, correlated (in-plane
filtered) noise, clipping and int16. Smooth fields are coarse Gaussian lattices interpolated
with cubic B-splines.

How the distributions differ from kidney_seg/data/phantom.py (HU; uniform unless said):

======================  =========================  ==========================================
quantity                phantom                    here
======================  =========================  ==========================================
contrast phase          one (fixed ranges)         corticomedullary 35 %, nephrographic 45 %,
                                                   late / low enhancement 20 %
kidney cortex           150..200                   170..280 / 130..210 / 90..150 by phase
kidney medulla          80..120                    60..120 / cortex - (-10..25) /
                                                   cortex - (0..20)
tumour                  absolute 20..90,           kidney mean + contrast: hypo -140..-20
                        clipped                    (55 %), iso -20..20 (25 %), hyper 20..70
                                                   (20 %); mean >= 5; texture 10..40
necrotic core           20..40 below, r > 12 mm,   0..30 HU fluid, 40 % of the tumours at
                        50 %                       least 6 mm deep
liver / spleen          55..70 / 45..65            kidney mean + (-60..10) / + (-40..20)
subcutaneous fat        -100, texture 8            -120..-80, texture 5..15
muscle                  45..60                     35..70
aorta                   180..250                   by phase: 200..380 / 130..220 / 100..160
vertebra cortex/core    600..800 / 200..300        400..1000 / 120..350
noise                   white, sigma 12            in-plane correlated (kernel 0.6..1.5 px),
                                                   sigma 8..30
blur                    3-tap, 0.3 vox in z        Gaussian, slice profile FWHM 1.0..1.5 x
                                                   spacing, in-plane FWHM 0.6..1.2 mm
bias                    none                       smooth field +-5..30, cupping 0..20
lungs, table            none                       lung bases -900..-780; table 70 %
======================  =========================  ==========================================

**The driver** builds the data, writes ``<out>/config.yaml`` (the preset, then
``dataset: local`` with the manifest, ``split.fractions``, ``results_dir: <out>/results`` and
every ``--set KEY=VALUE``, the value read as YAML), runs the workflow in its own working
directory (``snakemake --cores C --snakefile Snakefile --directory <out> --configfile
config.yaml <out>/config.yaml``, as tests/workflow_runs.py does, so it never touches another
run's locks) and prints the scores from ``metrics/summary.csv`` (TK and TU Dice, tumour
precision and recall, the share of test cases with a tumour whose tumour was missed entirely),
the training steps and times, and the time per case of each stage. ``<out>/summary.md`` and
``summary.json`` keep them. ``--leave-out CASE ...`` drops cases from the manifest (so that a
benchmark can time a model on a case it never trained on); ``--train-only`` stops the workflow
once the model is trained (``snakemake --until train``) and scores nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml
from nibabel import orientations as ornt
from scipy import ndimage

try:  # a dependency of batchgenerators: small matrix products only lose from BLAS threads
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - still works, slower on busy CPUs
    threadpool_limits = None

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kidney_seg.atomic import atomic_path, read_json, write_json_atomic, write_text_atomic  # noqa: E402
from kidney_seg.config import deep_merge, validate_config  # noqa: E402
from kidney_seg.vocabulary import IMAGE_NAME, KIDNEY, KITS19_LABELS, LABEL_NAME, TUMOR  # noqa: E402
from kidney_seg.volume import from_internal, read_label  # noqa: E402

GENERATOR_VERSION = 1
DEFAULT_LABELS = ROOT.parent / "shared" / "data" / "kits19-labels"
DEFAULT_DATA = ROOT / "results" / "real_geometry" / "data"
DEFAULT_SEED = 13
SLAB = 32  # slices processed at once by the full-volume passes
HU_MIN, HU_MAX = -1024.0, 3071.0
FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
AIR, FAT, WALL, CAVITY, ORGAN, RETRO = 0, 1, 2, 3, 4, 5  # tissue codes of the work map
PHASES = {"corticomedullary": 0.35, "nephrographic": 0.45, "late": 0.20}
Range = tuple[float, float]


# ----------------------------------------------------------------------------- intensities


@dataclass(frozen=True)
class Intensities:
    """The HU parameters drawn for one case (see the module docstring for the ranges)."""

    phase: str
    cortex: float
    medulla: float
    kidney_texture: float
    cortex_mm: float
    tumour_kind: str
    tumour_contrast: float
    tumour_texture: float
    tumour_cell_mm: float
    necrotic: bool
    necrosis_hu: float
    liver_offset: float
    spleen_offset: float
    fat: float
    fat_texture: float
    visceral_fat: float
    soft_tissue: float
    muscle: float
    lung: float
    aorta: float
    ivc: float
    bone_cortex: float
    bone_core: float
    table: float
    perirenal_fat: float
    perirenal_mm: float
    bias: float
    bias_cell_mm: float
    cupping: float
    noise: float
    noise_kernel_px: float
    thickness_factor: float
    inplane_fwhm_mm: float


def _u(rng: np.random.Generator, bounds: Range) -> float:
    """A uniform draw from (low, high) as a float."""
    return float(rng.uniform(bounds[0], bounds[1]))


def _draw_kidney(rng: np.random.Generator) -> tuple[str, float, float]:
    """Contrast phase, cortex and medulla HU."""
    phase = str(rng.choice(list(PHASES), p=list(PHASES.values())))
    if phase == "corticomedullary":
        return phase, _u(rng, (170, 280)), _u(rng, (60, 120))
    cortex = _u(rng, (130, 210) if phase == "nephrographic" else (90, 150))
    return phase, cortex, cortex - _u(rng, (-10, 25) if phase == "nephrographic" else (0, 20))


def _draw_tumour_contrast(rng: np.random.Generator) -> tuple[str, float]:
    """Tumour mean minus kidney mean: hypo, iso (overlapping) or hyper."""
    kind = str(rng.choice(["hypo", "iso", "hyper"], p=[0.55, 0.25, 0.20]))
    return kind, _u(rng, {"hypo": (-140, -20), "iso": (-20, 20), "hyper": (20, 70)}[kind])


def draw_intensities(rng: np.random.Generator) -> Intensities:
    """Draw every HU parameter of a case (a fixed number of draws)."""
    phase, cortex, medulla = _draw_kidney(rng)
    kind, contrast = _draw_tumour_contrast(rng)
    aorta = {"corticomedullary": (200, 380), "nephrographic": (130, 220), "late": (100, 160)}[phase]
    return Intensities(
        phase=phase,
        cortex=cortex,
        medulla=medulla,
        kidney_texture=_u(rng, (4, 15)),
        cortex_mm=_u(rng, (3.5, 8.0)),
        tumour_kind=kind,
        tumour_contrast=contrast,
        tumour_texture=_u(rng, (10, 40)),
        tumour_cell_mm=_u(rng, (4, 12)),
        necrotic=bool(rng.random() < 0.4),
        necrosis_hu=_u(rng, (0, 30)),
        liver_offset=_u(rng, (-60, 10)),
        spleen_offset=_u(rng, (-40, 20)),
        fat=_u(rng, (-120, -80)),
        fat_texture=_u(rng, (5, 15)),
        visceral_fat=_u(rng, (-120, -80)),
        soft_tissue=_u(rng, (10, 50)),
        muscle=_u(rng, (35, 70)),
        lung=_u(rng, (-900, -780)),
        aorta=_u(rng, aorta),
        ivc=_u(rng, (70, 160)),
        bone_cortex=_u(rng, (400, 1000)),
        bone_core=_u(rng, (120, 350)),
        table=_u(rng, (-400, 100)) if rng.random() < 0.7 else float("nan"),
        perirenal_fat=_u(rng, (-115, -70)),
        perirenal_mm=_u(rng, (1.0, 12.0)),
        bias=_u(rng, (5, 30)),
        bias_cell_mm=_u(rng, (120, 220)),
        cupping=_u(rng, (0, 20)),
        noise=_u(rng, (8, 30)),
        noise_kernel_px=_u(rng, (0.6, 1.5)),
        thickness_factor=_u(rng, (1.0, 1.5)),
        inplane_fwhm_mm=_u(rng, (0.6, 1.2)),
    )


# ----------------------------------------------------------------------------- smooth fields


def _bspline(t: np.ndarray) -> np.ndarray:
    """The cubic B-spline kernel at ``t`` (in lattice cells)."""
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


@dataclass(frozen=True)
class Lattice:
    """A smooth unit-variance random field: N(0, 1) nodes on a lattice in mm, cubic B-spline weights."""

    origin: tuple[float, float, float]
    cell: tuple[float, float, float]
    coef: np.ndarray

    def weights(self, axis: int, coords: np.ndarray) -> np.ndarray:
        """Interpolation matrix (points x nodes) of one axis, rows scaled to unit sum of squares."""
        t = (np.asarray(coords, dtype=np.float64)[:, None] - self.origin[axis]) / self.cell[axis]
        w = _bspline(t - np.arange(self.coef.shape[axis])[None, :])
        return (w / np.sqrt((w * w).sum(axis=1, keepdims=True) + 1e-12)).astype(np.float32)

    def plane(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The in-plane axes contracted: (z nodes, len y, len x), for many :meth:`on_plane` calls."""
        f = np.tensordot(self.coef, self.weights(2, x), axes=([2], [1]))  # (gz, gy, nx)
        return np.ascontiguousarray(np.einsum("zgx,yg->zyx", f, self.weights(1, y), optimize=True))

    def on_plane(self, plane: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The field at slices ``z`` (mm) from a :meth:`plane`, float32 (len z, len y, len x)."""
        return np.tensordot(self.weights(0, z), plane, axes=([1], [0]))

    def at(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The field on the grid spanned by coordinate vectors (mm), float32 (len z, len y, len x)."""
        return self.on_plane(self.plane(y, x), z)


def lattice(rng: np.random.Generator, lo: Sequence[float], hi: Sequence[float], cell: Sequence[float]) -> Lattice:
    """A lattice covering the box [lo, hi] (mm) with a 2-cell margin."""
    origin = tuple(float(a) - 2.0 * c for a, c in zip(lo, cell))
    counts = tuple(int(math.ceil((b - a) / c)) + 5 for a, b, c in zip(lo, hi, cell))
    return Lattice(origin, tuple(float(c) for c in cell), rng.standard_normal(counts, dtype=np.float32))


# ----------------------------------------------------------------------------- grid and landmarks


@dataclass(frozen=True)
class Grid:
    """Voxel-centre coordinates (mm) of the internal axes: z inferior, y posterior, x left."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    spacing: tuple[float, float, float]

    @classmethod
    def of(cls, shape: Sequence[int], spacing: Sequence[float]) -> Grid:
        """The grid of a volume, origin at its first voxel."""
        axes = [np.arange(n, dtype=np.float32) * np.float32(s) for n, s in zip(shape, spacing)]
        return cls(axes[0], axes[1], axes[2], tuple(float(s) for s in spacing))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (slices, rows, columns)."""
        return (self.z.size, self.y.size, self.x.size)

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index box of the voxels inside [lo, hi] (mm); None when empty."""
        out = []
        for c, a, b, s in zip((self.z, self.y, self.x), lo, hi, self.spacing):
            i, j = max(0, int(math.ceil(a / s))), min(c.size, int(math.floor(b / s)) + 1)
            if i >= j:
                return None
            out.append(slice(i, j))
        return tuple(out)

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinate vectors of a box."""
        return self.z[box[0]], self.y[box[1]], self.x[box[2]]


@dataclass(frozen=True)
class Part:
    """One connected piece of kidney (labels 1 and 2): centroid and bounding box in mm (z, y, x)."""

    centre: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def kidney_parts(label: np.ndarray, spacing: Sequence[float]) -> list[Part]:
    """The one or two largest kidney pieces, found on a ~3 mm subsampled copy."""
    step = tuple(max(1, round(3.0 / s)) for s in spacing)
    coarse = label[:: step[0], :: step[1], :: step[2]] > 0
    comp, n = ndimage.label(coarse)
    if n == 0:
        return []
    sizes = np.bincount(comp.ravel())[1:]
    keep = [int(i) + 1 for i in np.argsort(sizes)[::-1][:2] if sizes[i] >= 0.1 * sizes.sum()]
    mm = np.asarray(step, float) * np.asarray(spacing, float)
    parts = []
    for k in keep:
        idx = np.argwhere(comp == k) * mm
        parts.append(Part(idx.mean(axis=0), idx.min(axis=0), idx.max(axis=0) + mm))
    return parts


@dataclass(frozen=True)
class Body:
    """The body ellipse (mm): midline, centre row, half axes, shape harmonics, layers and z-scale."""

    mx: float
    cy: float
    a_x: float
    a_ant: float
    a_post: float
    harmonics: tuple[float, float, float, float]
    fat_mm: float
    fat_aniso: float
    wall_mm: float
    zscale: np.ndarray

    def radius(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Normalised 2D radius (1 = skin) on the (y, x) grid, before the z-scale."""
        dy, dx = (y[:, None] - self.cy), (x[None, :] - self.mx)
        yn = np.where(dy > 0, dy / self.a_post, dy / self.a_ant)
        theta = np.arctan2(dy, dx)
        h2, p2, h3, p3 = self.harmonics
        return (np.hypot(yn, dx / self.a_x) * (1 + h2 * np.cos(2 * theta + p2) + h3 * np.cos(3 * theta + p3))).astype(
            np.float32
        )

    def layers(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radii of the inner fat edge and of the cavity edge (fat thicker at the back)."""
        theta = np.arctan2(y[:, None] - self.cy, x[None, :] - self.mx)
        a_y = np.where(np.sin(theta) > 0, self.a_post, self.a_ant)
        reach = np.hypot(self.a_x * np.cos(theta), a_y * np.sin(theta))  # centre to skin along theta (mm)
        fat = self.fat_mm * (1 + self.fat_aniso * np.sin(theta))  # +y: posterior
        return (1 - fat / reach).astype(np.float32), (1 - (fat + self.wall_mm) / reach).astype(np.float32)

    def back_layers_mm(self) -> float:
        """Fat and wall thickness behind the centre (mm)."""
        return self.fat_mm * (1 + self.fat_aniso) + self.wall_mm


@dataclass(frozen=True)
class Anatomy:
    """Landmarks derived from the labels: kidneys (right, left; None where absent) and the body."""

    right: Part | None
    left: Part | None
    body: Body
    spine_y: float
    z_top: float


def _midline(rng: np.random.Generator, parts: list[Part], grid: Grid) -> float:
    """The body's midline x (mm): between two kidneys, else beside one."""
    fov_cx = float(grid.x[-1]) / 2
    if len(parts) == 2 and abs(parts[0].centre[2] - parts[1].centre[2]) > 50:
        return float((parts[0].centre[2] + parts[1].centre[2]) / 2)
    if not parts:
        return fov_cx
    px = float(parts[0].centre[2])
    if abs(px - fov_cx) < 40:
        return px
    return px - math.copysign(_u(rng, (55, 80)), px - fov_cx)


def _label_points(label: np.ndarray, grid: Grid) -> np.ndarray:
    """(y, x) in mm of the label's in-plane projection, on a ~4 mm subsample."""
    step = max(1, round(4.0 / grid.spacing[1]))
    proj = (label[:, ::step, ::step] > 0).any(axis=0)
    j, k = np.nonzero(proj)
    return np.stack([grid.y[::step][j], grid.x[::step][k]], axis=1) if j.size else np.zeros((0, 2), np.float32)


def _fits(body: Body, points: np.ndarray) -> bool:
    """Whether every label point lies well inside the cavity at every z."""
    if not len(points):
        return True
    y, x = points[:, 0], points[:, 1]
    rr = np.diag(body.radius(y, x)) / float(body.zscale.min())
    r_cav = np.diag(body.layers(y, x)[1])
    return bool((rr < r_cav - 0.04).all())


def _grown(body: Body, factor: float, back_mm: float) -> Body:
    """The body widened and deepened by ``factor``, its posterior skin moved back by ``back_mm``."""
    return Body(
        body.mx,
        body.cy + back_mm,
        body.a_x * factor,
        body.a_ant * factor,
        body.a_post,
        body.harmonics,
        body.fat_mm,
        body.fat_aniso,
        body.wall_mm,
        body.zscale,
    )


def _body(rng: np.random.Generator, grid: Grid, parts: list[Part], mx: float, points: np.ndarray) -> Body:
    """Place the body ellipse: posterior skin behind the kidneys, grown until it holds every label voxel."""
    ky_post = max((float(p.hi[1]) for p in parts), default=float(grid.y[-1]) * 0.6)
    gap = _u(rng, (10, 35))  # kidney to the inner edge of the back wall (mm)
    a_x = _u(rng, (140, 190))
    a_post = a_x * _u(rng, (0.55, 0.75))
    z_field = lattice(rng, (0, 0, 0), (float(grid.z[-1]), 0, 0), (_u(rng, (60, 120)), 1, 1))
    amp = _u(rng, (0.02, 0.06))
    zscale = 1 + amp * z_field.at(grid.z, np.zeros(1, np.float32), np.zeros(1, np.float32))[:, 0, 0]
    harmonics = (_u(rng, (0, 0.05)), _u(rng, (0, 2 * math.pi)), _u(rng, (0, 0.03)), _u(rng, (0, 2 * math.pi)))
    a_ant, fat_mm, fat_aniso, wall_mm = (
        a_post * _u(rng, (1.0, 1.25)),
        _u(rng, (8, 35)),
        _u(rng, (0, 0.5)),
        _u(rng, (6, 14)),
    )
    body = Body(mx, 0.0, a_x, a_ant, a_post, harmonics, fat_mm, fat_aniso, wall_mm, zscale.astype(np.float32))
    body = _grown(body, 1.0, ky_post + gap + body.back_layers_mm() - a_post)
    for _ in range(60):
        if _fits(body, points):
            break
        body = _grown(body, 1.04, 2.0)
    return body


def anatomy(rng: np.random.Generator, label: np.ndarray, grid: Grid) -> Anatomy:
    """Kidneys, midline, body and spine level of a case."""
    parts = kidney_parts(label, grid.spacing)
    mx = _midline(rng, parts, grid)
    right = next((p for p in parts if p.centre[2] < mx), None)
    left = next((p for p in parts if p.centre[2] >= mx), None)
    body = _body(rng, grid, parts, mx, _label_points(label, grid))
    ky = float(np.mean([p.centre[1] for p in parts])) if parts else body.cy + 0.4 * body.a_post
    z_top = min((float(p.lo[0]) for p in parts), default=float(grid.z[-1]) / 2)
    return Anatomy(right, left, body, ky + _u(rng, (0, 15)), z_top)


# ----------------------------------------------------------------------------- painting


@dataclass
class Canvas:
    """The volume being painted (HU, float32), its tissue map and the (read-only) labels."""

    img: np.ndarray
    tissue: np.ndarray
    label: np.ndarray
    grid: Grid


def _slabs(n: int) -> Iterator[slice]:
    """Slices of SLAB slices along z."""
    for start in range(0, n, SLAB):
        yield slice(start, min(start + SLAB, n))


def paint_body(rng: np.random.Generator, grid: Grid, anat: Anatomy, hu: Intensities, label: np.ndarray) -> Canvas:
    """Air, subcutaneous fat, muscle wall, a fat/soft-tissue cavity, lung bases and the table."""
    lo, hi = (0.0, 0.0, 0.0), (float(grid.z[-1]), float(grid.y[-1]), float(grid.x[-1]))
    fine, mix = lattice(rng, lo, hi, (12.0, 9.0, 9.0)), lattice(rng, lo, hi, (35.0, 25.0, 25.0))
    threshold, z_lung = _u(rng, (-0.4, 0.4)), anat.z_top - _u(rng, (40, 110))
    body = anat.body
    r2d, (r_fat, r_cav) = body.radius(grid.y, grid.x), body.layers(grid.y, grid.x)
    fine_plane, mix_plane = fine.plane(grid.y, grid.x), mix.plane(grid.y, grid.x)
    img, tissue = np.empty(grid.shape, np.float32), np.empty(grid.shape, np.uint8)
    for sl in _slabs(grid.shape[0]):
        rr = r2d[None] / body.zscale[sl, None, None]
        t = tissue[sl]
        np.add(rr < 1, rr < r_fat[None], out=t, dtype=np.uint8)
        t += rr < r_cav[None]  # 0 air, 1 fat, 2 wall, 3 cavity
        f = fine.on_plane(fine_plane, grid.z[sl])
        w = 1 / (1 + np.exp(-(mix.on_plane(mix_plane, grid.z[sl]) - threshold) / 0.25))
        out = img[sl]
        out[...] = hu.visceral_fat + (hu.soft_tissue - hu.visceral_fat) * w + 6 * f
        lung = (grid.z[sl] < z_lung)[:, None, None] & (t == CAVITY)
        out[lung] = hu.lung + 30 * f[lung]
        for code, base, amp in ((AIR, -1000.0, 0.0), (FAT, hu.fat, hu.fat_texture), (WALL, hu.muscle, 5.0)):
            m = t == code
            out[m] = base + amp * f[m]
    _paint_table(rng, grid, body, hu, img)
    return Canvas(img, tissue, label, grid)


def _paint_table(rng: np.random.Generator, grid: Grid, body: Body, hu: Intensities, img: np.ndarray) -> None:
    """A flat CT table behind the body (70 % of cases)."""
    if math.isnan(hu.table):
        return
    top = body.cy + body.a_post * float(body.zscale.max()) + _u(rng, (5, 30))
    box = grid.box((-1, top, body.mx - 1.1 * body.a_x), (1e9, top + _u(rng, (6, 15)), body.mx + 1.1 * body.a_x))
    if box is not None:
        img[box] = hu.table


def _ellipsoid_box(
    grid: Grid, centre: np.ndarray, axes: np.ndarray, rot: np.ndarray
) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None]:
    """Box around a rotated ellipsoid and the squared normalised radius in it (None when outside)."""
    half = np.sqrt(((rot * axes[None, :]) ** 2).sum(axis=1)) * 1.25
    box = grid.box(centre - half, centre + half)
    if box is None:
        return None, None
    z, y, x = grid.coords(box)
    d = (z[:, None, None] - centre[0], y[None, :, None] - centre[1], x[None, None, :] - centre[2])
    r2 = sum(((rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2]) / axes[i]) ** 2 for i in range(3))
    return box, r2.astype(np.float32)


def _rotation(rng: np.random.Generator, tilt: float) -> np.ndarray:
    """A rotation: up to ``tilt`` radians about each axis."""
    out = np.eye(3)
    for i, j in ((1, 2), (0, 1), (0, 2)):
        a = _u(rng, (-tilt, tilt))
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        out = out @ r
    return out


def paint_blob(
    rng: np.random.Generator, canvas: Canvas, centre: Sequence[float], axes: Sequence[float], hu: float, texture: float
) -> None:
    """A deformed, textured ellipsoid organ in the cavity, never over a label voxel."""
    centre, axes = np.asarray(centre, float), np.asarray(axes, float)
    rot = _rotation(rng, 0.5)
    cell = max(6.0, float(axes.min()) / 2)
    box, r2 = _ellipsoid_box(canvas.grid, centre, axes, rot)
    if box is None:
        return
    coords = canvas.grid.coords(box)
    f = lattice(rng, [float(c[0]) for c in coords], [float(c[-1]) for c in coords], (cell,) * 3).at(*coords)
    mask = (r2 < (1 + 0.15 * f) ** 2) & np.isin(canvas.tissue[box], (CAVITY, ORGAN)) & (canvas.label[box] == 0)
    canvas.img[box][mask] = (hu + texture * f)[mask]
    canvas.tissue[box][mask] = ORGAN


def kidney_mean(hu: Intensities) -> float:
    """The nominal kidney HU organs are matched to (mean of cortex and medulla)."""
    return (hu.cortex + hu.medulla) / 2


def paint_organs(rng: np.random.Generator, canvas: Canvas, anat: Anatomy, hu: Intensities) -> None:
    """Liver (right, above and beside the kidney), spleen (left) and 1-4 bowel-like blobs in front."""
    k, b = kidney_mean(hu), anat.body
    right = anat.right.centre if anat.right is not None else np.array([anat.z_top + 40, anat.spine_y, b.mx - 70])
    left = anat.left.centre if anat.left is not None else np.array([anat.z_top + 40, anat.spine_y, b.mx + 70])
    liver = right + [-_u(rng, (30, 80)), -_u(rng, (25, 60)), -_u(rng, (15, 45))]
    axes = [_u(rng, (70, 110)), _u(rng, (55, 85)), _u(rng, (55, 80))]
    paint_blob(rng, canvas, liver, axes, k + hu.liver_offset, _u(rng, (6, 15)))
    spleen = left + [-_u(rng, (20, 60)), _u(rng, (-25, 10)), _u(rng, (15, 40))]
    axes = [_u(rng, (40, 65)), _u(rng, (30, 45)), _u(rng, (20, 35))]
    paint_blob(rng, canvas, spleen, axes, k + hu.spleen_offset, _u(rng, (8, 20)))
    for _ in range(int(rng.integers(1, 5))):
        site = right if rng.random() < 0.5 else left
        centre = site + [_u(rng, (-40, 40)), -_u(rng, (30, 75)), _u(rng, (-40, 40))]
        kind = rng.random()
        value = k + _u(rng, (-50, 30)) if kind < 0.5 else _u(rng, (20, 60) if kind < 0.8 else (-20, 20))
        paint_blob(rng, canvas, centre, rng.uniform(12, 30, 3), value, _u(rng, (5, 15)))


def _column_mask(grid: Grid, cy: float, cx: float, ry: float, rx: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """In-plane box and mask of an ellipse (the same on every slice)."""
    box = grid.box((0, cy - ry, cx - rx), (1, cy + ry, cx + rx)) or (slice(0, 1), slice(0, 0), slice(0, 0))
    y, x = grid.y[box[1]], grid.x[box[2]]
    return box[1:], ((y[:, None] - cy) / ry) ** 2 + ((x[None, :] - cx) / rx) ** 2 < 1


def _paint_column(canvas: Canvas, box: tuple[slice, slice], mask: np.ndarray, hu: float | np.ndarray) -> None:
    """Paint an in-plane mask on every slice (``hu`` scalar or per slice), outside labels, inside the body."""
    view, tissue = canvas.img[:, box[0], box[1]], canvas.tissue[:, box[0], box[1]]
    m = mask[None] & (canvas.label[:, box[0], box[1]] == 0) & (tissue > AIR)
    values = np.broadcast_to(np.asarray(hu, np.float32).reshape(-1, 1, 1), view.shape)
    view[m] = values[m]
    tissue[m] = RETRO


def paint_retroperitoneum(rng: np.random.Generator, canvas: Canvas, anat: Anatomy, hu: Intensities) -> None:
    """Paraspinal and psoas muscles, vertebral bodies with discs, spinal canal, aorta and IVC."""
    g, mx, sy = canvas.grid, anat.body.mx, anat.spine_y
    vb_rx, vb_ry = _u(rng, (18, 25)), _u(rng, (15, 20))
    canal_y, canal_r = sy + vb_ry + _u(rng, (6, 10)), _u(rng, (6, 9))
    for side in (-1, 1):
        rx, ry = _u(rng, (20, 30)), _u(rng, (15, 25))
        _paint_column(canvas, *_column_mask(g, canal_y + ry * 0.6, mx + side * (rx + 4), ry, rx), hu.muscle)
        r = _u(rng, (10, 18))
        _paint_column(canvas, *_column_mask(g, sy, mx + side * (vb_rx + r), 0.85 * r, r), hu.muscle + 5)
    period, disc = _u(rng, (30, 40)), _u(rng, (6, 10))
    is_disc = np.mod(g.z - _u(rng, (0, period)), period) < disc
    _paint_column(canvas, *_column_mask(g, sy, mx, vb_ry, vb_rx), np.where(is_disc, 90.0, hu.bone_cortex))
    _paint_column(canvas, *_column_mask(g, sy, mx, vb_ry - 2.5, vb_rx - 2.5), np.where(is_disc, 90.0, hu.bone_core))
    _paint_column(canvas, *_column_mask(g, canal_y, mx, canal_r + 4, canal_r + 4), hu.bone_cortex)
    _paint_column(canvas, *_column_mask(g, canal_y, mx, canal_r, canal_r), 20.0)
    r = _u(rng, (8, 13))
    _paint_column(canvas, *_column_mask(g, sy - vb_ry - r - 3, mx + _u(rng, (5, 20)), r, r), hu.aorta)
    r = _u(rng, (9, 14))
    _paint_column(canvas, *_column_mask(g, sy - vb_ry - 0.7 * r - 2, mx - _u(rng, (18, 30)), 0.7 * r, r), hu.ivc)


def _label_box(label: np.ndarray, margin_vox: Sequence[int]) -> tuple[slice, slice, slice] | None:
    """Bounding box of the labels, grown by a margin per axis (None without labels)."""
    fg = label > 0
    out = []
    for axis, m in enumerate(margin_vox):
        idx = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        if not idx.size:
            return None
        out.append(slice(max(0, idx[0] - m), min(label.shape[axis], idx[-1] + m + 1)))
    return tuple(out)


def paint_kidneys(rng: np.random.Generator, canvas: Canvas, hu: Intensities) -> dict:
    """Perirenal fat, cortex shell over a lobulated medulla (label 1), then the tumour (label 2); measured means."""
    g = canvas.grid
    margin = [int(math.ceil((hu.perirenal_mm + 2) / s)) + 1 for s in g.spacing]
    box = _label_box(canvas.label, margin)
    if box is None:
        return {}
    lab, img, tissue = canvas.label[box], canvas.img[box], canvas.tissue[box]
    outside = ndimage.distance_transform_edt(lab == 0, sampling=g.spacing)
    fat = (lab == 0) & (outside <= hu.perirenal_mm) & np.isin(tissue, (CAVITY, ORGAN))
    img[fat] = hu.perirenal_fat + 5 * rng.standard_normal(int(fat.sum()), dtype=np.float32)
    del outside
    depth = ndimage.distance_transform_edt(lab > 0, sampling=g.spacing)
    coords = g.coords(box)
    lo, hi = [float(c[0]) for c in coords], [float(c[-1]) for c in coords]
    tex, pyr = lattice(rng, lo, hi, (5.0, 4.0, 4.0)).at(*coords), lattice(rng, lo, hi, (9.0, 7.0, 7.0)).at(*coords)
    medulla = (depth > hu.cortex_mm) & (pyr > _u(rng, (-0.5, 0.3)))
    kidney = lab == KIDNEY
    img[kidney] = (np.where(medulla, hu.medulla, hu.cortex) + hu.kidney_texture * tex)[kidney]
    kidney_hu = float(img[kidney].mean()) if kidney.any() else kidney_mean(hu)
    return {"kidney_mean_hu": kidney_hu, **_paint_tumour(rng, img, lab, coords, g.spacing, hu, kidney_hu)}


def _paint_tumour(
    rng: np.random.Generator,
    img: np.ndarray,
    lab: np.ndarray,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    spacing: Sequence[float],
    hu: Intensities,
    kidney_hu: float,
) -> dict:
    """Heterogeneous texture and maybe a fluid core; the whole tumour's mean is the kidney mean + contrast."""
    tumour = lab == TUMOR
    if not tumour.any():
        return {}
    lo, hi = [float(c[0]) for c in coords], [float(c[-1]) for c in coords]
    cell = (hu.tumour_cell_mm,) * 3
    tex = hu.tumour_texture * lattice(rng, lo, hi, cell).at(*coords)[tumour]
    depth = ndimage.distance_transform_edt(tumour, sampling=spacing)[tumour]
    core = (depth > _u(rng, (0.4, 0.7)) * depth.max()) if hu.necrotic and depth.max() >= 6.0 else depth < 0
    target = max(kidney_hu + hu.tumour_contrast, 5.0)
    values = np.where(core, hu.necrosis_hu + 0.3 * tex, tex - tex[~core].mean())
    solid_mean = (target * values.size - values[core].sum()) / max(int((~core).sum()), 1)
    img[tumour] = np.where(core, values, solid_mean + values)
    applied = target - kidney_hu
    return {"tumour_mean_hu": target, "tumour_contrast_applied": applied, "necrotic_share": float(core.mean())}


def add_bias(rng: np.random.Generator, canvas: Canvas, anat: Anatomy, hu: Intensities) -> None:
    """A smooth additive bias field and cupping (darker centre), inside the body only."""
    g, b = canvas.grid, anat.body
    hi = (float(g.z[-1]), float(g.y[-1]), float(g.x[-1]))
    field = lattice(rng, (0, 0, 0), hi, (hu.bias_cell_mm,) * 3)
    r2d, plane = b.radius(g.y, g.x), field.plane(g.y, g.x)
    for sl in _slabs(g.shape[0]):
        rr = np.minimum(r2d[None] / b.zscale[sl, None, None], 1.0)
        bias = hu.bias * field.on_plane(plane, g.z[sl]) - hu.cupping * (1 - rr * rr)
        canvas.img[sl] += np.where(canvas.tissue[sl] > AIR, bias, 0).astype(np.float32)


def blur(img: np.ndarray, spacing: Sequence[float], hu: Intensities) -> None:
    """Slice profile (FWHM = spacing x thickness factor) and in-plane PSF, in place."""
    inplane = hu.inplane_fwhm_mm / FWHM
    sigmas = (hu.thickness_factor / FWHM, inplane / spacing[1], inplane / spacing[2])
    for axis, sigma in enumerate(sigmas):
        if img.shape[axis] > 1:
            ndimage.gaussian_filter1d(img, sigma, axis=axis, output=img, mode="nearest", truncate=3.0)


def _noise_gain(sigma: float) -> float:
    """Standard deviation of unit white noise after the in-plane Gaussian filter."""
    n = int(8 * sigma) * 2 + 1
    delta = np.zeros((n, n), np.float64)
    delta[n // 2, n // 2] = 1.0
    return float(np.sqrt((ndimage.gaussian_filter(delta, sigma, truncate=3.0) ** 2).sum()))


def add_noise(rng: np.random.Generator, img: np.ndarray, hu: Intensities) -> None:
    """In-plane correlated Gaussian noise of standard deviation ``hu.noise``, in place."""
    gain = hu.noise / _noise_gain(hu.noise_kernel_px)
    for sl in _slabs(img.shape[0]):
        white = rng.standard_normal(img[sl].shape, dtype=np.float32)
        ndimage.gaussian_filter(white, (0, hu.noise_kernel_px, hu.noise_kernel_px), output=white, truncate=3.0)
        img[sl] += gain * white


def paint_anatomy(
    label: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, hu: Intensities | None = None
) -> tuple[Canvas, Anatomy, Intensities, dict]:
    """The noise-free, unblurred CT of a label volume (internal layout), its anatomy, HU draws and measured means."""
    drawn = draw_intensities(rng)  # drawn even when ``hu`` is given, so the later draws stay the same
    hu = drawn if hu is None else hu
    grid = Grid.of(label.shape, spacing)
    with _single_thread_blas():
        anat = anatomy(rng, label, grid)
        canvas = paint_body(rng, grid, anat, hu, label)
        paint_organs(rng, canvas, anat, hu)
        paint_retroperitoneum(rng, canvas, anat, hu)
        measured = paint_kidneys(rng, canvas, hu)
    return canvas, anat, hu, measured


def _rounded(value: object) -> object:
    """A JSON-ready value: floats rounded to 3 decimals, NaN as None."""
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else round(float(value), 3)
    return value


def case_params(anat: Anatomy, hu: Intensities, measured: dict) -> dict:
    """What was drawn and measured for a case, JSON-ready."""
    kidneys = int(anat.left is not None) + int(anat.right is not None)
    params = {**asdict(hu), **measured, "kidneys_found": kidneys, "midline_mm": anat.body.mx}
    return {k: _rounded(v) for k, v in params.items()}


def case_rng(case_id: str, seed: int) -> np.random.Generator:
    """The generator of one case: ``default_rng([seed, case number])``."""
    return np.random.default_rng([int(seed), int(case_id.removeprefix("case_"))])


def synthesize_ct(
    label: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, hu: Intensities | None = None
) -> tuple[np.ndarray, dict]:
    """A CT (int16, internal layout) for a label volume (internal layout, never written to) and its parameters."""
    with _single_thread_blas():
        canvas, anat, hu, measured = paint_anatomy(label, spacing, rng, hu)
        add_bias(rng, canvas, anat, hu)
        blur(canvas.img, spacing, hu)
        add_noise(rng, canvas.img, hu)
    np.clip(canvas.img, HU_MIN, HU_MAX, out=canvas.img)
    return np.rint(canvas.img).astype(np.int16), case_params(anat, hu, measured)


def _single_thread_blas() -> contextlib.AbstractContextManager:
    """BLAS limited to one thread while painting."""
    return contextlib.nullcontext() if threadpool_limits is None else threadpool_limits(limits=1, user_api="blas")


# ----------------------------------------------------------------------------- writing cases


def orientation_of(index: int) -> str:
    """How case ``index`` of the sorted list is stored: every third one re-saved in RAS (slices last)."""
    return "RAS" if index % 3 == 2 else "stored"


def label_cases(labels_dir: Path) -> list[tuple[str, Path]]:
    """(case id, label file) of every ``case_X/segmentation.nii.gz`` under ``labels_dir``, sorted."""
    folders = sorted(p for p in Path(labels_dir).glob("case_*") if (p / LABEL_NAME).is_file())
    return [(p.name, p / LABEL_NAME) for p in folders]


def _coded_like(img: nib.Nifti1Image, ref: nib.Nifti1Image) -> nib.Nifti1Image:
    """``img`` with its own affine stored as qform and sform, under ``ref``'s qform/sform codes."""
    img.set_qform(img.affine, int(ref.header.get_qform(coded=True)[1] or 0))
    img.set_sform(img.affine, int(ref.header.get_sform(coded=True)[1] or 0))
    return img


def image_like(array: np.ndarray, ref: nib.Nifti1Image) -> nib.Nifti1Image:
    """An int16 image (file layout) with the reference label's header, affine and codes."""
    header = ref.header.copy()
    header.set_data_dtype(np.int16)
    header.set_slope_inter(1.0, 0.0)
    return _coded_like(nib.Nifti1Image(array.astype(np.int16, copy=False), ref.affine, header=header), ref)


def reoriented(img: nib.Nifti1Image, axcodes: str = "RAS") -> nib.Nifti1Image:
    """The same voxels stored along ``axcodes`` (affine adjusted), with the original qform/sform codes."""
    transform = ornt.ornt_transform(ornt.io_orientation(img.affine), ornt.axcodes2ornt(tuple(axcodes)))
    return _coded_like(img.as_reoriented(transform), img)


def _save(img: nib.Nifti1Image, path: Path) -> None:
    """Write a NIfTI file atomically."""
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _copy(src: Path, dst: Path) -> None:
    """Copy a file byte for byte, atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def case_key(label_path: Path, seed: int, orientation: str) -> dict:
    """What a written case depends on: generator version, seed, source file and orientation."""
    path = Path(label_path).resolve()
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "source": str(path),
        "source_bytes": path.stat().st_size,
        "orientation": orientation,
    }


def is_current(case_dir: Path, key: dict) -> bool:
    """Whether ``case_dir`` holds a complete case written with ``key``."""
    names = (IMAGE_NAME, LABEL_NAME, "params.json")
    if not all((case_dir / n).is_file() for n in names):
        return False
    params = read_json(case_dir / "params.json")
    return all(params.get(k) == v for k, v in key.items())


def write_case(label_path: Path, case_dir: Path, case_id: str, seed: int, orientation: str = "stored") -> dict:
    """Synthesize the CT of one real label and write image, label and params.json to ``case_dir``."""
    start = time.perf_counter()
    label, geometry = read_label(label_path, case_id, KITS19_LABELS)
    ct, params = synthesize_ct(np.ascontiguousarray(label), geometry.spacing, case_rng(case_id, seed))
    del label
    ref = nib.load(str(label_path))
    image = image_like(from_internal(ct, geometry), ref)
    del ct
    case_dir.mkdir(parents=True, exist_ok=True)
    if orientation == "RAS":
        _save(reoriented(image), case_dir / IMAGE_NAME)
        _save(reoriented(ref), case_dir / LABEL_NAME)
    else:
        _save(image, case_dir / IMAGE_NAME)
        _copy(Path(label_path), case_dir / LABEL_NAME)
    written = nib.load(str(case_dir / IMAGE_NAME))
    record = {
        **case_key(label_path, seed, orientation),
        "case_id": case_id,
        "shape": list(written.shape),
        "axcodes": "".join(nib.aff2axcodes(written.affine)),
        "spacing_internal": [round(s, 4) for s in geometry.spacing],
        "seconds": round(time.perf_counter() - start, 1),
        **params,
    }
    write_json_atomic(case_dir / "params.json", record)
    return record


def build_dataset(cases: list[tuple[int, str, Path]], data_dir: Path, seed: int) -> list[dict]:
    """Write every case not already current under ``data_dir``; their params records, ``cached`` set."""
    records = []
    for index, case_id, label_path in cases:
        case_dir, orientation = data_dir / case_id, orientation_of(index)
        if is_current(case_dir, case_key(label_path, seed, orientation)):
            records.append({**read_json(case_dir / "params.json"), "cached": True})
            continue
        record = write_case(label_path, case_dir, case_id, seed, orientation)
        records.append({**record, "cached": False})
        print(f"{case_id}: {record['shape']} {orientation}, {record['seconds']} s", file=sys.stderr, flush=True)
    return records


def write_manifest(data_dir: Path, case_ids: list[str], left_out: Sequence[str] = ()) -> Path:
    """``manifest_<N>.csv``, or ``manifest_<N>_without_<ids>.csv`` (case_id, image, label; paths relative to
    ``data_dir``)."""
    rows = [{"case_id": c, "image": f"{c}/{IMAGE_NAME}", "label": f"{c}/{LABEL_NAME}"} for c in case_ids]
    suffix = f"_without_{'_'.join(left_out)}" if left_out else ""
    path = data_dir / f"manifest_{len(case_ids)}{suffix}.csv"
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=["case_id", "image", "label"]).to_csv(tmp, index=False)
    return path


# ----------------------------------------------------------------------------- the run


def parse_set(item: str) -> tuple[list[str], object]:
    """``a.b.c=VALUE`` as (["a", "b", "c"], VALUE read as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {item!r}")
    return key.strip().split("."), yaml.safe_load(value)


def _nested(keys: list[str], value: object) -> dict:
    """``{k1: {k2: ... value}}``."""
    out: object = value
    for key in reversed(keys):
        out = {key: out}
    return out


def run_config(presets: Sequence[Path], out: Path, manifest: Path, split: Sequence[float], sets: list) -> dict:
    """The run's config: the presets (later ones win), the local dataset, the split, results under ``out``, then
    ``--set``."""
    cfg: dict = {}
    for preset in presets:
        cfg = deep_merge(cfg, yaml.safe_load(Path(preset).read_text()) or {})
    dataset = {k: v for k, v in (cfg.get("dataset") or {}).items() if k in ("on_bad_case",)}
    dataset.update(source="local", manifest=str(manifest.resolve()), cases="all", unlabelled_cases="none")
    cfg.update(dataset=dataset, results_dir=str((out / "results").resolve()))
    cfg = deep_merge(cfg, {"split": {"fractions": [float(f) for f in split]}})
    for keys, value in sets:
        cfg = deep_merge(cfg, _nested(keys, value))
    validate_config(deep_merge(yaml.safe_load((ROOT / "config.yaml").read_text()), cfg))  # fail before running
    return cfg


def snakemake_command(config_path: Path, cores: int, train_only: bool = False) -> list[str]:
    """The workflow on ``config_path``, in the config's folder as working directory (as the tests run it);
    with ``train_only``, until the model is trained."""
    snakemake = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    where = ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(config_path.parent)]
    configs = ["--configfile", str(ROOT / "config.yaml"), str(config_path)]
    until = ["--until", "train"] if train_only else []
    return [snakemake, "--cores", str(cores), "--rerun-incomplete", *where, *until, *configs]


def run_workflow(config_path: Path, cores: int, train_only: bool = False) -> tuple[int, float]:
    """Run the workflow, output to ``snakemake.log`` beside the config; (exit status, seconds)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    start = time.perf_counter()
    with open(config_path.parent / "snakemake.log", "w") as log:
        cmd = snakemake_command(config_path, cores, train_only)
        rc = subprocess.run(cmd, cwd=config_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - start


# ----------------------------------------------------------------------------- the scores


def _bench_seconds(folder: Path) -> list[float]:
    """The ``s`` column of every Snakemake benchmark file in ``folder``."""
    return [float(pd.read_csv(p, sep="\t")["s"].iloc[0]) for p in sorted(folder.glob("*.tsv"))]


def stage_times(results: Path) -> dict[str, dict]:
    """Per-case stages: jobs and mean seconds per job, from results/benchmarks."""
    out = {}
    for stage in ("check_case", "preprocess", "predict", "postprocess", "evaluate_case"):
        secs = _bench_seconds(results / "benchmarks" / stage)
        if secs:
            out[stage] = {"jobs": len(secs), "mean_s": round(float(np.mean(secs)), 1)}
    return out


def training_record(results: Path, cfg: dict) -> dict:
    """Epochs, optimizer steps and train-job seconds summed over folds."""
    histories = sorted((results / "model").glob("fold_*/history.csv"))
    epochs = sum(len(pd.read_csv(p)) for p in histories)
    steps = epochs * int(cfg["training"]["steps_per_epoch"])
    seconds = sum(_bench_seconds(results / "benchmarks" / "train"))
    return {"folds": len(histories), "epochs": epochs, "steps": steps, "train_s": round(seconds, 1)}


def _summary_value(summary: pd.DataFrame, metric: str) -> float:
    """The mean of one summary row (NaN when absent)."""
    row = summary.loc[summary["metric"] == metric, "mean"]
    return float(row.iloc[0]) if len(row) else float("nan")


def scores(results: Path) -> dict:
    """TK/TU Dice, tumour precision and recall, and the tumour-miss share, from metrics/*.csv."""
    summary = pd.read_csv(results / "metrics" / "summary.csv")
    per_case = pd.read_csv(results / "metrics" / "per_case.csv")
    with_tumour = int(per_case["has_tumor"].astype(str).str.lower().isin(["true", "1"]).sum())
    missed = _summary_value(summary, "tu_missed_cases")
    out = {m: _summary_value(summary, m) for m in ("tk_dice", "tu_dice", "tu_dice_with_tumor")}
    out.update({m: _summary_value(summary, m) for m in ("tumor_precision", "tumor_recall")})
    out.update(test_cases=len(per_case), with_tumour=with_tumour, tu_missed_cases=missed)
    out["tu_missed_share"] = missed / with_tumour if with_tumour else float("nan")
    return out


def case_rows(results: Path, records: list[dict]) -> pd.DataFrame:
    """One row per test case: geometry, drawn intensities and its scores."""
    per_case = pd.read_csv(results / "metrics" / "per_case.csv")
    meta = pd.DataFrame(records).set_index("case_id")
    rows = []
    for _, r in per_case.iterrows():
        m = meta.loc[r["case_id"]] if r["case_id"] in meta.index else {}
        rows.append(
            {
                "case": r["case_id"],
                "shape": "x".join(str(v) for v in m.get("shape", [])),
                "stored": m.get("axcodes", ""),
                "phase": m.get("phase", ""),
                "tumour - kidney HU": m.get("tumour_contrast_applied", float("nan")),
                "true tumour ml": r.get("true_tumor_ml"),
                "TK Dice": r.get("tk_dice"),
                "TU Dice": r.get("tu_dice"),
                "tumour missed": r.get("tu_missed"),
            }
        )
    return pd.DataFrame(rows)


def _fmt(v: float, digits: int = 3) -> str:
    """A number for the table ('n/a' for NaN)."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report(s: dict, train: dict, stages: dict, timing: dict) -> str:
    """The Markdown table of a run."""
    missed = f"{int(s['tu_missed_cases'])} of {s['with_tumour']} ({_fmt(s['tu_missed_share'], 2)})"
    per_case = ", ".join(f"{k} {v['mean_s']} s (x{v['jobs']})" for k, v in stages.items())
    rows = [
        ("test cases (with a tumour)", f"{s['test_cases']} ({s['with_tumour']})"),
        ("mean TK Dice", _fmt(s["tk_dice"])),
        (
            "mean TU Dice (all test cases / those with a tumour)",
            f"{_fmt(s['tu_dice'])} / {_fmt(s['tu_dice_with_tumor'])}",
        ),
        ("mean tumour precision / recall", f"{_fmt(s['tumor_precision'])} / {_fmt(s['tumor_recall'])}"),
        ("tumour missed entirely", missed),
        ("training", f"{train['epochs']} epochs, {train['steps']} steps, {train['train_s']} s ({train['folds']} fold)"),
        (
            "data build (this run)",
            f"{timing['cases']} cases, {timing['generated']} generated, {timing['build_s']:.0f} s",
        ),
        ("CT generation per case, mean / max", f"{timing['generate_mean_s']} s / {timing['generate_max_s']} s"),
        ("workflow wall time", f"{timing['workflow_s']:.0f} s"),
        ("time per case (mean per job)", per_case),
    ]
    return "\n".join(["| real geometry | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset", type=Path, action="append", required=True, help="recipe YAML, merged over config.yaml (repeatable)"
    )
    p.add_argument("--out", type=Path, required=True, help="run folder: config.yaml, results/, summary.md")
    p.add_argument("--cases", type=int, default=None, help="the first N label cases (default: all)")
    p.add_argument("--split", type=float, nargs=3, default=(0.6, 0.1, 0.3), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--set", dest="sets", type=parse_set, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the generated cases are kept and reused")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the intensities")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--build-only", action="store_true", help="write the cases and the manifest, run nothing")
    p.add_argument("--leave-out", nargs="+", default=[], metavar="CASE", help="cases left out of the manifest")
    p.add_argument("--train-only", action="store_true", help="stop once the model is trained; score nothing")
    return p.parse_args(argv)


def _timing(records: list[dict], build_s: float, workflow_s: float) -> dict:
    """Data-build and workflow times (generation as recorded when each case was written, this run or before)."""
    seconds = [float(r["seconds"]) for r in records]
    return {
        "cases": len(records),
        "generated": sum(not r.get("cached") for r in records),
        "build_s": round(build_s, 1),
        "generate_mean_s": round(float(np.mean(seconds)), 1),
        "generate_max_s": round(float(np.max(seconds)), 1),
        "workflow_s": round(workflow_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Build the data, run the workflow on it, print and write the scores."""
    args = parse_args(argv)
    args.out, args.data = args.out.resolve(), args.data.resolve()  # snakemake runs with --out as working directory
    available = label_cases(args.labels)
    if not available:
        print(f"no case_*/{LABEL_NAME} under {args.labels} (../shared/data is absent?)", file=sys.stderr)
        return 1
    chosen = [(i, c, p) for i, (c, p) in enumerate(available)][: args.cases]
    unknown = sorted(set(args.leave_out) - {c for _, c, _ in chosen})
    if unknown:
        print(f"--leave-out: {', '.join(unknown)} not among the chosen cases", file=sys.stderr)
        return 1
    start = time.perf_counter()
    records = build_dataset(chosen, args.data, args.seed)
    kept = [c for _, c, _ in chosen if c not in args.leave_out]
    manifest = write_manifest(args.data, kept, args.leave_out)
    build_s = time.perf_counter() - start
    print(f"data: {len(records)} cases in {args.data} ({build_s:.0f} s), manifest {manifest}", file=sys.stderr)
    return 0 if args.build_only else run_and_report(args, manifest, records, build_s)


def run_and_report(args: argparse.Namespace, manifest: Path, records: list[dict], build_s: float) -> int:
    """Write the config, run the workflow, then print and write the table."""
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = run_config(args.preset, args.out, manifest, args.split, args.sets)
    config_path = args.out / "config.yaml"
    write_text_atomic(config_path, yaml.safe_dump(cfg, sort_keys=False))
    command = snakemake_command(config_path, args.cores, args.train_only)
    print(f"running: {' '.join(command)}", file=sys.stderr, flush=True)
    rc, workflow_s = run_workflow(config_path, args.cores, args.train_only)
    if rc != 0:
        print(f"snakemake failed ({rc}) after {workflow_s:.0f} s: see {args.out / 'snakemake.log'}", file=sys.stderr)
        return rc
    if args.train_only:
        print(f"trained in {workflow_s:.0f} s: {Path(cfg['results_dir']) / 'model'}", file=sys.stderr)
        return 0
    results = Path(cfg["results_dir"])
    resolved = validate_config(deep_merge(yaml.safe_load((ROOT / "config.yaml").read_text()), cfg))
    s, train, stages = scores(results), training_record(results, resolved), stage_times(results)
    timing = _timing(records, build_s, workflow_s)
    cases = case_rows(results, records)
    text = f"{report(s, train, stages, timing)}\n\n{cases.to_markdown(index=False, floatfmt='.3f')}\n"
    print(text)
    write_text_atomic(args.out / "summary.md", text)
    summary = {"scores": s, "training": train, "stages": stages, "timing": timing}
    write_json_atomic(args.out / "summary.json", {**summary, "cases": cases.to_dict(orient="records")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
