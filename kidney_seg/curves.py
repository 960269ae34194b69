"""The training curves (loss, validation Dice, learning rate) of a history, drawn once for training and the report.

Training writes them to ``curves.png`` beside the model; the report embeds the same figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kidney_seg.atomic import atomic_path


def _numeric(history: pd.DataFrame, col: str) -> pd.Series:
    """A history column as float."""
    return pd.to_numeric(history[col], errors="coerce")


def history_panels(history: pd.DataFrame) -> list[tuple[str, list[str], bool]]:
    """(title, columns, log-scale) for each panel that has data: loss, validation Dice, learning rate."""
    panels: list[tuple[str, list[str], bool]] = []
    losses = [c for c in ("loss", "val_loss") if c in history.columns and _numeric(history, c).notna().any()]
    if losses:
        panels.append(("Loss", losses, False))
    dice = [
        c
        for c in sorted(str(c) for c in history.columns if str(c).startswith("val_dice_"))
        if _numeric(history, c).notna().any()
    ]
    if dice:
        panels.append(("Validation Dice", dice, False))
    if "lr" in history.columns and (_numeric(history, "lr") > 0).any():
        panels.append(("Learning rate", ["lr"], True))
    return panels


#: Width and height of one panel, and the margins around its axes (left, right, bottom, top), in inches.
PANEL_IN = (4.2, 3.0)
MARGIN_IN = (0.62, 0.14, 0.48, 0.32)


def _fixed_margins(fig: Figure, nrows: int, ncols: int) -> None:
    """Lay the panels out with fixed margins: a tight layout measures every label first (about 0.2 s a figure)."""
    (pw, ph), (left, right, bottom, top) = PANEL_IN, MARGIN_IN
    width, height = pw * ncols, ph * nrows
    ax_w, ax_h = pw - left - right, ph - bottom - top
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=(left + right) / ax_w,
        hspace=(bottom + top) / ax_h,
    )


def history_figure(history: pd.DataFrame) -> Figure | None:
    """Training-curve panels of a history (loss, val_loss, val_dice_*, log-scale lr), or None if none is plottable."""
    panels = history_panels(history) if history is not None and not history.empty else []
    if not panels:
        return None
    x = _numeric(history, "epoch") if "epoch" in history.columns else pd.Series(np.arange(len(history)))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(PANEL_IN[0] * ncols, PANEL_IN[1] * nrows))
    _fixed_margins(fig, nrows, ncols)
    for i, (title, cols, log) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for c in cols:
            y = _numeric(history, c)
            ok = y.notna() & x.notna() & ((y > 0) if log else True)
            ax.plot(x[ok], y[ok], marker="." if ok.sum() < 30 else None, label=str(c))
        if log:
            ax.set_yscale("log")
        if title == "Validation Dice":
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(cols) > 1:
            ax.legend(fontsize=8)
    return fig


def write_curves(history: pd.DataFrame, path: str | os.PathLike) -> None:
    """Draw the training-curve panels to a PNG, atomically (a note when nothing is plottable)."""
    fig = history_figure(history)
    if fig is None:
        fig = Figure(figsize=PANEL_IN)
        fig.text(0.5, 0.5, "no training history to plot", ha="center", va="center")
    FigureCanvasAgg(fig)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
