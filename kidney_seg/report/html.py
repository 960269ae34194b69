"""Build one self-contained HTML report (inline CSS, inline PNG data URIs, no external URLs).

Everything taken from inputs (case ids, config values, file names) is HTML-escaped.
Missing or empty inputs (history, split, benchmarks, NaN metrics) give a note, not an error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import kidney_seg
from kidney_seg.io import write_text_atomic

#: Paper (Chen & Jin 2019), Table 1: 2D U-Net on the local 0.8/0.1/0.1 test split.
PAPER_LOCAL_TEST: dict[str, float] = {
    "tk_dice": 0.91,
    "tu_dice": 0.25,
    "kidney_precision": 0.914,
    "tumor_precision": 0.334,
    "kidney_recall": 0.883,
    "tumor_recall": 0.238,
}
#: Paper, Table 1 "Actual Results": KiTS19 leaderboard (official test set).
PAPER_LEADERBOARD: dict[str, float] = {"tk_dice": 0.858, "tu_dice": 0.224}
#: KiTS19 winner (nnU-Net, 3D residual U-Net): kidney (TK) Dice, tumour Dice, composite.
KITS19_WINNER: dict[str, float] = {"tk_dice": 0.974, "tu_dice": 0.851, "kits_composite": 0.912}

#: Headline rows: (summary metric name, label shown).
HEADLINE_ROWS: tuple[tuple[str, str], ...] = (
    ("tk_dice", "TK Dice (kidney + tumour)"),
    ("tu_dice", "TU Dice (tumour)"),
    ("tu_dice_with_tumor", "TU Dice, cases with tumour only"),
    ("kits_composite", "KiTS19 composite (TK + TU)/2"),
    ("kidney_precision", "Kidney precision"),
    ("kidney_recall", "Kidney recall"),
    ("tumor_precision", "Tumour precision"),
    ("tumor_recall", "Tumour recall"),
)

DASH = "&mdash;"

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}
th{background:#f2f2f2}td.txt,th.txt{text-align:left}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}table.sortable th[data-dir=desc]::after{content:" \\25BC"}
tr:nth-child(even) td{background:#fafafa}
.note{color:#555;font-style:italic}.muted{color:#777}
pre{background:#f6f8fa;border:1px solid #ddd;padding:.8em;overflow:auto;font-size:.85em}
img{max-width:100%;height:auto}
.scroll{overflow-x:auto}
"""

# Sorts table.sortable by the clicked column, numerically where both cells hold numbers;
# cells without a number (missing values) stay last in either direction.
SORT_JS = """
(function(){
  var tables = document.querySelectorAll('table.sortable');
  for (var t = 0; t < tables.length; t++) { setup(tables[t]); }
  function key(cell){ var v = cell ? cell.getAttribute('data-v') : null; return v === null ? (cell ? cell.textContent : '') : v; }
  function setup(table){
    var heads = table.querySelectorAll('thead th');
    for (var i = 0; i < heads.length; i++) { bind(table, heads, i); }
  }
  function bind(table, heads, col){
    heads[col].addEventListener('click', function(){
      var body = table.tBodies[0];
      if (!body) { return; }
      var asc = heads[col].getAttribute('data-dir') !== 'asc';
      for (var h = 0; h < heads.length; h++) { heads[h].removeAttribute('data-dir'); }
      heads[col].setAttribute('data-dir', asc ? 'asc' : 'desc');
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function(a, b){
        var x = key(a.cells[col]), y = key(b.cells[col]);
        var nx = parseFloat(x), ny = parseFloat(y), c;
        if (!isNaN(nx) && !isNaN(ny)) { c = nx - ny; }
        else if (!isNaN(nx)) { return -1; } else if (!isNaN(ny)) { return 1; }
        else { c = String(x).localeCompare(String(y)); }
        return asc ? c : -c;
      });
      for (var r = 0; r < rows.length; r++) { body.appendChild(rows[r]); }
    });
  }
})();
"""


def esc(value: object) -> str:
    """HTML-escape any value's text (quotes included)."""
    return html.escape(str(value), quote=True)


