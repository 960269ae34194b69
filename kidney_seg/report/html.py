"""Build one self-contained HTML report (inline CSS and JS, inline PNG data URIs, no external URLs).

Sections: headline (this run beside the paper and the KiTS19 winner), per-case table,
metric distributions, CT overlays of the best, median and worst case, summary
statistics, training curves, post-processing, failures and provenance (data, split,
git commit, hardware, package versions, run time and memory, the config).

Everything taken from inputs (case ids, config values, file names) is HTML-escaped, and
the page is ASCII (other characters become character references). A Content Security
Policy forbids the page to load anything: images must be data: URIs, and scripts and
styles inline. Missing or empty inputs (history, split, benchmarks, scans, NaN metrics)
give a note, not an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kidney_seg.atomic import write_text_atomic
from kidney_seg.curves import history_figure
from kidney_seg.quality import flagged, flagged_first
from kidney_seg.report.common import DASH, esc, fmt, img, note, png_data_uri, read_csv_or_none
from kidney_seg.report.common import is_missing as _is_missing
from kidney_seg.report.figures import distributions_section
from kidney_seg.report.overlays import overlays_section
from kidney_seg.report.provenance import (
    benchmark_inputs,
    benchmark_row,
    benchmarks_table,
    config_text,
    dataset_source,
    provenance_section,
    split_sizes,
)
from kidney_seg.vocabulary import (
    REGIONS,
    TOLERANCES_OF_SOURCE,
    challenge_title,
    surface_tolerances,
    tolerance_challenge,
)

__all__ = [
    "DASH",
    "benchmark_row",
    "benchmarks_table",
    "build_report",
    "config_text",
    "dataset_source",
    "esc",
    "failures_section",
    "fmt",
    "headline_table",
    "per_case_table",
    "postprocessing_section",
    "quality_section",
    "render_html",
    "split_sizes",
    "training_curves",
]

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

#: Headline rows: (summary metric name, label shown), always shown. The paper reports no distance metric.
HEADLINE_ROWS: tuple[tuple[str, str], ...] = (
    ("tk_dice", "TK Dice (kidney + tumour, label > 0)"),
    ("tu_dice", "TU Dice (tumour, label 2)"),
    ("tu_dice_with_tumor", "TU Dice, cases with tumour only"),
    ("kits_composite", "KiTS19 composite: mean of the TK and TU Dice means"),
    ("kidney_precision", "Kidney precision"),
    ("kidney_recall", "Kidney recall"),
    ("tumor_precision", "Tumour precision"),
    ("tumor_recall", "Tumour recall"),
    ("tk_hd95", "TK HD95 (mm), cases where both masks exist"),
    ("tu_hd95", "TU HD95 (mm), cases where both masks exist"),
    ("tk_surface_dice", "TK surface Dice"),
    ("tu_surface_dice", "TU surface Dice"),
)
#: Rows shown when the summary has them: misses, the penalised HD95 and the 4-class (KiTS21/23) metrics.
OPTIONAL_ROWS: tuple[tuple[str, str], ...] = (
    ("tk_penalised_hd95", "TK HD95 (mm), every case: a miss scores the scan's diagonal"),
    ("tu_penalised_hd95", "TU HD95 (mm), every case: a miss scores the scan's diagonal"),
    ("tk_missed_cases", "TK missed: cases with kidney in the truth and none predicted"),
    ("tk_false_positive_cases", "TK false positive: cases with kidney predicted and none in the truth"),
    ("tu_missed_cases", "TU missed: cases with a tumour in the truth and none predicted"),
    ("tu_false_positive_cases", "TU false positive: cases with a tumour predicted and none in the truth"),
    ("masses_dice", "Masses Dice (tumour + cyst)"),
    ("masses_hd95", "Masses HD95 (mm), cases where both masks exist"),
    ("masses_penalised_hd95", "Masses HD95 (mm), every case: a miss scores the scan's diagonal"),
    ("masses_missed_cases", "Masses missed: cases with masses in the truth and none predicted"),
    ("masses_false_positive_cases", "Masses false positive: cases with masses predicted and none in the truth"),
    ("masses_surface_dice", "Masses surface Dice"),
    ("kits_hec_dice", "KiTS21/23 Dice: mean over kidney+masses, masses, tumour of the Dice means"),
    ("kits_hec_surface_dice", "KiTS21/23 surface Dice: mean over the three regions of the surface-Dice means"),
)
#: Prefix of the metrics scored on the plan's grid (the paper scored on its 3.0 x 0.7816 x 0.7816 mm grid).
PLAN_GRID_PREFIX = "plan_grid_"
#: The paper's numbers: the rows that carry them (on the plan's grid when the summary has it).
PAPER_KEYS: frozenset[str] = frozenset(PAPER_LOCAL_TEST) | frozenset(PAPER_LEADERBOARD)

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1.05em}
nav{font-size:.9em}nav a{margin-right:.9em}
table{border-collapse:collapse;margin:.5em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f2f2f2}td.txt,th.txt{text-align:left}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}table.sortable th[data-dir=desc]::after{content:" \\25BC"}
tr:nth-child(even) td{background:#fafafa}
.note{color:#555;font-style:italic}.muted{color:#777}
pre{background:#f6f8fa;border:1px solid #ddd;padding:.8em;overflow:auto;font-size:.85em}
img{max-width:100%;height:auto}
figure{margin:.6em 0}figcaption{font-size:.85em;color:#444;max-width:40em}
figure.dist{display:inline-block;vertical-align:top;margin-right:1.2em}
.overlays{display:flex;flex-wrap:wrap;gap:1em}.overlays figure{flex:0 1 30em}
.scroll{overflow-x:auto}
"""

