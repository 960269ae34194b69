"""Per-case metric distributions: one strip (jitter) plot per unit, one point per case; volumes also as a scatter.

Metrics are grouped by unit so that each axis means one thing: overlap scores (Dice,
precision, recall, surface Dice) on a 0..1 axis, HD95 in mm, volumes in ml. NaN values
(an undefined HD95, say) are skipped; how many were skipped is written under each
strip and in the table below the plots.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kidney_seg.report.common import esc, img, mpl_text, note, png_data_uri

#: (unit key, heading, axis label); the order of the plots.
UNITS: tuple[tuple[str, str, str], ...] = (
    ("score", "Overlap scores: Dice, precision, recall, surface Dice (0..1)", "score per case"),
    ("mm", "Boundary distance: HD95 (mm)", "HD95 per case (mm)"),
    ("ml", "Volumes (ml)", "volume per case (ml)"),
    ("other", "Other per-case columns", "value per case"),
)
UNIT_TEXT: dict[str, str] = {"score": "0..1", "mm": "mm", "ml": "ml", "other": "-"}
#: Columns of per_case.csv that are not metrics to plot.
NOT_METRICS: frozenset[str] = frozenset({"case_id", "has_tumor"})


def metric_unit(name: str) -> str:
    """The unit group of a per-case column: 'score' (0..1), 'mm', 'ml' or 'other'."""
    n = str(name).lower()
    if n.endswith(("_hd95", "_mm")):
        return "mm"
    if n.endswith("_ml"):
        return "ml"
    if n.endswith(("_dice", "_precision", "_recall")):
        return "score"
    return "other"


def _is_flag(series: pd.Series) -> bool:
    """True for a boolean column (bool dtype or only True/False text)."""
    if series.dtype == bool:
        return True
    text = series.dropna().astype(str).str.strip().str.lower()
    return len(text) > 0 and text.isin(("true", "false")).all()


def numeric_metric_columns(per_case: pd.DataFrame | None) -> list[str]:
    """Per-case columns holding numbers (NaN allowed), in table order; ids, flags and text columns are left out."""
    if per_case is None:
        return []
    cols = []
    for c in per_case.columns:
        if str(c) in NOT_METRICS or _is_flag(per_case[c]):
            continue
        raw = per_case[c]
        num = pd.to_numeric(raw, errors="coerce")
        if int(num.notna().sum()) == int(raw.notna().sum()):  # nothing was text
            cols.append(str(c))
    return cols


def metric_values(per_case: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(finite values, their row positions, number of NaN/inf values skipped) of one column."""
    v = pd.to_numeric(per_case[col], errors="coerce").astype(float).to_numpy()
    ok = np.isfinite(v)
    return v[ok], np.flatnonzero(ok), int((~ok).sum())


def _tumour_flags(per_case: pd.DataFrame) -> np.ndarray | None:
    """has_tumor per row as bool, or None when the column is absent."""
    if "has_tumor" not in per_case.columns:
        return None
    col = per_case["has_tumor"]
    return col.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0", "yes")).to_numpy(bool)


