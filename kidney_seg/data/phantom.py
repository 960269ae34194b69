"""Seeded synthetic abdominal CT cases in the KiTS19 layout and header convention.

Each case is an axial CT block around the kidneys, built in physical millimetres (so the
anatomy does not depend on the voxel spacing) and sampled on a grid laid out exactly as
KiTS19: axis 0 = slices (towards inferior), axis 1 = rows (towards posterior), axis 2 =
columns (towards the patient's left), the internal orientation; the affine
(:func:`kidney_seg.volume.internal_affine`) has axis codes (I, P, L) and carries the
spacing, with no translation (as in the KiTS files). A case depends only on
``(seed, index)``: its generator is ``np.random.default_rng([seed, index])``.

Anatomy (sizes scale with the body width; a typical adult is ~280 mm wide), in HU:

==========================  ====================  ==========================================
structure                   HU (before noise)     notes
==========================  ====================  ==========================================
air                         -1000                 outside the elliptical body
subcutaneous fat            -100 +- 8             10-25 mm layer under the skin
abdominal wall muscle       45..60                thin ring inside the fat
abdominal cavity            -95..50               smooth mix of visceral fat and soft tissue
liver (right, cranial)      55..70                large ellipsoid, patient's right
spleen (left, cranial)      45..65
bowel loops                 wall ~45; contents    gas -950..-600, fluid 0..30,
                                                  soft 30..70, oral contrast 150..300
psoas, paraspinal muscles   ~45..60               psoas widens caudally
vertebra                    cortex 600..800,      vertebral body, arch, spinous and
                            cancellous 200..300   transverse processes; discs 80..100;
                                                  spinal canal 15..30
aorta (anterior-left)       180..250              contrast-enhanced; renal arteries too
inferior vena cava          100..160
perirenal fat               -95..-80              shell around each kidney
kidney cortex (label 1)     150..200              enhancing shell of each kidney
kidney medulla (label 1)    80..120               lobulated core; renal sinus fat -90..-60
tumour (label 2)            20..90                0-2 irregular ellipsoids, heterogeneous,
                                                  sometimes with a hypodense core
==========================  ====================  ==========================================

Kidneys are ellipsoids left and right of the spine, tilted (upper pole medial, hilum
turned anteromedially) with a renal-sinus notch; their size, position and rotation vary
per case. Tumours sit inside a kidney or on its surface (bulging out); their centre is
always a kidney voxel, so every tumour touches kidney tissue. A case has no tumour with
probability ``p_no_tumor``, a single tiny one (radius 4-8 mm, 0.3-2 ml) with ``p_tiny_tumor``, and
otherwise one or two of radius ~4-30 mm (scaled). The ranges are chosen so that no single
HU threshold separates the classes: tumour overlaps muscle, liver and medulla, and
cortex overlaps aorta, bone and oral contrast. Finally a mild partial-volume blur
(3-tap, per axis) and white Gaussian noise (``noise_hu``) are applied, values clipped
to [-1024, 3071] and stored as int16; labels are uint8 (0 background, 1 kidney, 2 tumour).

Every random draw depends on millimetre quantities only (random textures live on lattices
fixed in mm), so changing only the spacing ranges gives the same anatomy on another grid.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from scipy import ndimage

from kidney_seg.config import with_defaults
from kidney_seg.vocabulary import IMAGE_NAME, LABEL_NAME
from kidney_seg.volume import internal_affine, save_nifti

try:  # a dependency of batchgenerators; keeps BLAS single-threaded while generating
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - the generator still works, maybe slower when CPUs are busy
    threadpool_limits = None

Range = tuple[float, float]
Box = tuple[slice, slice, slice]

_RANGE_FIELDS: dict[str, float] = {
    # field name -> smallest allowed lower bound (mm)
    "field_of_view_mm": 120.0,
    "z_extent_mm": 80.0,
    "slice_spacing_mm": 0.1,
    "inplane_spacing_mm": 0.1,
}
_HU_MIN, _HU_MAX = -1024.0, 3071.0
_TYPICAL_HALF_WIDTH_MM = 140.0
_Z_MARGIN_MM = 5.0  # kidneys stay this far (plus 5 mm x scale) inside the slab


@dataclass(frozen=True)
class PhantomParams:
    """Ranges (sampled uniformly per case) and probabilities of the phantom generator."""

    field_of_view_mm: Range  # left-right; anterior-posterior is 92-100 % of it
    z_extent_mm: Range  # cranio-caudal; both kidneys fit inside with a margin
    slice_spacing_mm: Range
    inplane_spacing_mm: Range  # rows and columns share it
    p_no_tumor: float  # probability of a case without tumour
    p_tiny_tumor: float  # probability of a single tiny (4-8 mm radius) tumour
    noise_hu: float  # standard deviation of the white Gaussian noise

    def __post_init__(self) -> None:
        """Normalise ranges to float tuples and validate every field."""
        for name, minimum in _RANGE_FIELDS.items():
            value = getattr(self, name)
            try:
                if isinstance(value, (str, bytes)):
                    raise TypeError(name)
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"phantom.{name} must be a pair of numbers, got {value!r}") from exc
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                raise ValueError(f"phantom.{name} must be a finite range [low, high], got {value!r}")
            if lo < minimum:
                raise ValueError(f"phantom.{name} lower bound {lo} is below the minimum {minimum}")
            object.__setattr__(self, name, (lo, hi))
        for name in ("p_no_tumor", "p_tiny_tumor", "noise_hu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"phantom.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("p_no_tumor", "p_tiny_tumor"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"phantom.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.p_no_tumor + self.p_tiny_tumor > 1.0 + 1e-12:
            raise ValueError("phantom.p_no_tumor + phantom.p_tiny_tumor must not exceed 1")
        if self.noise_hu < 0:
            raise ValueError(f"phantom.noise_hu must be >= 0, got {self.noise_hu}")

    @classmethod
    def from_config(cls, d: dict | None) -> PhantomParams:
        """Build from ``dataset.phantom`` (missing keys take the schema's defaults); ``n_cases`` is ignored."""
        settings = phantom_settings(d)
        return cls(**{f.name: settings[f.name] for f in fields(cls)})


def phantom_settings(d: dict | None) -> dict:
    """``dataset.phantom`` validated, with the schema's defaults filled in (unknown keys are an error)."""
    if d is not None and not isinstance(d, dict):
        raise ValueError(f"phantom config must be a mapping, got {type(d).__name__}")
    return with_defaults("dataset", {"source": "phantom", "phantom": d or {}})["phantom"]


@dataclass
class PhantomCase:
    """One synthetic case: HU image, labels, spacing (slice, row, col in mm) and affine."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates in mm: z (+inferior), y (+posterior), x (+left).

    Coordinates are body-centred; ``extent`` and ``offset`` give the physical field of
    view independently of the spacing, so that random fields and placements drawn in
    mm do not depend on the voxel size.
    """

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    spacing: tuple[float, float, float]
    extent: tuple[float, float, float]
    offset: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (slices, rows, columns)."""
        return (self.z.size, self.y.size, self.x.size)

    def bounds(self) -> tuple[Range, Range, Range]:
        """Physical (low, high) of the field of view along z, y, x (mm)."""
        return tuple((-e / 2 - o, e / 2 - o) for e, o in zip(self.extent, self.offset))

    def box(self, centre: Sequence[float], half: Sequence[float]) -> Box | None:
        """Index box of the voxels within ``centre +- half`` (mm); None when empty."""
        out = []
        for coords, c, h, s in zip((self.z, self.y, self.x), centre, half, self.spacing):
            lo = max(0, math.ceil((c - h - float(coords[0])) / s - 1e-6))
            hi = min(coords.size, math.floor((c + h - float(coords[0])) / s + 1e-6) + 1)
            if lo >= hi:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def open(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Open (broadcastable) z, y, x coordinate arrays of a box."""
        return (self.z[box[0], None, None], self.y[None, box[1], None], self.x[None, None, box[2]])

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Plain 1D coordinate vectors of a box."""
        return (self.z[box[0]], self.y[box[1]], self.x[box[2]])


def _axis_coords(n: int, spacing: float, offset: float) -> np.ndarray:
    """Centred voxel coordinates (mm) of one axis, shifted by ``offset``."""
    return ((np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * spacing - offset).astype(np.float32)


def _uniform(rng: np.random.Generator, bounds: Range) -> float:
    """A uniform draw from a (low, high) range as a Python float."""
    return float(rng.uniform(bounds[0], bounds[1]))


def _sample_grid(rng: np.random.Generator, params: PhantomParams) -> _Grid:
    """Draw spacing, field of view and extent; build the voxel grid."""
    s0 = round(_uniform(rng, params.slice_spacing_mm), 3)
    s = round(_uniform(rng, params.inplane_spacing_mm), 3)
    fov_lr = _uniform(rng, params.field_of_view_mm)
    fov_ap = fov_lr * _uniform(rng, (0.92, 1.0))
    z_ext = _uniform(rng, params.z_extent_mm)
    shape = (max(1, round(z_ext / s0)), max(8, round(fov_ap / s)), max(8, round(fov_lr / s)))
    offset = (0.0, _uniform(rng, (-6.0, 6.0)), _uniform(rng, (-5.0, 5.0)))
    return _Grid(
        z=_axis_coords(shape[0], s0, offset[0]),
        y=_axis_coords(shape[1], s, offset[1]),
        x=_axis_coords(shape[2], s, offset[2]),
        spacing=(s0, s, s),
        extent=(z_ext, fov_ap, fov_lr),
        offset=offset,
    )


def _rotation(plane: tuple[int, int], angle: float) -> np.ndarray:
    """A 3x3 rotation by ``angle`` (radians) within the plane of two (z, y, x) axes."""
    r = np.eye(3)
    i, j = plane
    c, s = math.cos(angle), math.sin(angle)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, s, -s, c
    return r


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random orthonormal 3x3 matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid: centre (z, y, x mm), semi-axes (mm), rotation (columns = local axes)."""

    centre: np.ndarray
    axes: np.ndarray
    rot: np.ndarray

    def half_extent(self) -> np.ndarray:
        """Half-size of the axis-aligned bounding box (mm)."""
        return np.sqrt(((self.rot * self.axes[None, :]) ** 2).sum(axis=1))

    def bounds(self, pad: float = 1.0) -> list[Range]:
        """Physical (low, high) of the padded bounding box along z, y, x."""
        half = self.half_extent() * pad
        return [(float(c - h), float(c + h)) for c, h in zip(self.centre, half)]

    def point(self, local: Sequence[float]) -> np.ndarray:
        """World position of a point given in normalised local coordinates."""
        return self.centre + self.rot @ (np.asarray(local, dtype=float) * self.axes)

    def grown(self, add_mm: float) -> _Ellipsoid:
        """The same ellipsoid with every semi-axis grown by ``add_mm``."""
        return _Ellipsoid(self.centre, self.axes + add_mm, self.rot)


def _local(grid: _Grid, ell: _Ellipsoid, pad: float = 1.0) -> tuple[Box | None, list[np.ndarray]]:
    """Box around an ellipsoid (padded by ``pad``) and normalised local coordinates in it."""
    box = grid.box(ell.centre, ell.half_extent() * pad)
    if box is None:
        return None, []
    dz, dy, dx = (c - np.float32(m) for c, m in zip(grid.open(box), ell.centre))
    u = []
    for i in range(3):
        rz, ry, rx = (float(ell.rot[k, i] / ell.axes[i]) for k in range(3))
        u.append(rz * dz + ry * dy + rx * dx)
    return box, u


def _radius2(u: list[np.ndarray]) -> np.ndarray:
    """Squared normalised radius from local coordinates."""
    return u[0] * u[0] + u[1] * u[1] + u[2] * u[2]


@dataclass(frozen=True)
class _Field:
    """A smooth unit-variance random field: Gaussian bumps on a lattice fixed in mm."""

    nodes: tuple[np.ndarray, np.ndarray, np.ndarray]
    cells: tuple[float, float, float]
    coef: np.ndarray

    def at(self, coords: Sequence[np.ndarray]) -> np.ndarray:
        """Evaluate on the grid spanned by z, y, x coordinate vectors (separable, float32)."""
        mats = []
        for c, nodes, cell in zip(coords, self.nodes, self.cells):
            c = np.asarray(c, dtype=np.float64)
            d2 = ((c[:, None] - nodes[None, :]) / cell) ** 2
            w = np.exp(-0.5 * (d2 - d2.min(axis=1, keepdims=True)))  # no underflow off the lattice
            w /= np.sqrt((w * w).sum(axis=1, keepdims=True))
            mats.append(w.astype(np.float32))
        f = np.tensordot(self.coef, mats[2], axes=([2], [1]))  # (gz, gy, nx)
        f = np.tensordot(mats[1], f, axes=([1], [1]))  # (ny, gz, nx)
        return np.ascontiguousarray(np.tensordot(mats[0], f, axes=([1], [1])))  # (nz, ny, nx)


def _field(rng: np.random.Generator, bounds: Sequence[Range], cells: Sequence[float]) -> _Field:
    """Draw a field whose lattice covers ``bounds`` (mm); the draw count depends on mm only."""
    nodes = []
    for (lo, hi), cell in zip(bounds, cells):
        count = int(math.floor((hi - lo) / cell + 1e-9)) + 5
        nodes.append(lo - 2.0 * cell + cell * np.arange(count, dtype=np.float64))
    coef = rng.standard_normal(tuple(n.size for n in nodes), dtype=np.float32)
    return _Field(tuple(nodes), tuple(float(c) for c in cells), coef)


# ----------------------------------------------------------------------------- canvas


@dataclass
class _Canvas:
    """The volume being painted: HU, labels, and masks later structures consult."""

    img: np.ndarray
    lab: np.ndarray
    body: np.ndarray
    cavity: np.ndarray
    protected: np.ndarray


def _paint(
    canvas: _Canvas,
    box: Box,
    mask: np.ndarray,
    hu: float | np.ndarray,
    label: int = 0,
    protect: bool = False,
) -> None:
    """Set HU and label where ``mask`` (box-shaped) is true; optionally protect it."""
    mask = np.broadcast_to(mask, canvas.img[box].shape)
    view = canvas.img[box]
    view[mask] = np.broadcast_to(hu, mask.shape)[mask] if np.ndim(hu) else hu
    canvas.lab[box][mask] = label
    if protect:
        canvas.protected[box][mask] = True


@dataclass(frozen=True)
class _Layout:
    """Landmarks shared by several structures (mm, body-centred)."""

    scale: float
    a_x: float
    a_ant: float
    a_post: float
    fat_mm: float
    wall_mm: float
    y_vb: float
    vb_rx: float
    vb_ry: float
    canal_y: float
    canal_r: float
    aorta_y: float
    aorta_x: float
    aorta_r: float
    aorta_hu: float
    muscle_hu: float


def _sample_layout(rng: np.random.Generator, grid: _Grid) -> _Layout:
    """Body size, fat and wall thickness, and the positions of spine and aorta."""
    _, fov_ap, fov_lr = grid.extent
    a_x = fov_lr / 2 * _uniform(rng, (0.80, 0.92))
    a_ant = min(a_x * _uniform(rng, (0.68, 0.82)), fov_ap / 2 * 0.9)
    a_post = a_ant * _uniform(rng, (0.85, 0.95))
    sc = a_x / _TYPICAL_HALF_WIDTH_MM
    fat_mm = _uniform(rng, (10.0, 25.0)) * sc
    wall_mm = _uniform(rng, (6.0, 12.0)) * sc
    canal_r = _uniform(rng, (7.0, 9.0)) * sc
    canal_y = a_post - fat_mm - _uniform(rng, (35.0, 42.0)) * sc
    vb_rx, vb_ry = _uniform(rng, (18.0, 23.0)) * sc, _uniform(rng, (14.0, 18.0)) * sc
    y_vb = canal_y - canal_r - vb_ry - 1.0 * sc
    aorta_r = _uniform(rng, (9.0, 13.0)) * sc
    return _Layout(
        scale=sc,
        a_x=a_x,
        a_ant=a_ant,
        a_post=a_post,
        fat_mm=fat_mm,
        wall_mm=wall_mm,
        y_vb=y_vb,
        vb_rx=vb_rx,
        vb_ry=vb_ry,
        canal_y=canal_y,
        canal_r=canal_r,
        aorta_y=y_vb - vb_ry - aorta_r - _uniform(rng, (1.0, 5.0)) * sc,
        aorta_x=_uniform(rng, (8.0, 18.0)) * sc,
        aorta_r=aorta_r,
        aorta_hu=_uniform(rng, (180.0, 250.0)),
        muscle_hu=_uniform(rng, (45.0, 60.0)),
    )


# ----------------------------------------------------------------------------- body and organs


def _paint_body(rng: np.random.Generator, grid: _Grid, lay: _Layout) -> _Canvas:
    """Air, subcutaneous fat, muscle wall and a textured fat/soft-tissue cavity."""
    bounds = grid.bounds()
    phase = _uniform(rng, (0.0, 2 * math.pi))
    zf = _field(rng, (bounds[0], (0.0, 0.0), (0.0, 0.0)), (40.0, 1.0, 1.0))
    t1 = _field(rng, bounds, (12.0, 8.0, 8.0)).at((grid.z, grid.y, grid.x))
    t2 = _field(rng, bounds, (30.0, 22.0, 22.0)).at((grid.z, grid.y, grid.x))
    yn = np.where(grid.y > 0, grid.y / lay.a_post, grid.y / lay.a_ant).astype(np.float32)
    xn = grid.x / np.float32(lay.a_x)
    theta = np.arctan2(grid.y[:, None], grid.x[None, :])
    r2d = np.sqrt(yn[:, None] ** 2 + xn[None, :] ** 2)
    r2d = r2d * (1.0 + 0.03 * np.cos(2 * theta + phase) + 0.015 * np.cos(3 * theta))
    zscale = (1.0 + 0.02 * zf.at((grid.z, np.zeros(1), np.zeros(1)))[:, 0, 0]).astype(np.float32)
    rr = r2d.astype(np.float32)[None, :, :] / zscale[:, None, None]
    mean_a = (lay.a_x + lay.a_ant) / 2
    r_wall, r_cav = 1.0 - lay.fat_mm / mean_a, 1.0 - (lay.fat_mm + lay.wall_mm) / mean_a
    body, cavity = rr < 1.0, rr < r_cav
    img = np.where(body, -100.0 + 8.0 * t1, np.float32(-1000.0))
    img = np.where(rr < r_wall, lay.muscle_hu + 5.0 * t1, img)
    w = np.clip(0.45 + 1.4 * t2 + 0.3 * t1, 0.0, 1.0)
    img = np.where(cavity, -95.0 + w * (45.0 + 6.0 * t1 + 95.0), img).astype(np.float32)
    shape = grid.shape
    return _Canvas(img, np.zeros(shape, np.uint8), body, cavity, np.zeros(shape, bool))


def _paint_blob(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, ell: _Ellipsoid, hu: float, tex: float) -> None:
    """A textured ellipsoidal organ, confined to the abdominal cavity."""
    field = _field(rng, ell.bounds(), (15.0, 10.0, 10.0))
    box, u = _local(grid, ell)
    if box is None:
        return
    mask = (_radius2(u) < 1.0) & canvas.cavity[box]
    _paint(canvas, box, mask, hu + tex * field.at(grid.coords(box)))


def _paint_organs(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, lay: _Layout) -> None:
    """Liver (right), spleen (left) and bowel loops with mixed contents."""
    sc, z0 = lay.scale, grid.bounds()[0][0]
    liver_centre = [z0 + _uniform(rng, (-10, 20)), -lay.a_ant * _uniform(rng, (0.0, 0.2))]
    liver_centre.append(-lay.a_x * _uniform(rng, (0.35, 0.5)))
    liver_axes = [_uniform(rng, (60, 85)) * sc, lay.a_ant * _uniform(rng, (0.5, 0.65))]
    liver_axes.append(lay.a_x * _uniform(rng, (0.4, 0.5)))
    liver = _Ellipsoid(np.array(liver_centre), np.array(liver_axes), _rotation((1, 2), _uniform(rng, (-0.3, 0.3))))
    _paint_blob(rng, grid, canvas, liver, _uniform(rng, (55, 70)), 5.0)
    spleen_centre = [z0 + _uniform(rng, (-20, 10)), lay.a_post * _uniform(rng, (0.0, 0.3))]
    spleen_centre.append(lay.a_x * _uniform(rng, (0.55, 0.7)))
    spleen = _Ellipsoid(
        np.array(spleen_centre),
        np.array([_uniform(rng, (40, 55)), _uniform(rng, (35, 45)), _uniform(rng, (18, 26))]) * sc,
        _rotation((1, 2), _uniform(rng, (0.3, 0.8))),
    )
    _paint_blob(rng, grid, canvas, spleen, _uniform(rng, (45, 65)), 5.0)
    for _ in range(int(rng.integers(5, 10))):
        _paint_bowel(rng, grid, canvas, lay)


def _paint_bowel(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, lay: _Layout) -> None:
    """One bowel loop: a soft-tissue wall around gas, fluid, soft or contrast contents."""
    z_lo, z_hi = grid.bounds()[0]
    centre = [_uniform(rng, (z_lo, z_hi)), -lay.a_ant * _uniform(rng, (0.1, 0.75))]
    centre.append(lay.a_x * _uniform(rng, (-0.55, 0.55)))
    ell = _Ellipsoid(np.array(centre), rng.uniform(10.0, 24.0, 3) * lay.scale, _random_rotation(rng))
    kind = int(rng.choice(4, p=[0.25, 0.35, 0.25, 0.15]))
    content = _uniform(rng, [(-950, -600), (0, 30), (30, 70), (150, 300)][kind])
    wall = _uniform(rng, (40, 55))
    box, u = _local(grid, ell)
    if box is None:
        return
    r2 = _radius2(u)
    inside = canvas.cavity[box]
    _paint(canvas, box, (r2 < 1.0) & inside, wall)
    _paint(canvas, box, (r2 < 0.75**2) & inside, content)


# ----------------------------------------------------------------------------- retroperitoneum


def _sample_kidneys(rng: np.random.Generator, grid: _Grid, lay: _Layout) -> list[_Ellipsoid]:
    """Two tilted kidney ellipsoids (right, left) that fit inside the slab with a margin."""
    sc = lay.scale
    offset, gap = _uniform(rng, (-4.0, 4.0)), _uniform(rng, (0.0, 15.0))  # left kidney higher
    z_lo, z_hi = grid.bounds()[0]
    z_mid, z_half = (z_lo + z_hi) / 2, (z_hi - z_lo) / 2
    kidneys = []
    for side, zc in ((-1.0, z_mid + offset + gap / 2), (1.0, z_mid + offset - gap / 2)):
        axes = np.array([_uniform(rng, (42, 54)), _uniform(rng, (22, 28)), _uniform(rng, (18, 23))]) * sc
        # local axes as columns: long ~ z, width ~ lateral x, depth ~ y
        base = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, side], [0.0, 1.0, 0.0]]).T
        rot = (
            _rotation((1, 2), side * _uniform(rng, (0.45, 0.8)))  # hilum turned anteromedially
            @ _rotation((0, 2), -side * _uniform(rng, (0.08, 0.3)))  # upper pole medial
            @ _rotation((0, 1), _uniform(rng, (-0.15, 0.15)))
            @ base
        )
        centre = np.array([zc, lay.y_vb + _uniform(rng, (-6.0, 6.0)) * sc, side * _uniform(rng, (62.0, 76.0)) * sc])
        allowed = z_half - _Z_MARGIN_MM - 5.0 * sc - abs(zc - z_mid)
        rest = (rot[0, 1] * axes[1]) ** 2 + (rot[0, 2] * axes[2]) ** 2
        if (rot[0, 0] * axes[0]) ** 2 + rest > allowed**2:
            axes[0] = math.sqrt(max(allowed**2 - rest, (10.0 * sc) ** 2)) / abs(rot[0, 0])
        kidneys.append(_Ellipsoid(centre, axes, rot))
    return kidneys