#: The page may load nothing: images only as data: URIs, scripts and styles only inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

# Sorts table.sortable by the clicked column, numerically where both cells hold numbers;
# cells without a number (missing values) stay last in either direction. When every table
# is set up, <html> gets data-sort-ready="<number of sortable tables>".
SORT_JS = """
(function(){
  'use strict';
  var tables = document.querySelectorAll('table.sortable');
  for (var t = 0; t < tables.length; t++) { setup(tables[t]); }
  document.documentElement.setAttribute('data-sort-ready', String(tables.length));
  function key(cell){
    var v = cell ? cell.getAttribute('data-v') : null;
    return v === null ? (cell ? cell.textContent : '') : v;
  }
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
        var nx = x === '' ? NaN : Number(x), ny = y === '' ? NaN : Number(y), c;
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

# ---------------------------------------------------------------- headline


def summary_lookup(summary: pd.DataFrame | None) -> dict[str, dict]:
    """Summary rows keyed by metric name."""
    if summary is None or "metric" not in summary.columns:
        return {}
    return {str(r["metric"]): r for r in summary.to_dict("records")}


def _region_of(key: str) -> str | None:
    """The HEC region a surface-Dice row scores (``tk``, ``masses``, ``tu``), else None."""
    region = key.removesuffix("_surface_dice")
    return region if region != key and region in REGIONS else None


def _row_label(key: str, label: str, source: str | None) -> str:
    """A headline label naming the definition behind the number: the surface-Dice tolerance and library."""
    region = _region_of(key)
    if region is None:
        return label
    if source not in TOLERANCES_OF_SOURCE:
        return f"{label} (surface-distance; tolerances unknown: no dataset source)"
    mm = surface_tolerances(source)[region]
    return f"{label} at {mm:.4f} mm ({challenge_title(tolerance_challenge(source))} tolerance, surface-distance)"


def headline_rows(summary: pd.DataFrame | None, source: str | None = None) -> tuple[tuple[str, str], ...]:
    """Headline rows (key, label): the standard ones and the optional ones present, each with its plan-grid twin."""
    rows = summary_lookup(summary)
    out = []
    for key, label in (*HEADLINE_ROWS, *OPTIONAL_ROWS):
        if key in rows or (key, label) in HEADLINE_ROWS:
            out.append((key, _row_label(key, label, source)))
        twin = f"{PLAN_GRID_PREFIX}{key}"
        if twin in rows:
            out.append((twin, f"{_row_label(key, label, source)}, on the plan's grid (as the paper scored)"))
    return tuple(out)


def _has_plan_grid(rows: Mapping[str, dict]) -> bool:
    """Whether the summary holds plan-grid twins of the paper's metrics."""
    return any(f"{PLAN_GRID_PREFIX}{k}" in rows for k in PAPER_KEYS)