def _is_missing(value: object) -> bool:
    """True for None, NaN and non-numeric placeholders."""
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def fmt(value: object, digits: int = 3) -> str:
    """A number to ``digits`` decimals, a dash for missing/NaN, escaped text otherwise."""
    if _is_missing(value):
        return DASH
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return esc(value)


def read_csv_or_none(path: str | os.PathLike | None) -> pd.DataFrame | None:
    """A CSV as a DataFrame, or None when the path is missing, empty or unreadable."""
    if path is None or not Path(path).is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError):
        return None
    return df


def png_data_uri(fig: Figure) -> str:
    """Render a figure (Agg) to a base64 PNG data URI."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    """An <img> tag for a data URI."""
    return f'<img src="{uri}" alt="{esc(alt)}">'


def _note(text: str) -> str:
    """An italic note paragraph (text is escaped)."""
    return f'<p class="note">{esc(text)}</p>'


# ---------------------------------------------------------------- headline


def summary_lookup(summary: pd.DataFrame | None) -> dict[str, dict]:
    """Summary rows keyed by metric name."""
    if summary is None or "metric" not in summary.columns:
        return {}
    return {str(r["metric"]): r for r in summary.to_dict("records")}


def headline_table(summary: pd.DataFrame | None) -> str:
    """This run's test-set means beside the paper's Table 1 and the KiTS19 winner."""
    rows = summary_lookup(summary)
    head = (
        "<thead><tr><th class=txt>Metric</th><th>This run: mean</th><th>median</th><th>n</th>"
        "<th>Paper 2D U-Net (local test)</th><th>Paper 2D U-Net (leaderboard)</th>"
        "<th>KiTS19 winner (nnU-Net)</th></tr></thead>"
    )
    body = []
    for key, label in HEADLINE_ROWS:
        r = rows.get(key, {})
        n = r.get("n")
        cells = [
            f"<td class=txt>{esc(label)}</td>",
            f"<td><b>{fmt(r.get('mean'))}</b></td>",
            f"<td>{fmt(r.get('median'))}</td>",
            f"<td>{DASH if _is_missing(n) else int(float(n))}</td>",
            f"<td>{fmt(PAPER_LOCAL_TEST.get(key))}</td>",
            f"<td>{fmt(PAPER_LEADERBOARD.get(key))}</td>",
            f"<td>{fmt(KITS19_WINNER.get(key))}</td>",
        ]
        body.append(f"<tr data-metric=\"{esc(key)}\">{''.join(cells)}</tr>")
    return f'<table class="headline">{head}<tbody>{"".join(body)}</tbody></table>'


def summary_full_table(summary: pd.DataFrame | None) -> str:
    """All rows of summary.csv."""
    if summary is None or summary.empty:
        return _note("No summary metrics available.")
    return f'<table class="sortable">{_table_body(summary, "metric")}</table>'


def _table_body(df: pd.DataFrame, text_col: str, row_class: str | None = None) -> str:
    """<thead> and <tbody> of a sortable table; ``text_col`` holds text, ``row_class`` tags rows by it."""
    cols = list(df.columns)
    head = "".join(f"<th{' class=txt' if c == text_col else ''}>{esc(c)}</th>" for c in cols)
    rows = []
    for rec in df.to_dict("records"):
        cells = "".join(_cell(rec[c], text=(c == text_col)) for c in cols)
        attrs = f' class="{row_class}" data-case="{esc(rec[text_col])}"' if row_class else ""
        rows.append(f"<tr{attrs}>{cells}</tr>")
    return f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody>"


# ---------------------------------------------------------------- per case


def _cell(value: object, text: bool = False) -> str:
    """One <td> with a sort key; numbers to 3 decimals."""
    if text:
        return f'<td class=txt data-v="{esc(value)}">{esc(value)}</td>'
    if isinstance(value, (bool, np.bool_)):
        return f'<td data-v="{int(value)}">{fmt(value)}</td>'
    key = "" if _is_missing(value) else esc(value)
    return f'<td data-v="{key}">{fmt(value)}</td>'


def per_case_table(per_case: pd.DataFrame | None) -> str:
    """Every case with every metric; rows are <tr class="case-row" data-case=...>."""
    if per_case is None or per_case.empty or "case_id" not in per_case.columns:
        return _note("No per-case metrics available (zero evaluated cases).")
    return (
        f'<div class="scroll"><table class="sortable per-case">{_table_body(per_case, "case_id", "case-row")}</table></div>'
        '<p class="muted">Click a column header to sort.</p>'
    )


def per_case_dice_plot(per_case: pd.DataFrame | None) -> str:
    """A strip plot of per-case TK and TU Dice, or a note."""
    if per_case is None or per_case.empty:
        return ""
    series = []
    for col, label in (("tk_dice", "TK Dice"), ("tu_dice", "TU Dice")):
        if col in per_case.columns:
            v = pd.to_numeric(per_case[col], errors="coerce").dropna().to_numpy()
            series.append((label, v))
    if not any(v.size for _, v in series):
        return _note("No finite per-case Dice values to plot.")
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    rng = np.random.default_rng(0)
    for i, (label, v) in enumerate(series):
        ax.scatter(i + rng.uniform(-0.12, 0.12, v.size), v, s=14, alpha=0.7)
        if v.size:
            ax.hlines(v.mean(), i - 0.25, i + 0.25, colors="k", linewidth=1.5)
    ax.set_xticks(range(len(series)))
    ax.set_xticklabels([s[0] for s in series])
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("Dice per case (bar = mean)")
    ax.grid(axis="y", alpha=0.3)
    return _img(png_data_uri(fig), "Per-case Dice")


# ---------------------------------------------------------------- training curves


def _numeric(history: pd.DataFrame, col: str) -> pd.Series:
    """A history column as float."""
    return pd.to_numeric(history[col], errors="coerce")


def history_panels(history: pd.DataFrame) -> list[tuple[str, list[str], bool]]:
    """(title, columns, log-scale) for each panel that has data."""
    panels: list[tuple[str, list[str], bool]] = []
    losses = [c for c in ("loss", "val_loss") if c in history.columns and _numeric(history, c).notna().any()]
    if losses:
        panels.append(("Loss", losses, False))
    for c in sorted(c for c in history.columns if str(c).startswith("val_dice_")):
        if _numeric(history, c).notna().any():
            panels.append((str(c), [c], False))
    if "lr" in history.columns and (_numeric(history, "lr") > 0).any():
        panels.append(("Learning rate", ["lr"], True))
    return panels


def history_figure(history: pd.DataFrame) -> Figure | None:
    """The training-curve panels of a history (loss, each val_dice_*, log-scale lr), or None when nothing is plottable."""
    panels = history_panels(history) if history is not None and not history.empty else []
    if not panels:
        return None
    x = _numeric(history, "epoch") if "epoch" in history.columns else pd.Series(np.arange(len(history)))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows))
    for i, (title, cols, log) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for c in cols:
            y = _numeric(history, c)
            ok = y.notna() & x.notna() & ((y > 0) if log else True)
            ax.plot(x[ok], y[ok], marker="." if ok.sum() < 30 else None, label=str(c))
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(cols) > 1:
            ax.legend()
    fig.tight_layout()
    return fig


def training_curves(history_csv) -> str:
    """Training-curve panels as embedded PNGs (one per fold given a list of histories), or a note."""
    paths = list(history_csv) if isinstance(history_csv, (list, tuple)) else [history_csv]
    parts = []
    for fold, path in enumerate(paths):
        heading = f"<h3>Fold {fold}</h3>" if len(paths) > 1 else ""
        history = read_csv_or_none(path)
        if history is None or history.empty:
            parts.append(heading + _note(f"No training history available ({path})."))
            continue
        fig = history_figure(history)
        if fig is None:
            parts.append(heading + _note("The training history holds no plottable columns."))
            continue
        parts.append(heading + _img(png_data_uri(fig), f"Training curves{f' of fold {fold}' if len(paths) > 1 else ''}"))
    return "\n".join(parts) if parts else _note("No training history available.")


def postprocessing_section(decision_json: str | os.PathLike | None) -> str:
    """The post-processing decision: each step's validation Dice without and with it, and whether it was applied."""
    decision = None
    if decision_json is not None and Path(decision_json).is_file():
        decision = json.loads(Path(decision_json).read_text())
    if not decision:
        return _note("No post-processing decision available.")
    applied = ", ".join(decision.get("apply") or []) or "none"
    head = (f"<p>Applied to every prediction: <b>{esc(applied)}</b>. Decided on "
            f"{len(decision.get('validation_cases') or [])} validation case(s); settings "
            f"<code>{esc(json.dumps(decision.get('settings', {})))}</code>.</p>")
    if not decision.get("steps"):
        return head + _note(decision.get("reason", "No step was evaluated."))
    rows = "".join(
        f"<tr><td class=txt>{esc(st['name'])}</td><td class=txt>{esc(st['region'])}</td><td>{fmt(st['dice_before'], 4)}</td>"
        f"<td>{fmt(st['dice_after'], 4)}</td><td class=txt>{esc(st['other_region'])}</td><td>{fmt(st['other_before'], 4)}</td>"
        f"<td>{fmt(st['other_after'], 4)}</td><td class=txt>{'yes' if st['applied'] else 'no'}</td></tr>"
        for st in decision["steps"])
    return head + ('<table><thead><tr><th class=txt>Step</th><th class=txt>Region</th><th>Val Dice without</th>'
                   "<th>Val Dice with</th><th class=txt>Other region</th><th>Its Dice without</th><th>Its Dice with</th>"
                   f"<th class=txt>Applied</th></tr></thead><tbody>{rows}</tbody></table>")


