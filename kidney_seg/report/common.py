"""Helpers shared by the report's sections: escaping, number formatting, notes and PNG data URIs."""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DASH = "&mdash;"
#: Embedded images above this size are re-rendered smaller (overlays) where possible.
MAX_PNG_BYTES = 150_000


def esc(value: object) -> str:
    """HTML-escape any value's text (quotes included)."""
    return html.escape(str(value), quote=True)


def is_missing(value: object) -> bool:
    """True for None, NaN and non-numeric placeholders."""
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def fmt(value: object, digits: int = 3) -> str:
    """A number to ``digits`` decimals, a dash for missing/NaN, escaped text otherwise."""
    if is_missing(value):
        return DASH
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return esc(value)


def note(text: str) -> str:
    """An italic note paragraph (text is escaped)."""
    return f'<p class="note">{esc(text)}</p>'


def read_csv_or_none(path: str | os.PathLike | None, **kwargs) -> pd.DataFrame | None:
    """A CSV as a DataFrame, or None when the path is missing, empty or unreadable."""
    if path is None or not Path(path).is_file():
        return None
    try:
        df = pd.read_csv(path, **kwargs)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError):
        return None
    return df


def png_bytes(fig: Figure, dpi: int = 110, colors: int | None = None) -> bytes:
    """A figure (Agg) as PNG bytes; with ``colors``, as an optimised palette PNG of at most that many colours."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    if colors is None:  # charts: a tight layout at draw time (bbox_inches="tight" would draw the figure twice)
        if fig.get_layout_engine() is None:
            fig.set_layout_engine("tight")
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")  # overlays: cropped to what is drawn
    from PIL import Image  # a matplotlib dependency

    buf.seek(0)
    with Image.open(buf) as im:
        pal = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    pal.save(out, format="PNG", optimize=True)
    return out.getvalue()


def data_uri(png: bytes) -> str:
    """PNG bytes as a base64 data URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_data_uri(fig: Figure, dpi: int = 110) -> str:
    """Render a figure (Agg) to a base64 PNG data URI."""
    return data_uri(png_bytes(fig, dpi))


def img(uri: str, alt: str, cls: str | None = None) -> str:
    """An <img> tag for a data URI."""
    klass = f' class="{esc(cls)}"' if cls else ""
    return f'<img{klass} src="{uri}" alt="{esc(alt)}">'


def mpl_text(text: object) -> str:
    """Text safe for a matplotlib label: no mathtext ($ pairs would be parsed)."""
    return str(text).replace("$", r"\$")