def _reference(key: str, table: Mapping[str, float], plan_grid: bool) -> float | None:
    """A paper value for a headline row: on the plan-grid row when the summary has one, else on the scan-grid row."""
    base = key.removeprefix(PLAN_GRID_PREFIX)
    if plan_grid and key == base and base in PAPER_KEYS:
        return None  # the paper's numbers stand beside the like-for-like (plan-grid) row
    return table.get(base)


def _count_cells(r: Mapping) -> list[str]:
    """Mean, median and n cells of a count row: the count, a dash, the number of cases."""
    count, n = r.get("mean"), r.get("n")
    shown = DASH if _is_missing(count) else str(int(float(count)))
    return [f"<td><b>{shown}</b></td>", f"<td>{DASH}</td>", f"<td>{DASH if _is_missing(n) else int(float(n))}</td>"]


def headline_table(summary: pd.DataFrame | None, source: str | None = None) -> str:
    """This run's test-set means beside the paper's Table 1 and the KiTS19 winner (a dash where they report none)."""
    rows = summary_lookup(summary)
    plan_grid = _has_plan_grid(rows)
    head = (
        "<thead><tr><th class=txt>Metric</th><th>This run: mean</th><th>median</th><th>n</th>"
        "<th>Paper 2D U-Net (local test)</th><th>Paper 2D U-Net (leaderboard)</th>"
        "<th>KiTS19 winner (nnU-Net)</th></tr></thead>"
    )
    body = []
    for key, label in headline_rows(summary, source):
        r = rows.get(key, {})
        n = r.get("n")
        digits = 2 if key.endswith("_hd95") else 3
        if key.endswith("_cases"):
            stats = _count_cells(r)
        else:
            stats = [
                f"<td><b>{fmt(r.get('mean'), digits)}</b></td>",
                f"<td>{fmt(r.get('median'), digits)}</td>",
                f"<td>{DASH if _is_missing(n) else int(float(n))}</td>",
            ]
        winner = None if key.startswith(PLAN_GRID_PREFIX) else KITS19_WINNER.get(key)
        cells = [
            f"<td class=txt>{esc(label)}</td>",
            *stats,
            f"<td>{fmt(_reference(key, PAPER_LOCAL_TEST, plan_grid))}</td>",
            f"<td>{fmt(_reference(key, PAPER_LEADERBOARD, plan_grid))}</td>",
            f"<td>{fmt(winner)}</td>",
        ]
        body.append(f'<tr data-metric="{esc(key)}">{"".join(cells)}</tr>')
    return f'<table class="headline">{head}<tbody>{"".join(body)}</tbody></table>'


def headline_note(summary: pd.DataFrame | None, source: str | None) -> str:
    """One line under the headline: the tolerances used and the miss counts."""
    rows = summary_lookup(summary)
    parts = []
    if source in TOLERANCES_OF_SOURCE:
        tol = " / ".join(f"{mm:.4f}" for mm in surface_tolerances(source).values())
        parts.append(
            f"Surface Dice and HD95: DeepMind's surface-distance (surfels weighted by area), as the KiTS21/23 "
            f"scorer; {challenge_title(tolerance_challenge(source))} tolerances {tol} mm "
            "(kidney+masses / masses / tumour) "
            f"for dataset source {source}."
        )
    counts = [
        f"{region.upper()}: {int(float(rows[f'{region}_missed_cases']['mean']))} missed, "
        f"{int(float(rows[f'{region}_false_positive_cases']['mean']))} false positive"
        for region in REGIONS
        if not _is_missing(rows.get(f"{region}_missed_cases", {}).get("mean"))
        and not _is_missing(rows.get(f"{region}_false_positive_cases", {}).get("mean"))
    ]
    if counts:
        parts.append(f"Cases where a region is in only one of truth and prediction ({'; '.join(counts)}).")
    if _has_plan_grid(rows):
        parts.append(
            "The paper's numbers stand beside the plan-grid rows: it scored on KiTS19's interpolated "
            "3.0 x 0.7816 x 0.7816 mm labels; the other rows are scored on each scan's own grid."
        )
    return f'<p class="headline-note">{esc(" ".join(parts))}</p>' if parts else ""