# ---------------------------------------------------------------- provenance


def config_text(config: dict) -> str:
    """The config as YAML (JSON if it cannot be dumped as YAML)."""
    try:
        import yaml

        return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)
    except Exception:
        return json.dumps(config, indent=2, default=str, ensure_ascii=False)


def dataset_source(config: dict) -> str:
    """The dataset source named in the config, or 'unknown'."""
    ds = config.get("dataset") if isinstance(config, dict) else None
    if isinstance(ds, dict):
        for key in ("source", "name", "variant"):
            if ds.get(key) is not None:
                return str(ds[key])
    elif ds is not None:
        return str(ds)
    for key in ("data_source", "source"):
        if isinstance(config, dict) and config.get(key) is not None:
            return str(config[key])
    return "unknown"


def split_sizes(split_csv: str | os.PathLike | None) -> dict[str, int] | None:
    """Case counts per subset in split.csv, or None when unavailable."""
    split = read_csv_or_none(split_csv)
    if split is None or "subset" not in split.columns:
        return None
    if "case_id" in split.columns:
        split = split.drop_duplicates("case_id")
    counts = split["subset"].astype(str).value_counts()
    order = [s for s in ("train", "val", "test") if s in counts.index] + sorted(
        s for s in counts.index if s not in ("train", "val", "test")
    )
    return {s: int(counts[s]) for s in order}