def _paint_perirenal_fat(
    rng: np.random.Generator, grid: _Grid, canvas: _Canvas, kidneys: list[_Ellipsoid], sc: float
) -> None:
    """A fat capsule around each kidney."""
    for kid in kidneys:
        ell = kid.grown(_uniform(rng, (5.0, 12.0)) * sc)
        hu = _uniform(rng, (-95.0, -80.0))
        box, u = _local(grid, ell)
        if box is not None:
            _paint(canvas, box, (_radius2(u) < 1.0) & canvas.body[box], hu)


def _column(
    grid: _Grid, cy: np.ndarray, cx: np.ndarray, ry: np.ndarray, rx: np.ndarray
) -> tuple[Box | None, np.ndarray]:
    """Box and squared normalised radius of an elliptic column whose section varies with z."""
    cy, cx, ry, rx = (np.broadcast_to(np.asarray(v, np.float32), grid.z.shape) for v in (cy, cx, ry, rx))
    span_y = (float(cy.max()) - float(cy.min())) / 2 + float(np.abs(ry).max())
    span_x = (float(cx.max()) - float(cx.min())) / 2 + float(np.abs(rx).max())
    centre = (0.0, (float(cy.min()) + float(cy.max())) / 2, (float(cx.min()) + float(cx.max())) / 2)
    box = grid.box(centre, (1e9, span_y, span_x))
    if box is None:
        return None, np.zeros(0)
    _, yy, xx = grid.open(box)
    col = (slice(None), None, None)
    return box, ((yy - cy[col]) / ry[col]) ** 2 + ((xx - cx[col]) / rx[col]) ** 2


