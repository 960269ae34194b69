"""CT overlays of the best, median and worst test case: ground truth and prediction contours on one axial slice.

Cases are ranked by TU Dice over the test cases with a tumour in the ground truth (a
tumour-free case scores 1.0 for an empty prediction, which says nothing about tumours);
where no test case has a tumour they are ranked by TK Dice. The slice is the one with the
largest tumour cross-section in the ground truth (largest kidney + tumour cross-section
where the case has no tumour). Volumes are read with the library's readers, in the
internal (I, P, L) orientation: axial slices run along axis 0, rows go from anterior
to posterior and columns from the patient's right to left (radiological view).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kidney_seg.report.common import MAX_PNG_BYTES, data_uri, esc, fmt, img, mpl_text, note, png_bytes
from kidney_seg.vocabulary import CYST, KIDNEY, KITS19_LABELS, TUMOR
from kidney_seg.volume import read_image, read_label

log = logging.getLogger(__name__)

#: Soft-tissue window (HU): width 400, level 40.
WINDOW = (40.0, 400.0)
#: Margin (mm) kept around the segmentations when the slice is cropped.
MARGIN_MM = 30.0
#: label value -> (name, truth colour, prediction colour); truth solid, prediction dashed.
CLASS_STYLE: dict[int, tuple[str, str, str]] = {
    KIDNEY: ("kidney", "#2ecc40", "#ffdc00"),
    TUMOR: ("tumour", "#ff4136", "#00e5ff"),
    CYST: ("cyst", "#b10dc9", "#ff85f5"),
}
ROLES = ("best", "median", "worst")


def _flags(per_case: pd.DataFrame) -> pd.Series | None:
    """has_tumor as bool (None when absent)."""
    if "has_tumor" not in per_case.columns:
        return None
    return per_case["has_tumor"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0", "yes")).astype(bool)


def pick_cases(per_case: pd.DataFrame | None) -> tuple[list[dict], str | None]:
    """The best, median and worst case: ([{'case_id', 'roles', 'value'}], metric ranked by).

    TU Dice over cases with a tumour (all cases where ``has_tumor`` is absent); TK Dice
    over all cases where no case has a tumour. Cases with a NaN score are not ranked.
    Order: highest score first, ties by case id; the median is the middle case (the
    better of the two middle ones for an even count). A case holding several roles
    (fewer than three cases) appears once with all of them.
    """
    if per_case is None or per_case.empty or "case_id" not in per_case.columns:
        return [], None
    flags = _flags(per_case)
    candidates = []
    if "tu_dice" in per_case.columns:
        rows = per_case if flags is None else per_case[flags.to_numpy()]
        candidates.append(("tu_dice", rows))
    if "tk_dice" in per_case.columns:
        candidates.append(("tk_dice", per_case))
    for metric, rows in candidates:
        values = pd.to_numeric(rows[metric], errors="coerce").astype(float)
        ranked = sorted(((-v, str(c)) for c, v in zip(rows["case_id"], values) if math.isfinite(v)))
        if not ranked:
            continue
        order = [(c, -negv) for negv, c in ranked]
        chosen = {"best": order[0], "median": order[(len(order) - 1) // 2], "worst": order[-1]}
        picks: list[dict] = []
        for role in ROLES:
            case, value = chosen[role]
            same = next((p for p in picks if p["case_id"] == case), None)
            if same is None:
                picks.append({"case_id": case, "roles": [role], "value": value})
            else:
                same["roles"].append(role)
        return picks, metric
    return [], None


def choose_slice(label: np.ndarray) -> tuple[int, str]:
    """(axial index along axis 0, why): the largest tumour cross-section, else the largest kidney + tumour one.

    Ties go to the first such slice; an empty label volume gives the middle slice.
    """
    lab = np.asarray(label)
    if lab.ndim != 3 or lab.shape[0] == 0:
        raise ValueError(f"expected a non-empty 3D label volume, got shape {lab.shape}")
    tumour = np.count_nonzero(lab == TUMOR, axis=(1, 2))
    if tumour.any():
        return int(np.argmax(tumour)), "largest tumour cross-section in the ground truth"
    foreground = np.count_nonzero(lab > 0, axis=(1, 2))
    if foreground.any():
        return int(np.argmax(foreground)), "largest kidney cross-section in the ground truth (no tumour)"
    return lab.shape[0] // 2, "middle slice (empty ground truth)"


def crop_box(mask: np.ndarray, spacing: tuple[float, float], margin_mm: float = MARGIN_MM) -> tuple[slice, slice]:
    """Row and column slices around a 2D mask's nonzero pixels, ``margin_mm`` wider each side; whole slice if empty."""
    if not mask.any():
        return slice(0, mask.shape[0]), slice(0, mask.shape[1])
    out = []
    for axis in (0, 1):
        idx = np.flatnonzero(mask.any(axis=1 - axis))
        pad = int(math.ceil(margin_mm / max(float(spacing[axis]), 1e-6)))
        out.append(slice(max(0, int(idx[0]) - pad), min(mask.shape[axis], int(idx[-1]) + 1 + pad)))
    return out[0], out[1]