def benchmark_row(path: str | os.PathLike) -> dict:
    """Run time (s, h:m:s) and peak RSS/VMS (MB) from one Snakemake benchmark TSV."""
    p = Path(path)
    label = f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem
    row = {"label": label, "s": np.nan, "hms": "", "max_rss": np.nan, "max_vms": np.nan, "repeats": 0}
    try:
        df = pd.read_csv(p, sep="\t")
    except Exception:
        row["hms"] = "unreadable"
        return row
    if df.empty:
        return row
    row["repeats"] = len(df)
    for col in ("s", "max_rss", "max_vms"):
        if col in df.columns:
            v = pd.to_numeric(df[col], errors="coerce")
            row[col] = float(v.mean() if col == "s" else v.max())
    if "h:m:s" in df.columns:
        row["hms"] = str(df["h:m:s"].iloc[0])
    return row


def benchmarks_table(benchmark_files: list | None) -> str:
    """Run time and peak memory per benchmark file."""
    if not benchmark_files:
        return _note("No benchmark files given.")
    rows = [benchmark_row(f) for f in benchmark_files]
    body = "".join(
        f'<tr><td class=txt>{esc(r["label"])}</td><td>{fmt(r["s"], 1)}</td><td class=txt>{esc(r["hms"])}</td>'
        f'<td>{fmt(r["max_rss"], 1)}</td><td>{fmt(r["max_vms"], 1)}</td><td>{r["repeats"]}</td></tr>'
        for r in rows
    )
    total = float(np.nansum([r["s"] for r in rows])) if rows else 0.0
    return (
        '<table class="sortable benchmarks"><thead><tr><th class=txt>Job</th><th>Run time (s)</th>'
        "<th class=txt>h:m:s</th><th>Peak RSS (MB)</th><th>Peak VMS (MB)</th><th>Rows</th></tr></thead>"
        f"<tbody>{body}</tbody></table><p>Total run time over these jobs: {fmt(total, 1)} s.</p>"
    )