def _paint_muscles(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, lay: _Layout) -> None:
    """Psoas (widening caudally) and paraspinal muscles on both sides of the spine."""
    sc = lay.scale
    z_lo, z_hi = grid.bounds()[0]
    frac = np.clip((grid.z - z_lo) / (z_hi - z_lo), 0.0, 1.0)
    for side in (-1.0, 1.0):
        r = (_uniform(rng, (6.0, 9.0)) + _uniform(rng, (6.0, 11.0)) * frac) * sc
        psoas_y, psoas_hu = lay.y_vb + _uniform(rng, (-2.0, 4.0)) * sc, lay.muscle_hu + _uniform(rng, (-4.0, 4.0))
        box, r2 = _column(grid, psoas_y, side * (lay.vb_rx + 0.8 * r + 2.0 * sc), 0.85 * r, r)
        if box is not None:
            _paint(canvas, box, r2 < 1.0, psoas_hu)
        ry, rx = _uniform(rng, (16.0, 22.0)) * sc, _uniform(rng, (18.0, 24.0)) * sc
        cy, hu = lay.canal_y + _uniform(rng, (8.0, 12.0)) * sc, lay.muscle_hu + _uniform(rng, (-4.0, 4.0))
        box, r2 = _column(grid, cy, side * (lay.canal_r + rx * 0.9), ry, rx)
        if box is not None:
            _paint(canvas, box, (r2 < 1.0) & canvas.body[box], hu)