def _contours(ax, mask: np.ndarray, color: str, style: str) -> None:
    """Draw the outline of a 2D mask (nothing for an empty mask)."""
    if mask.any() and not mask.all():
        # padded by one pixel so that outlines touching the crop edge close; x = column, y = row index
        ax.contour(
            np.arange(-1, mask.shape[1] + 1),
            np.arange(-1, mask.shape[0] + 1),
            np.pad(mask.astype(np.float32), 1),
            levels=[0.5],
            colors=[color],
            linestyles=[style],
            linewidths=1.5,
        )


def overlay_figure(
    ct: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    spacing: tuple[float, float],
    title: str,
    classes: tuple[int, ...] = (KIDNEY, TUMOR),
) -> Figure:
    """A windowed CT slice with truth (solid) and prediction (dashed) contours per class, a legend and a title.

    ``spacing`` is the (row, column) pixel size in mm; it sets the aspect ratio.
    """
    level, width = WINDOW
    rows, cols = crop_box((truth > 0) | (pred > 0), spacing)
    ct, truth, pred = ct[rows, cols], truth[rows, cols], pred[rows, cols]
    height_mm, width_mm = ct.shape[0] * spacing[0], ct.shape[1] * spacing[1]
    fig_w = 4.6
    fig_h = min(6.5, max(2.4, fig_w * height_mm / max(width_mm, 1e-6)))
    fig = Figure(figsize=(fig_w, fig_h + 0.9))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(
        np.asarray(ct, dtype=np.float32),
        cmap="gray",
        vmin=level - width / 2,
        vmax=level + width / 2,
        aspect=float(spacing[0]) / float(spacing[1]),
        interpolation="antialiased",
    )
    handles = []
    for value in classes:
        name, truth_colour, pred_colour = CLASS_STYLE[value]
        _contours(ax, truth == value, truth_colour, "solid")
        _contours(ax, pred == value, pred_colour, "dashed")
        handles += [
            Line2D([], [], color=truth_colour, linestyle="solid", linewidth=1.5, label=f"truth {name}"),
            Line2D([], [], color=pred_colour, linestyle="dashed", linewidth=1.5, label=f"prediction {name}"),
        ]
    ax.set_xlim(-0.5, ct.shape[1] - 0.5)
    ax.set_ylim(ct.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    for x, ha, text in ((0.01, "left", "R"), (0.99, "right", "L")):
        ax.text(x, 0.5, text, transform=ax.transAxes, color="white", ha=ha, va="center", fontsize=8)
    ax.text(0.5, 0.99, "A", transform=ax.transAxes, color="white", ha="center", va="top", fontsize=8)
    ax.set_title(mpl_text(title), fontsize=8.5)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, fontsize=7, frameon=False)
    return fig


def small_png(fig: Figure, limit: int = MAX_PNG_BYTES) -> bytes:
    """The figure as a palette PNG, re-rendered at lower resolution until it is under ``limit`` bytes (if possible)."""
    png = b""
    for dpi, colors in ((110, 128), (90, 96), (72, 64), (56, 48), (44, 32)):
        png = png_bytes(fig, dpi=dpi, colors=colors)
        if len(png) <= limit:
            break
    return png


def _read_case(case_id: str, paths, label_values: tuple[int, ...]):
    """(ct, truth, pred, geometry) in the internal orientation; a CaseDataError names the file that failed."""
    image_path, label_path, pred_path = paths
    ct, geometry = read_image(image_path, case_id)
    truth, _ = read_label(label_path, case_id, label_values, grid=geometry)
    pred, _ = read_label(pred_path, case_id, label_values, grid=geometry)
    return ct, truth, pred, geometry