def provenance_section(
    config: dict, per_case: pd.DataFrame | None, split_csv, benchmark_files: list | None
) -> str:
    """Dataset, split sizes, benchmarks, version, date and the config."""
    n_eval = 0 if per_case is None else len(per_case)
    sizes = split_sizes(split_csv)
    if sizes is None:
        split_html = _note(f"No split available ({split_csv}).")
    else:
        cells = "".join(f"<tr><td class=txt>{esc(k)}</td><td>{v}</td></tr>" for k, v in sizes.items())
        cells += f"<tr><td class=txt><b>total</b></td><td><b>{sum(sizes.values())}</b></td></tr>"
        split_html = f'<table><thead><tr><th class=txt>Subset</th><th>Cases</th></tr></thead><tbody>{cells}</tbody></table>'
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    facts = (
        "<ul>"
        f"<li>Dataset source: <code>{esc(dataset_source(config))}</code></li>"
        f"<li>Cases in the split: {DASH if sizes is None else sum(sizes.values())}; evaluated test cases: {n_eval}</li>"
        f"<li>kidney_seg version: <code>{esc(getattr(kidney_seg, '__version__', 'unknown'))}</code></li>"
        f"<li>Report generated: {esc(date)}</li>"
        "</ul>"
    )
    return (
        f"<h2>Provenance</h2>{facts}<h3>Split</h3>{split_html}"
        f"<h3>Run time and memory</h3>{benchmarks_table(benchmark_files)}"
        f"<h3>Configuration</h3><pre>{esc(config_text(config))}</pre>"
    )


# ---------------------------------------------------------------- page


CONVENTIONS = (
    "TK Dice = Dice(pred > 0, truth > 0); TU Dice = Dice(pred == 2, truth == 2); composite = "
    "mean of the TK and TU Dice means. Empty masks (KiTS23 convention): both empty scores 1, "
    "exactly one empty scores 0; precision and recall likewise. Summaries skip NaN values; "
    "n counts the values used. Precision and recall are per class (kidney = label 1, tumour = "
    "label 2). Paper numbers are from its Table 1; its local test split differs from ours."
)


def render_html(
    per_case: pd.DataFrame | None,
    summary: pd.DataFrame | None,
    history_csv,
    split_csv,
    config: dict,
    benchmark_files: list | None,
    postprocessing_json: str | os.PathLike | None = None,
) -> str:
    """The whole report page as an ASCII-safe HTML string."""
    title = f"kidney-seg report: 2D U-Net on {dataset_source(config)} data"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<h2>Headline: test-set means</h2>",
        headline_table(summary),
        f'<p class="muted">{esc(CONVENTIONS)}</p>',
        "<h2>Per-case metrics</h2>",
        per_case_dice_plot(per_case),
        per_case_table(per_case),
        "<h2>Summary statistics</h2>",
        summary_full_table(summary),
        "<h2>Training curves</h2>",
        training_curves(history_csv),
        "<h2>Post-processing</h2>",
        postprocessing_section(postprocessing_json),
        provenance_section(config, per_case, split_csv, benchmark_files),
        f"<script>{SORT_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts).encode("ascii", "xmlcharrefreplace").decode("ascii") + "\n"


def build_report(
    out_html: str | os.PathLike,
    per_case_csv: str | os.PathLike,
    summary_csv: str | os.PathLike,
    history_csv: str | os.PathLike | None,
    split_csv: str | os.PathLike | None,
    config: dict,
    benchmark_files: list | None = None,
    postprocessing_json: str | os.PathLike | None = None,
) -> None:
    """Write the self-contained HTML report atomically."""
    page = render_html(
        read_csv_or_none(per_case_csv),
        read_csv_or_none(summary_csv),
        history_csv,
        split_csv,
        dict(config or {}),
        list(benchmark_files or []),
        postprocessing_json,
    )
    write_text_atomic(out_html, page)
