"""Tests for kidney_seg.report: a self-contained HTML report from small synthetic inputs."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from kidney_seg import evaluation as ev
from kidney_seg.report import build_report
from kidney_seg.report import html as rh

CASES = ["case_00003", "case_00010", "case_00021"]


def _per_case_and_summary(tmp_path, with_nan: bool = True):
    rows = []
    for i, case in enumerate(CASES):
        row = {k: 0.1 * (i + 1) for k in ev.NUMERIC_METRICS}
        row.update(case_id=case, tk_dice=0.9 + 0.01 * i, tu_dice=0.2 * i, has_tumor=i > 0)
        rows.append(row)
    if with_nan:
        rows[0]["tumor_precision"] = float("nan")
    per_case = pd.DataFrame(rows)[["case_id", *ev.METRIC_COLUMNS]]
    per_case_csv = tmp_path / "per_case.csv"
    summary_csv = tmp_path / "summary.csv"
    per_case.to_csv(per_case_csv, index=False)
    ev.summary_table(per_case).to_csv(summary_csv, index=False)
    return per_case_csv, summary_csv


def _history(tmp_path):
    path = tmp_path / "history.csv"
    n = 8
    pd.DataFrame(
        {
            "epoch": np.arange(n),
            "lr": 1e-4 * 0.8 ** np.arange(n),
            "loss": np.linspace(1.5, 0.4, n),
            "val_loss": np.linspace(1.6, 0.6, n),
            "seconds": np.full(n, 12.5),
            "val_dice_kidney": np.linspace(0.2, 0.9, n),
            "val_dice_tumor": np.linspace(0.0, 0.4, n),
        }
    ).to_csv(path, index=False)
    return path


def _split(tmp_path):
    path = tmp_path / "split.csv"
    subsets = ["train"] * 8 + ["val"] + ["test"] * 3
    pd.DataFrame({"case_id": [f"case_{i:05d}" for i in range(12)], "subset": subsets}).to_csv(path, index=False)
    return path


def _benchmark(tmp_path):
    path = tmp_path / "benchmarks" / "train" / "model.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                    "3723.5\t1:02:03\t20480.25\t40960.5\t1\t1\t0\t0\t95.2\t3600\n")
    return path


CONFIG = {
    "dataset": {"source": "kits19", "note": "<script>alert(1)</script>"},
    "model": {"filters": 20, "levels": 6},
    "results_dir": "results/a&b",
}


def _build(tmp_path, **overrides):
    per_case_csv, summary_csv = _per_case_and_summary(tmp_path)
    kwargs = dict(
        out_html=tmp_path / "out" / "report.html",
        per_case_csv=per_case_csv,
        summary_csv=summary_csv,
        history_csv=_history(tmp_path),
        split_csv=_split(tmp_path),
        config=CONFIG,
        benchmark_files=[_benchmark(tmp_path)],
    )
    kwargs.update(overrides)
    build_report(**kwargs)
    return kwargs["out_html"].read_text()


def test_report_content(tmp_path):
    page = _build(tmp_path)
    rows = re.findall(r'<tr class="case-row" data-case="([^"]+)">', page)
    assert rows == CASES
    for case in CASES:
        assert case in page
    # paper numbers and the winner's
    for number in ("0.910", "0.250", "0.914", "0.334", "0.883", "0.238", "0.858", "0.224", "0.974", "0.851", "0.912"):
        assert number in page, number
    assert rh.PAPER_LOCAL_TEST["tk_dice"] == 0.91 and rh.PAPER_LOCAL_TEST["tu_dice"] == 0.25
    # this run's TK Dice mean (0.9, 0.91, 0.92) -> 0.910, TU mean (0, .2, .4) -> 0.200
    headline = page.split('<table class="headline">')[1].split("</table>")[0]
    assert "<b>0.910</b>" in headline and "<b>0.200</b>" in headline
    # embedded images only
    assert "data:image/png;base64," in page
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, flags=re.I)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "@import" not in page
    # escaped config and provenance
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "results/a&amp;b" in page
    assert "kits19" in page
    assert "train/model" in page and "3723.5" in page and "20480.2" in page
    assert re.search(r"<td class=txt>train</td><td>8</td>", page)
    assert re.search(r"<td class=txt>test</td><td>3</td>", page)
    import kidney_seg

    assert kidney_seg.__version__ in page
    page.encode("ascii")  # ASCII-safe output


def test_report_images_are_valid_png(tmp_path):
    page = _build(tmp_path)
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) >= 2  # per-case Dice and training curves
    for data in uris:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_inline_scripts(tmp_path):
    page = _build(tmp_path)
    scripts = re.findall(r"<script([^>]*)>", page)
    assert scripts == [""]  # one inline script, no src


def test_missing_history_still_produces_report(tmp_path):
    page = _build(tmp_path, history_csv=tmp_path / "does_not_exist.csv", benchmark_files=None)
    assert "No training history available" in page
    assert len(re.findall(r'class="case-row"', page)) == len(CASES)
    assert "No benchmark files given" in page


def test_empty_history_and_missing_split(tmp_path):
    empty = tmp_path / "empty_history.csv"
    empty.write_text("epoch,lr,loss,val_loss,seconds\n")
    page = _build(tmp_path, history_csv=empty, split_csv=tmp_path / "nope.csv")
    assert "No training history available" in page
    assert "No split available" in page


def test_all_nan_metrics_and_zero_cases(tmp_path):
    per_case_csv = tmp_path / "per_case.csv"
    pd.DataFrame(columns=["case_id", *ev.METRIC_COLUMNS]).to_csv(per_case_csv, index=False)
    summary_csv = tmp_path / "summary.csv"
    pd.DataFrame(
        [{"metric": m, "n": 0, "mean": np.nan, "median": np.nan, "std": np.nan, "min": np.nan, "max": np.nan}
         for m in ev.NUMERIC_METRICS]
    ).to_csv(summary_csv, index=False)
    out = tmp_path / "r.html"
    build_report(out, per_case_csv, summary_csv, None, None, {}, None)
    page = out.read_text()
    assert 'class="case-row"' not in page
    assert "zero evaluated cases" in page
    assert "&mdash;" in page
    assert "0.910" in page  # the paper column is still there


def test_nan_cell_renders_dash(tmp_path):
    page = _build(tmp_path)
    first = re.search(r'<tr class="case-row" data-case="case_00003">(.*?)</tr>', page).group(1)
    assert "&mdash;" in first  # tumor_precision NaN
    assert "nan" not in first.lower()


def test_hostile_case_id_is_escaped(tmp_path):
    per_case_csv, summary_csv = _per_case_and_summary(tmp_path)
    df = pd.read_csv(per_case_csv)
    df.loc[0, "case_id"] = '"><img src=x onerror=alert(1)>'
    df.to_csv(per_case_csv, index=False)
    out = tmp_path / "r.html"
    build_report(out, per_case_csv, summary_csv, None, None, CONFIG)
    page = out.read_text()
    assert "<img src=x" not in page
    assert 'data-case="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"' in page


@pytest.mark.parametrize("bad", ["", "not\ta\tbenchmark\n"])
def test_odd_benchmark_files_do_not_fail(tmp_path, bad):
    path = tmp_path / "bench" / "odd.tsv"
    path.parent.mkdir()
    path.write_text(bad)
    page = _build(tmp_path, benchmark_files=[path, tmp_path / "missing.tsv"])
    assert "bench/odd" in page