def _paint_kidney(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, kid: _Ellipsoid) -> None:
    """Cortex shell, lobulated medulla and a medial renal-sinus notch (label 1)."""
    field = _field(rng, kid.bounds(), (8.0, 6.0, 6.0))
    r_med = _uniform(rng, (0.6, 0.72))
    cortex_hu, medulla_hu = _uniform(rng, (150.0, 200.0)), _uniform(rng, (80.0, 120.0))
    sinus_hu = _uniform(rng, (-90.0, -60.0))
    box, u = _local(grid, kid)
    if box is None:
        return
    r2 = _radius2(u)
    kidney = r2 < 1.0
    f = field.at(grid.coords(box))
    medulla = r2 < (r_med + 0.07 * f) ** 2
    _paint(canvas, box, kidney, np.where(medulla, medulla_hu, cortex_hu) + 4.0 * f, label=1)
    # renal sinus: a fat-filled notch opening medially (local width axis points laterally)
    du = (u[0] / 0.4) ** 2 + ((u[1] + 0.95) / 0.5) ** 2 + (u[2] / 0.45) ** 2
    _paint(canvas, box, kidney & (du < 1.0), sinus_hu, label=0)


def _paint_tube(grid: _Grid, canvas: _Canvas, a: np.ndarray, b: np.ndarray, radius: float, hu: float) -> None:
    """A straight vessel from ``a`` to ``b`` (mm), drawn outside the kidneys only."""
    lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
    box = grid.box((lo + hi) / 2, (hi - lo) / 2)
    if box is None:
        return
    d = b - a
    pz, py, px = (c - np.float32(m) for c, m in zip(grid.open(box), a))
    t = np.clip((pz * d[0] + py * d[1] + px * d[2]) / float(d @ d), 0.0, 1.0)
    dist2 = (pz - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (px - t * d[2]) ** 2
    mask = (dist2 < radius * radius) & (canvas.lab[box] == 0) & canvas.body[box]
    _paint(canvas, box, mask, hu)


def _paint_vessels(
    rng: np.random.Generator, grid: _Grid, canvas: _Canvas, lay: _Layout, kidneys: list[_Ellipsoid]
) -> None:
    """Renal arteries, the inferior vena cava and the contrast-filled aorta."""
    sc = lay.scale
    slope = _uniform(rng, (-0.08, 0.08))  # the aorta drifts slightly left or right along z
    for kid in kidneys:
        hilum = kid.point((0.0, -0.85, 0.0))
        origin = np.array([hilum[0], lay.aorta_y, lay.aorta_x + slope * hilum[0]])
        _paint_tube(grid, canvas, origin, hilum, _uniform(rng, (2.5, 3.5)) * sc, lay.aorta_hu)
    ivc_r, ivc_x, ivc_hu = _uniform(rng, (9.0, 13.0)) * sc, -_uniform(rng, (18.0, 26.0)) * sc, _uniform(rng, (100, 160))
    box, r2 = _column(grid, lay.y_vb - lay.vb_ry - 0.6 * ivc_r, ivc_x, 0.7 * ivc_r, ivc_r)
    if box is not None:
        _paint(canvas, box, r2 < 1.0, ivc_hu)
    box, r2 = _column(grid, lay.aorta_y, lay.aorta_x + slope * grid.z, lay.aorta_r, lay.aorta_r)
    if box is not None:
        _paint(canvas, box, r2 < 1.0, lay.aorta_hu, protect=True)


def _paint_spine(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, lay: _Layout) -> None:
    """Vertebral body (cortical rim, cancellous core), discs, canal and posterior arch."""
    sc = lay.scale
    cortical, cancellous = _uniform(rng, (600.0, 800.0)), _uniform(rng, (200.0, 300.0))
    disc_hu, canal_hu = _uniform(rng, (80.0, 100.0)), _uniform(rng, (15.0, 30.0))
    period, disc = _uniform(rng, (30.0, 38.0)) * sc, _uniform(rng, (6.0, 9.0)) * sc
    phase = _uniform(rng, (0.0, period))
    top, bottom, half_x = lay.y_vb - lay.vb_ry, lay.canal_y + lay.canal_r + 28.0 * sc, 36.0 * sc
    field = _field(rng, (grid.bounds()[0], (top, bottom), (-half_x, half_x)), (10.0, 6.0, 6.0))
    box = grid.box((0.0, (top + bottom) / 2, 0.0), (1e9, (bottom - top) / 2 + 1.0, half_x))
    if box is None:
        return
    zz, yy, xx = grid.open(box)
    pos = np.mod(zz - phase, period)
    is_disc = pos < disc
    mid_level = np.abs(pos - (disc + period) / 2) < 0.25 * period
    vb = np.sqrt((xx / lay.vb_rx) ** 2 + ((yy - lay.y_vb) / lay.vb_ry) ** 2)
    rim = 2.5 * sc / min(lay.vb_rx, lay.vb_ry)
    rc = np.sqrt(xx * xx + (yy - lay.canal_y) ** 2)
    arch = (rc >= lay.canal_r) & (rc < lay.canal_r + 5.0 * sc)
    spinous = (np.abs(xx) < 3.5 * sc) & (yy > lay.canal_y) & (yy < bottom)
    transverse = mid_level & (np.abs(yy - lay.canal_y + 2.0 * sc) < 3.0 * sc) & (np.abs(xx) < 32.0 * sc)
    f = field.at(grid.coords(box))
    _paint(canvas, box, arch | spinous | transverse, cortical + 30.0 * f, protect=True)
    _paint(canvas, box, (vb < 1.0) & ~is_disc, cortical + 30.0 * f, protect=True)
    _paint(canvas, box, (vb < 1.0 - rim) & ~is_disc, cancellous + 25.0 * f, protect=True)
    _paint(canvas, box, (vb < 1.0) & is_disc, disc_hu + 4.0 * f, protect=True)
    _paint(canvas, box, rc < lay.canal_r, canal_hu, protect=True)


# ----------------------------------------------------------------------------- tumours


def _tumour_radii(rng: np.random.Generator, params: PhantomParams, sc: float) -> list[float]:
    """Radii (mm) of this case's tumours: none, one tiny, or one or two of varied size."""
    u = float(rng.random())
    if u < params.p_no_tumor:
        return []
    if u < params.p_no_tumor + params.p_tiny_tumor:
        return [_uniform(rng, (4.0, 8.0))]
    n = 2 if rng.random() < 0.2 else 1
    return [_uniform(rng, (4.0, 30.0)) * sc for _ in range(n)]


def _tumour_site(rng: np.random.Generator, kid: _Ellipsoid, bulging: bool) -> np.ndarray:
    """A point (mm) deep inside a kidney or just under its surface, away from the hilum."""
    while True:
        d = rng.standard_normal(3)
        d /= max(float(np.linalg.norm(d)), 1e-12)
        if d[1] > -0.3:  # local axis 1 points laterally; the hilum is at -1
            break
    depth = _uniform(rng, (0.85, 0.98) if bulging else (0.15, 0.75))
    return kid.point(depth * d)


def _snap_to_kidney(grid: _Grid, canvas: _Canvas, kid: _Ellipsoid, site: np.ndarray) -> np.ndarray | None:
    """The centre (mm) of the kidney voxel nearest to ``site``; None if the kidney is empty."""
    box, _ = _local(grid, kid)
    if box is None:
        return None
    zz, yy, xx = grid.open(box)
    dist2 = (zz - site[0]) ** 2 + (yy - site[1]) ** 2 + (xx - site[2]) ** 2
    dist2 = np.where(canvas.lab[box] == 1, dist2, np.inf)
    k, j, i = np.unravel_index(int(np.argmin(dist2)), dist2.shape)
    if not np.isfinite(dist2[k, j, i]):
        return None
    z1, y1, x1 = grid.coords(box)
    return np.array([z1[k], y1[j], x1[i]], dtype=float)


def _paint_tumour(rng: np.random.Generator, grid: _Grid, canvas: _Canvas, kid: _Ellipsoid, radius: float) -> None:
    """An irregular, heterogeneous ellipsoidal lesion (label 2) that spares bone and aorta."""
    site = _tumour_site(rng, kid, bulging=bool(rng.random() < 0.5))
    axes, rot = radius * rng.uniform(0.8, 1.2, 3), _random_rotation(rng)
    cell = max(radius * 0.6, 3.0)
    field = _field(rng, _Ellipsoid(site, axes, rot).bounds(1.25 + 1.0 / radius), (cell, cell, cell))
    base, amp = _uniform(rng, (30.0, 75.0)), _uniform(rng, (8.0, 18.0))
    necrotic = radius > 12.0 and rng.random() < 0.5
    core_r, core_drop = _uniform(rng, (0.3, 0.55)), _uniform(rng, (20.0, 40.0))
    centre = _snap_to_kidney(grid, canvas, kid, site)
    if centre is None:
        return
    ell = _Ellipsoid(centre, axes, rot)
    box, u = _local(grid, ell, pad=1.25)
    if box is None:
        return
    r = np.sqrt(_radius2(u))
    f = field.at(grid.coords(box))
    mask = (r < 1.0 + 0.12 * f) & canvas.body[box] & ~canvas.protected[box]
    hu = base + amp * f
    if necrotic:
        hu = np.where(r < core_r, hu - core_drop, hu)
    _paint(canvas, box, mask, np.clip(hu, 20.0, 90.0), label=2)


def _paint_tumours(
    rng: np.random.Generator, grid: _Grid, canvas: _Canvas, kidneys: list[_Ellipsoid], radii: list[float]
) -> None:
    """Place each tumour on a random kidney; it never swallows a whole kidney."""
    for radius in radii:
        kid = kidneys[int(rng.integers(len(kidneys)))]
        _paint_tumour(rng, grid, canvas, kid, min(radius, 0.6 * float(kid.axes.max())))


# ----------------------------------------------------------------------------- assembly


def _blur_weight(sigma_vox: float) -> float:
    """Side weight of a 3-tap kernel with variance ``sigma_vox**2`` (capped at 1/4)."""
    return min(0.25, 0.5 * sigma_vox * sigma_vox)


def _finish(
    rng: np.random.Generator, img: np.ndarray, spacing: tuple[float, float, float], noise_hu: float
) -> np.ndarray:
    """Partial-volume blur, Gaussian noise, clipping, int16."""
    sigmas = (0.3, 0.5 / spacing[1], 0.5 / spacing[2])  # voxels: slice profile, in-plane PSF
    for axis, sigma in enumerate(sigmas):
        w = _blur_weight(sigma)
        if w > 0 and img.shape[axis] > 1:
            img = ndimage.correlate1d(img, np.array([w, 1 - 2 * w, w], np.float32), axis=axis, mode="nearest")
    if not np.isfinite(img).all():  # a bug guard: NaN would become arbitrary int16 values
        raise RuntimeError("phantom image holds non-finite values")
    if noise_hu > 0:
        img += noise_hu * rng.standard_normal(img.shape, dtype=np.float32)
    np.clip(img, _HU_MIN, _HU_MAX, out=img)
    return np.rint(img).astype(np.int16)


def _single_thread_blas() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread: the small matrix products here only lose from threading."""
    if threadpool_limits is None:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def generate_case(index: int, seed: int, params: PhantomParams) -> PhantomCase:
    """One synthetic case; depends only on (seed, index, params)."""
    with _single_thread_blas():
        return _generate(index, seed, params)


def _generate(index: int, seed: int, params: PhantomParams) -> PhantomCase:
    """The body of :func:`generate_case`."""
    rng = np.random.default_rng([int(seed), int(index)])
    grid = _sample_grid(rng, params)
    lay = _sample_layout(rng, grid)
    kidneys = _sample_kidneys(rng, grid, lay)
    radii = _tumour_radii(rng, params, lay.scale)
    canvas = _paint_body(rng, grid, lay)
    _paint_organs(rng, grid, canvas, lay)
    _paint_perirenal_fat(rng, grid, canvas, kidneys, lay.scale)
    _paint_muscles(rng, grid, canvas, lay)
    for kid in kidneys:
        _paint_kidney(rng, grid, canvas, kid)
    _paint_vessels(rng, grid, canvas, lay, kidneys)
    _paint_spine(rng, grid, canvas, lay)
    _paint_tumours(rng, grid, canvas, kidneys, radii)
    image = _finish(rng, canvas.img, grid.spacing, params.noise_hu)
    return PhantomCase(image=image, label=canvas.lab, spacing=grid.spacing, affine=internal_affine(grid.spacing))


def write_case(case_dir: Path | str, case: PhantomCase) -> None:
    """Write the image (int16) and label (uint8) files of the KiTS layout atomically."""
    case_dir = Path(case_dir)
    save_nifti(case_dir / IMAGE_NAME, case.image, case.affine, dtype=np.int16)
    save_nifti(case_dir / LABEL_NAME, case.label, case.affine, dtype=np.uint8)


def generate_phantom_case(case_dir: Path | str, index: int, seed: int, params: dict | None) -> None:
    """Generate case ``index`` of phantom set ``seed`` and write it to ``case_dir``."""
    write_case(case_dir, generate_case(index, seed, PhantomParams.from_config(params)))