def case_overlay(case_id: str, roles: list[str], paths, metrics: Mapping, label_values: tuple[int, ...]) -> str:
    """One <figure class="overlay"> for a case, or a note naming the file that could not be read."""
    try:
        ct, truth, pred, geometry = _read_case(case_id, paths, label_values)
        index, why = choose_slice(truth)
        spacing = (float(geometry.spacing[1]), float(geometry.spacing[2]))
        tk, tu = metrics.get("tk_dice"), metrics.get("tu_dice")
        title = (
            f"{case_id} ({', '.join(roles)}): TK Dice {fmt(tk)}, TU Dice {fmt(tu)}\n"
            f"axial slice {index} of {truth.shape[0]} (superior to inferior), W400/L40"
        )
        classes = tuple(v for v in CLASS_STYLE if v in label_values)
        fig = overlay_figure(
            np.asarray(ct[index]), np.asarray(truth[index]), np.asarray(pred[index]), spacing, title, classes
        )
        png = small_png(fig)
    except Exception as exc:  # a note, never a crash
        log.warning("overlay of %s skipped: %s", case_id, exc)
        return note(f"Overlay of {case_id} ({', '.join(roles)}) not drawn: {exc}")
    caption = (
        f"{case_id} ({', '.join(roles)}): TK Dice {fmt(tk)}, TU Dice {fmt(tu)}; axial slice {index}, {why}. "
        "Truth solid, prediction dashed; window W400/L40; cropped to the segmentations with a "
        f"{MARGIN_MM:.0f} mm margin."
    )
    roles_attr = " ".join(roles)
    return (
        f'<figure class="overlay" data-case="{esc(case_id)}" data-roles="{esc(roles_attr)}" data-slice="{index}" '
        f'data-bytes="{len(png)}">{img(data_uri(png), f"Overlay of {case_id}")}'
        f"<figcaption>{esc(caption).replace(chr(10), ' ')}</figcaption></figure>"
    )


def overlays_section(
    per_case: pd.DataFrame | None, scans: Mapping | None, label_values: tuple[int, ...] = KITS19_LABELS
) -> str:
    """Overlays of the best, median and worst test case; ``scans`` maps case id -> (image, label, prediction) paths."""
    picks, metric = pick_cases(per_case)
    if not picks:
        return note("No ranked test case (no per-case TU or TK Dice) to draw.")
    if not scans:
        return note("No scans were given for the overlays.")
    by_case = {str(r["case_id"]): r for r in per_case.to_dict("records")}
    ranked_by = (
        "TU Dice over the test cases with a tumour" if metric == "tu_dice" else "TK Dice (no test case has a tumour)"
    )
    parts = [f'<p class="muted">Best, median and worst test case by {esc(ranked_by)}.</p>', '<div class="overlays">']
    for pick in picks:
        case = pick["case_id"]
        paths = scans.get(case)
        if paths is None:
            parts.append(note(f"Overlay of {case} ({', '.join(pick['roles'])}) not drawn: no scan paths given."))
            continue
        parts.append(case_overlay(case, pick["roles"], paths, by_case.get(case, {}), tuple(label_values)))
    parts.append("</div>")
    return "\n".join(parts)


def extract_overlay(report_html: str | os.PathLike, role: str = "median") -> bytes:
    """The PNG of the overlay a report shows for ``role`` (best, median or worst), e.g. for the README."""
    import base64
    import re

    page = Path(report_html).read_text()
    for figure in re.findall(r'<figure class="overlay"[^>]*>.*?</figure>', page, flags=re.S):
        roles = re.search(r'data-roles="([^"]*)"', figure).group(1).split()
        found = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', figure)
        if role in roles and found:
            return base64.b64decode(found.group(1))
    raise ValueError(f"{report_html}: no {role} overlay in this report")


def write_overlay_png(report_html: str | os.PathLike, out_png: str | os.PathLike, role: str = "median") -> int:
    """Write the ``role`` overlay of a finished report to a PNG file atomically; return its size in bytes."""
    from kidney_seg.atomic import atomic_path

    png = extract_overlay(report_html, role)
    with atomic_path(out_png) as tmp:
        Path(tmp).write_bytes(png)
    return len(png)