def strip_figure(per_case: pd.DataFrame, cols: list[str], unit: str, ylabel: str) -> Figure:
    """One jittered strip per metric (one point per case, bar = median); scores on a 0..1 axis."""
    flags = _tumour_flags(per_case)
    fig = Figure(figsize=(max(4.0, 0.8 * len(cols) + 1.6), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    rng = np.random.default_rng(0)
    ticks = []
    for i, col in enumerate(cols):
        v, rows, skipped = metric_values(per_case, col)
        x = i + rng.uniform(-0.17, 0.17, v.size)
        if flags is None:
            ax.scatter(x, v, s=16, alpha=0.75, color="C0", zorder=3)
        else:
            tum = flags[rows]
            ax.scatter(x[tum], v[tum], s=16, alpha=0.75, color="C0", zorder=3)
            ax.scatter(x[~tum], v[~tum], s=16, alpha=0.9, facecolors="none", edgecolors="C1", zorder=3)
        if v.size:
            ax.hlines(np.median(v), i - 0.3, i + 0.3, colors="k", linewidth=1.6, zorder=4)
        ticks.append(col)
        ax.text(
            i,
            1.01,
            f"n={v.size}" + (f"\n{skipped} NaN\nskipped" if skipped else ""),
            ha="center",
            va="bottom",
            fontsize=7,
            color="firebrick" if skipped else "0.3",
            transform=ax.get_xaxis_transform(),
        )
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(
        [mpl_text(t) for t in ticks],
        rotation=30 if len(cols) > 3 else 0,
        ha="right" if len(cols) > 3 else "center",
        fontsize=8,
    )
    ax.set_xlim(-0.6, len(cols) - 0.4)
    if unit == "score":
        ax.set_ylim(-0.03, 1.03)
    elif unit in ("mm", "ml"):
        top = max(ax.get_ylim()[1], 1e-3)
        ax.set_ylim(-0.03 * top, top)
    ax.set_ylabel(f"{ylabel} (bar = median)")
    ax.grid(axis="y", alpha=0.3)
    if flags is not None:
        ax.legend(
            handles=[
                Line2D([], [], marker="o", linestyle="", color="C0", label="case with tumour"),
                Line2D(
                    [],
                    [],
                    marker="o",
                    linestyle="",
                    markerfacecolor="none",
                    markeredgecolor="C1",
                    label="case without tumour",
                ),
            ],
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
        )
    fig.tight_layout()
    return fig


def volume_pairs(per_case: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(structure, predicted column, true column) for each pred_X_ml / true_X_ml pair present."""
    pairs = []
    for c in per_case.columns:
        c = str(c)
        if c.startswith("pred_") and c.endswith("_ml") and f"true_{c[5:]}" in per_case.columns:
            pairs.append((c[5:-3], c, f"true_{c[5:]}"))
    return pairs


def volume_scatter(per_case: pd.DataFrame) -> Figure | None:
    """Predicted vs true volume per structure (identity line), or None when no pair has a finite point."""
    pairs = []
    for name, pc, tc in volume_pairs(per_case):
        p = pd.to_numeric(per_case[pc], errors="coerce").astype(float).to_numpy()
        t = pd.to_numeric(per_case[tc], errors="coerce").astype(float).to_numpy()
        ok = np.isfinite(p) & np.isfinite(t)
        if ok.any():
            pairs.append((name, p[ok], t[ok], int((~ok).sum())))
    if not pairs:
        return None
    fig = Figure(figsize=(3.3 * len(pairs), 3.4))
    for i, (name, p, t, skipped) in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), i + 1)
        hi = float(max(p.max(), t.max(), 1e-3)) * 1.08
        ax.plot([0, hi], [0, hi], color="0.6", linewidth=1, linestyle="--", zorder=1)
        ax.scatter(t, p, s=16, alpha=0.75, zorder=3)
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("true volume (ml)")
        ax.set_ylabel("predicted volume (ml)")
        ax.set_title(mpl_text(f"{name}: n={p.size}" + (f", {skipped} NaN skipped" if skipped else "")), fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def distribution_counts(per_case: pd.DataFrame) -> list[dict]:
    """One row per plotted metric: metric, unit, values plotted, NaN values skipped."""
    out = []
    for col in numeric_metric_columns(per_case):
        v, _, skipped = metric_values(per_case, col)
        out.append({"metric": col, "unit": metric_unit(col), "plotted": int(v.size), "skipped": skipped})
    return out


def distributions_section(per_case: pd.DataFrame | None) -> str:
    """The distribution of every numeric per-case metric (strip plots by unit, volume scatter) and the NaN counts."""
    if per_case is None or per_case.empty:
        return note("No per-case metrics to plot.")
    counts = distribution_counts(per_case)
    if not counts:
        return note("The per-case table holds no numeric metric columns.")
    parts = [
        '<p class="muted">One point per test case, jittered sideways; the black bar is the median. '
        "Hollow points are cases without a tumour in the ground truth. NaN values are not plotted; "
        "their count is given above each strip and in the table below.</p>"
    ]
    for unit, heading, ylabel in UNITS:
        cols = [r["metric"] for r in counts if r["unit"] == unit]
        if not cols:
            continue
        fig = strip_figure(per_case, cols, unit, ylabel)
        parts.append(
            f'<figure class="dist" data-unit="{unit}" data-metrics="{esc(" ".join(cols))}">'
            f"{img(png_data_uri(fig, dpi=100), heading)}<figcaption>{esc(heading)}</figcaption></figure>"
        )
        if unit == "ml":
            scatter = volume_scatter(per_case)
            if scatter is not None:
                parts.append(
                    '<figure class="dist" data-unit="ml-scatter">'
                    f"{img(png_data_uri(scatter, dpi=100), 'Predicted vs true volume')}"
                    "<figcaption>Predicted vs true volume per case (dashed: identity)</figcaption></figure>"
                )
    skipped = [r for r in counts if r["skipped"]]
    n = len(per_case)
    summary = (
        "NaN values skipped: " + "; ".join(f"{r['metric']}: {r['skipped']} of {n}" for r in skipped) + "."
        if skipped
        else f"No NaN values: every metric has a value for all {n} case(s)."
    )
    rows = "".join(
        f'<tr data-metric="{esc(r["metric"])}" data-plotted="{r["plotted"]}" data-skipped="{r["skipped"]}">'
        f"<td class=txt>{esc(r['metric'])}</td><td class=txt>{esc(UNIT_TEXT[r['unit']])}</td><td>{r['plotted']}</td>"
        f"<td>{r['skipped']}</td></tr>"
        for r in counts
    )
    parts.append(f'<p class="nan-summary">{esc(summary)}</p>')
    parts.append(
        f"<details><summary>Values plotted and skipped per metric ({len(counts)})</summary>"
        '<table class="dist-counts"><thead><tr><th class=txt>Metric</th><th class=txt>Unit</th>'
        f"<th>Values plotted</th><th>NaN skipped</th></tr></thead><tbody>{rows}</tbody></table></details>"
    )
    return "\n".join(parts)