def summary_full_table(summary: pd.DataFrame | None) -> str:
    """All rows of summary.csv."""
    if summary is None or summary.empty:
        return note("No summary metrics available.")
    return f'<table class="sortable summary">{_table_body(summary, "metric")}</table>'


def _table_body(df: pd.DataFrame, text_col: str, row_class: str | None = None) -> str:
    """<thead> and <tbody> of a sortable table; ``text_col`` holds text, ``row_class`` tags rows by it."""
    cols = list(df.columns)
    head = "".join(f'<th{" class=txt" if c == text_col else ""} data-col="{esc(c)}">{esc(c)}</th>' for c in cols)
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
    """Every case with every metric, flagged cases first; rows are <tr class="case-row" data-case=...>."""
    if per_case is None or per_case.empty or "case_id" not in per_case.columns:
        return note("No per-case metrics available (zero evaluated cases).")
    return (
        '<div class="scroll"><table class="sortable per-case">'
        f"{_table_body(flagged_first(per_case), 'case_id', 'case-row')}</table></div>"
        '<p class="muted">Click a column header to sort (missing values stay last). HD95 in mm, volumes in ml.</p>'
    )


QC_SHOWN: tuple[str, ...] = ("case_id", "qc_reasons", "uncertainty_entropy", "uncertainty_tk", "tk_dice", "tu_dice")


def quality_section(per_case: pd.DataFrame | None) -> str:
    """The cases the QC flags, each with its reasons (kidney_seg/quality.py), before the unflagged count."""
    if per_case is None or per_case.empty or "qc_flagged" not in per_case.columns:
        return note("No QC flags recorded.")
    ordered = flagged_first(per_case)
    shown = ordered[flagged(ordered)]
    counts = f"<p><b>{len(shown)}</b> of {len(per_case)} test case(s) flagged.</p>"
    if shown.empty:
        return counts
    table = shown[[c for c in QC_SHOWN if c in shown.columns]].fillna({"qc_reasons": ""})
    body = _table_body(table, "case_id", "qc-row")
    return f'{counts}<div class="scroll"><table class="sortable qc">{body}</table></div>'


# ---------------------------------------------------------------- training curves


def training_curves(history_csv) -> str:
    """Training-curve panels as embedded PNGs (one per fold given a list of histories), or a note."""
    paths = list(history_csv) if isinstance(history_csv, (list, tuple)) else [history_csv]
    parts = []
    for fold, path in enumerate(paths):
        heading = f"<h3>Fold {fold}</h3>" if len(paths) > 1 else ""
        history = read_csv_or_none(path)
        if history is None or history.empty:
            parts.append(heading + note(f"No training history available ({path})."))
            continue
        fig = history_figure(history)
        if fig is None:
            parts.append(heading + note("The training history holds no plottable columns."))
            continue
        parts.append(heading + img(png_data_uri(fig), f"Training curves{f' of fold {fold}' if len(paths) > 1 else ''}"))
    return "\n".join(parts) if parts else note("No training history available.")


# ---------------------------------------------------------------- post-processing


def _delta(before: object, after: object) -> str:
    """after - before with a sign, or a dash."""
    if _is_missing(before) or _is_missing(after):
        return DASH
    return f"{float(after) - float(before):+.4f}"


def postprocessing_section(decision_json: str | os.PathLike | None) -> str:
    """Post-processing decision: per step, validation Dice without and with it, the change, whether it was applied."""
    decision = None
    if decision_json is not None and Path(decision_json).is_file():
        try:
            decision = json.loads(Path(decision_json).read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            return note(f"Post-processing decision unreadable: {decision_json}: {exc}")
    if not decision or not isinstance(decision, dict):
        return note("No post-processing decision available.")
    applied = ", ".join(str(a) for a in decision.get("apply") or []) or "none"
    head = (
        f"<p>Applied to every prediction: <b>{esc(applied)}</b>. Decided on "
        f"{len(decision.get('validation_cases') or [])} validation case(s); a step is kept only when it raises "
        "its region's mean validation Dice without lowering the other region's. Settings "
        f"<code>{esc(json.dumps(decision.get('settings', {})))}</code>.</p>"
    )
    steps = decision.get("steps") or []
    if not steps:
        return head + note(str(decision.get("reason", "No step was evaluated.")))
    rows = "".join(
        f"<tr><td class=txt>{esc(st.get('name'))}</td><td class=txt>{esc(st.get('region'))}</td>"
        f"<td>{fmt(st.get('dice_before'), 4)}</td><td>{fmt(st.get('dice_after'), 4)}</td>"
        f"<td>{_delta(st.get('dice_before'), st.get('dice_after'))}</td>"
        f"<td class=txt>{esc(st.get('other_region'))}</td><td>{fmt(st.get('other_before'), 4)}</td>"
        f"<td>{fmt(st.get('other_after'), 4)}</td><td>{_delta(st.get('other_before'), st.get('other_after'))}</td>"
        f"<td class=txt>{'yes' if st.get('applied') else 'no'}</td></tr>"
        for st in steps
        if isinstance(st, dict)
    )
    return head + (
        '<table class="postprocessing"><thead><tr><th class=txt>Step</th><th class=txt>Region</th>'
        "<th>Val Dice without</th><th>Val Dice with</th><th>Change</th><th class=txt>Other region</th>"
        "<th>Its Dice without</th><th>Its Dice with</th><th>Change</th><th class=txt>Applied</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


# ---------------------------------------------------------------- failures

FAILURE_COLUMNS: tuple[str, ...] = ("case_id", "stage", "reason", "log")


def failures_section(failures_csv: str | os.PathLike | None) -> str:
    """Cases that failed (case_id, stage, reason, log) from a CSV, or 'No failures recorded.'"""
    if failures_csv is None or not Path(failures_csv).is_file():
        return note("No failures recorded.")
    df = read_csv_or_none(failures_csv, dtype=str, keep_default_na=False)
    if df is None:
        if Path(failures_csv).stat().st_size == 0:
            return note("No failures recorded.")
        return note(f"The failures file could not be read: {failures_csv}")
    if df.empty:
        return note("No failures recorded.")
    cols = list(FAILURE_COLUMNS) + [c for c in df.columns if c not in FAILURE_COLUMNS]
    head = "".join(f"<th class=txt>{esc(c)}</th>" for c in cols)
    body = "".join(
        f'<tr class="failure" data-case="{esc(r.get("case_id", ""))}">'
        + "".join(f"<td class=txt>{esc(r.get(c, '')) or DASH}</td>" for c in cols)
        + "</tr>"
        for r in df.to_dict("records")
    )
    n_cases = df["case_id"].nunique() if "case_id" in df.columns else len(df)
    return (
        f"<p><b>{len(df)}</b> failure(s) in {n_cases} case(s); these cases are missing from the results above.</p>"
        f'<div class="scroll"><table class="sortable failures"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


# ---------------------------------------------------------------- page


CONVENTIONS = (
    "TK Dice = Dice(pred > 0, truth > 0); TU Dice = Dice(pred == 2, truth == 2); KiTS19 composite = "
    "mean of the TK and TU Dice means. Empty masks (KiTS21/23 convention): both empty scores 1, "
    "exactly one empty scores 0; precision and recall likewise. HD95 (mm) is surface-distance's "
    "robust Hausdorff distance (95th percentile of surfel distances weighted by area, per direction, "
    "then the larger); it is undefined when exactly one mask is empty, such a case counts as missed "
    "or false positive, and the penalised HD95 scores it the scan's diagonal. Summaries skip NaN "
    "values; n counts the values used. Precision and recall are per class (kidney = label 1, tumour "
    "= label 2). Paper numbers are from its Table 1; its local test split differs from ours. "
    "A dash: no value (the paper and the winner report no distance metrics)."
)

SECTIONS: tuple[tuple[str, str], ...] = (
    ("headline", "Headline"),
    ("per-case", "Per-case metrics"),
    ("quality", "Quality control"),
    ("distributions", "Distributions"),
    ("overlays", "Overlays"),
    ("summary", "Summary statistics"),
    ("training", "Training curves"),
    ("postprocessing", "Post-processing"),
    ("failures", "Failures"),
    ("provenance", "Provenance"),
)


def _h2(anchor: str, title: str) -> str:
    return f'<h2 id="{anchor}">{esc(title)}</h2>'


def render_html(
    per_case: pd.DataFrame | None,
    summary: pd.DataFrame | None,
    history_csv,
    split_csv,
    config: dict,
    benchmark_files: list | None,
    postprocessing_json: str | os.PathLike | None = None,
    *,
    scans: Mapping | None = None,
    label_values: tuple[int, ...] = (0, 1, 2),
    environment_files: list | None = None,
    workflow_dir: str | os.PathLike | None = None,
    failures: str | os.PathLike | None = None,
    benchmark_root: str | os.PathLike | None = None,
    host_environment: dict | None = None,
) -> str:
    """The whole report page as an ASCII-safe HTML string."""
    title = f"kidney-seg report: 2D U-Net on {dataset_source(config)} data"
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in SECTIONS)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<nav>{nav}</nav>",
        _h2("headline", "Headline: test-set means"),
        headline_table(summary, dataset_source(config)),
        headline_note(summary, dataset_source(config)),
        f'<p class="muted">{esc(CONVENTIONS)}</p>',
        _h2("per-case", "Per-case metrics"),
        per_case_table(per_case),
        _h2("quality", "Quality control: cases to check"),
        quality_section(per_case),
        _h2("distributions", "Distributions of the per-case metrics"),
        distributions_section(per_case),
        _h2("overlays", "Overlays: best, median and worst test case"),
        overlays_section(per_case, scans, tuple(label_values)),
        _h2("summary", "Summary statistics"),
        summary_full_table(summary),
        _h2("training", "Training curves"),
        training_curves(history_csv),
        _h2("postprocessing", "Post-processing"),
        postprocessing_section(postprocessing_json),
        _h2("failures", "Failures"),
        failures_section(failures),
        _h2("provenance", "Provenance"),
        provenance_section(
            config,
            per_case,
            split_csv,
            benchmark_files,
            benchmark_root=benchmark_root,
            environment_files=environment_files,
            workflow_dir=workflow_dir,
            host_environment=host_environment,
        ),
        f"<script>{SORT_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts).encode("ascii", "xmlcharrefreplace").decode("ascii") + "\n"


def scans_by_case(case_ids: Sequence[str], paths: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """{case: (image, label, prediction)} from a flat list holding those three paths per case, in case order."""
    paths = [str(p) for p in paths]
    if len(paths) != 3 * len(case_ids):
        raise ValueError(
            f"expected 3 paths (image, label, prediction) per case for {len(case_ids)} cases, got {len(paths)}"
        )
    return {c: tuple(paths[3 * i : 3 * i + 3]) for i, c in enumerate(case_ids)}


def build_report(
    out_html: str | os.PathLike,
    per_case_csv: str | os.PathLike,
    summary_csv: str | os.PathLike,
    history_csv: str | os.PathLike | list | None,
    split_csv: str | os.PathLike | None,
    config: dict,
    benchmark_files: str | os.PathLike | list | None = None,
    postprocessing_json: str | os.PathLike | None = None,
    *,
    scans: Mapping | None = None,
    label_values: tuple[int, ...] = (0, 1, 2),
    environment_files: list | None = None,
    workflow_dir: str | os.PathLike | None = None,
    failures: str | os.PathLike | None = None,
) -> None:
    """Write the self-contained HTML report atomically.

    ``history_csv``: one history.csv or a list, one per fold. ``benchmark_files``: a
    folder (searched for ``*.tsv``; rule = first folder below it) or a list of TSV paths.
    ``scans``: test case id -> (CT image, label, prediction) paths for the overlays;
    ``label_values``: the dataset's valid labels. ``environment_files``: each fold's
    environment.json (read where present). ``workflow_dir``: the workflow's folder, for
    its git commit. ``failures``: a CSV with case_id, stage, reason, log (None or missing:
    no failures).
    """
    benchmark_files, root = benchmark_inputs(benchmark_files)
    page = render_html(
        read_csv_or_none(per_case_csv),
        read_csv_or_none(summary_csv),
        history_csv,
        split_csv,
        dict(config or {}),
        benchmark_files,
        postprocessing_json,
        scans=scans,
        label_values=tuple(label_values),
        environment_files=list(environment_files or []),
        workflow_dir=workflow_dir,
        failures=failures,
        benchmark_root=root,
    )
    write_text_atomic(out_html, page)
