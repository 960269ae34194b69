"""Tests for kidney_seg.report: a self-contained HTML report from small synthetic inputs."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from kidney_seg import evaluation as ev
from kidney_seg.report import build_report
from kidney_seg.report import figures as rdist
from kidney_seg.report import html as rh
from kidney_seg.report import overlays as roverlays
from kidney_seg.report.common import read_csv_or_none
from kidney_seg.report.provenance import benchmark_inputs, provenance_section
from tests.conftest import kits_affine, write_nifti

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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        "3723.5\t1:02:03\t20480.25\t40960.5\t1\t1\t0\t0\t95.2\t3600\n"
    )
    return path


CONFIG = {
    "dataset": {"source": "kits19", "note": "<script>alert(1)</script>"},
    "model": {"filters": 20, "levels": 6},
    "results_dir": "results/a&b",
}


def _inputs(tmp_path, **overrides) -> dict:
    """build_report's arguments for the default synthetic inputs, with these overrides."""
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
    return kwargs


def _build(tmp_path, **overrides):
    """The whole report page of :func:`_inputs`."""
    kwargs = _inputs(tmp_path, **overrides)
    build_report(**kwargs)
    return kwargs["out_html"].read_text()


def _provenance(kwargs: dict) -> str:
    """The provenance section of build_report's arguments, rendered alone (no figures drawn)."""
    benchmark_files, root = benchmark_inputs(kwargs.get("benchmark_files"))
    return provenance_section(
        kwargs["config"],
        read_csv_or_none(kwargs["per_case_csv"]),
        kwargs["split_csv"],
        benchmark_files,
        benchmark_root=root,
        environment_files=list(kwargs.get("environment_files") or []),
        workflow_dir=kwargs.get("workflow_dir"),
    )


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    """The report of the default synthetic inputs (``_build``), built once for the checks that only read it."""
    return _build(tmp_path_factory.mktemp("report"))


def test_report_content(page):
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


def test_report_images_are_valid_png(page):
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) >= 2  # per-case Dice and training curves
    for data in uris:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_inline_scripts(page):
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
    assert "No training history available" in rh.training_curves(empty)
    assert "No split available" in _provenance(_inputs(tmp_path, split_csv=tmp_path / "nope.csv"))


def test_all_nan_metrics_and_zero_cases(tmp_path):
    per_case_csv = tmp_path / "per_case.csv"
    pd.DataFrame(columns=["case_id", *ev.METRIC_COLUMNS]).to_csv(per_case_csv, index=False)
    summary_csv = tmp_path / "summary.csv"
    pd.DataFrame(
        [
            {"metric": m, "n": 0, "mean": np.nan, "median": np.nan, "std": np.nan, "min": np.nan, "max": np.nan}
            for m in ev.NUMERIC_METRICS
        ]
    ).to_csv(summary_csv, index=False)
    out = tmp_path / "r.html"
    build_report(out, per_case_csv, summary_csv, None, None, {}, None)
    page = out.read_text()
    assert 'class="case-row"' not in page
    assert "zero evaluated cases" in page
    assert "&mdash;" in page
    assert "0.910" in page  # the paper column is still there


def test_nan_cell_renders_dash(page):
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
    assert "bench/odd" in _provenance(_inputs(tmp_path, benchmark_files=[path, tmp_path / "missing.tsv"]))


# ---------------------------------------------------------------- every section from synthetic scans

SPACING = (3.0, 0.8, 0.75)  # internal (I, P, L) mm
SHAPE = (12, 64, 80)
#: case -> (tumour centre slice or None, prediction shift in columns, predicted false tumour)
SCAN_CASES = {
    "case_00003": (None, 0, True),  # no tumour; a false tumour is predicted: TU Dice 0, TU HD95 NaN
    "case_00010": (3, 0, False),  # perfect: best by TU Dice
    "case_00021": (8, 1, False),  # median
    "case_00034": (4, 3, False),  # worst among the cases with a tumour
}
KIDNEY_CENTRE_SLICE = 6


def _volumes(tumour_slice, shift, false_tumour, rng):
    """CT (HU), truth and prediction in the internal layout."""
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    truth = np.zeros(SHAPE, np.uint8)
    for cx in (20, 58):  # two kidneys, widest at KIDNEY_CENTRE_SLICE
        truth[((z - KIDNEY_CENTRE_SLICE) / 5.5) ** 2 + ((y - 34) / 14) ** 2 + ((x - cx) / 10) ** 2 < 1] = 1
    if tumour_slice is not None:  # inside the right-hand kidney, widest at tumour_slice
        truth[((z - tumour_slice) / 1.6) ** 2 + ((y - 34) / 6) ** 2 + ((x - 58) / 5) ** 2 < 1] = 2
    pred = np.roll(truth, shift, axis=2)
    if false_tumour:
        pred[5:7, 30:33, 18:21] = 2
    ct = rng.normal(40, 25, SHAPE).astype(np.float32)
    ct[truth == 1] += 120
    ct[truth == 2] += 60
    return ct, truth, pred


def make_scans(tmp_path):
    """Synthetic scans written as KiTS-like NIfTI files; (scans dict, per-case DataFrame, expected slices)."""
    rng = np.random.default_rng(0)
    affine = kits_affine(SPACING)  # (I, P, L) file layout = the internal layout
    scans, rows, slices = {}, [], {}
    for case, (tumour_slice, shift, false_tumour) in SCAN_CASES.items():
        ct, truth, pred = _volumes(tumour_slice, shift, false_tumour, rng)
        scans[case] = (
            write_nifti(tmp_path / "data" / case / "imaging.nii.gz", ct, affine),
            write_nifti(tmp_path / "data" / case / "segmentation.nii.gz", truth, affine),
            write_nifti(tmp_path / "predictions" / f"{case}.nii.gz", pred, affine),
        )
        rows.append({"case_id": case, **ev.case_metrics(pred, truth, SPACING)})
        slices[case] = KIDNEY_CENTRE_SLICE if tumour_slice is None else tumour_slice
    per_case = pd.DataFrame(rows)[["case_id", *ev.METRIC_COLUMNS]]
    return scans, per_case, slices


def write_environment_json(path, **overrides):
    """A training environment.json as kidney_seg.environment writes it, with a GPU."""
    env = {
        "hostname": "gpu-node-7",
        "cpu_model": "Test CPU <Xeon> & co",
        "cpu_count": 32,
        "cpus_usable": 16,
        "memory_gb": 251.5,
        "python": "CPython 3.11.9",
        "platform": "Linux-test",
        "keras_backend": "jax",
        "packages": {"keras": "3.99.0-test", "jax": "0.4.99-test", "numpy": "2.0.0"},
        "accelerators": [{"name": "NVIDIA H200", "kind": "GPU", "id": "0"}],
    }
    env.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(env))
    return path


def full_inputs(tmp_path):
    """build_report keyword arguments that exercise every section (overlays, failures, provenance included)."""
    scans, per_case, _ = make_scans(tmp_path)
    per_case_csv, summary_csv = tmp_path / "per_case.csv", tmp_path / "summary.csv"
    per_case.to_csv(per_case_csv, index=False)
    ev.summary_table(per_case).to_csv(summary_csv, index=False)
    results = tmp_path / "results"
    bench = results / "benchmarks"
    for rel, s in (("train/fold_0.tsv", 100.0), ("train/fold_1.tsv", 50.5), ("evaluate.tsv", 2.0)):
        (bench / rel).parent.mkdir(parents=True, exist_ok=True)
        (bench / rel).write_text(
            "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
            f"{s}\t0:00:{int(s) % 60:02d}\t{s * 10}\t{s * 20}\t1\t1\t0\t0\t95.2\t{s}\n"
        )
    decision = results / "model" / "postprocessing.json"
    decision.parent.mkdir(parents=True, exist_ok=True)
    decision.write_text(
        json.dumps(
            {
                "enabled": True,
                "settings": {"keep_largest": 2},
                "validation_cases": ["case_00001"],
                "apply": ["foreground"],
                "steps": [
                    {
                        "name": "foreground",
                        "region": "tk",
                        "dice_before": 0.80,
                        "dice_after": 0.85,
                        "other_region": "tu",
                        "other_before": 0.30,
                        "other_after": 0.30,
                        "applied": True,
                    }
                ],
            }
        )
    )
    failures = tmp_path / "failures.csv"
    pd.DataFrame(
        [
            {
                "case_id": "case_00099",
                "stage": "preprocess",
                "reason": "corrupt gzip <b>stream</b> & more",
                "log": "logs/preprocess/case_00099.log",
            }
        ]
    ).to_csv(failures, index=False)
    env0 = write_environment_json(results / "model" / "fold_0" / "environment.json")
    return dict(
        out_html=tmp_path / "out" / "report.html",
        per_case_csv=per_case_csv,
        summary_csv=summary_csv,
        history_csv=[_history(tmp_path)],
        split_csv=_split(tmp_path),
        config=CONFIG,
        benchmark_files=bench,
        postprocessing_json=decision,
        scans=scans,
        environment_files=[env0, results / "model" / "fold_1" / "environment.json"],
        workflow_dir=tmp_path,
        failures=failures,
    )


#: URLs in the config (they must stay text of the config block) and non-ASCII text (it must be escaped).
URL = "https://mirror.example.org/kits19?a=1&b=2"
FULL_CONFIG = {
    **CONFIG,
    "dataset": {"source": "kits19", "kits_imaging_url": URL, "kits_labels_url": "http://x.test/"},
    "note": "Z\u00fcrich \u2013 \u2713",
}
UNICODE_CASE = "case_\u00e9\u4e2d"  # the per-case table's first case (case_00003, no tumour) under this id


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[dict, str]:
    """(build_report arguments, page) of ``full_inputs`` with FULL_CONFIG and UNICODE_CASE, built once for the
    checks that only read it."""
    kwargs = full_inputs(tmp_path_factory.mktemp("full_report"))
    df = pd.read_csv(kwargs["per_case_csv"])
    assert df.loc[0, "case_id"] == "case_00003"
    df.loc[0, "case_id"] = UNICODE_CASE
    df.to_csv(kwargs["per_case_csv"], index=False)
    kwargs["config"] = FULL_CONFIG
    build_report(**kwargs)
    return kwargs, kwargs["out_html"].read_text()


def _pngs(fragment):
    return [base64.b64decode(d) for d in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', fragment)]


def _section(page, anchor):
    """The HTML between <h2 id=anchor> and the next <h2>."""
    return page.split(f'<h2 id="{anchor}">', 1)[1].split("<h2 ", 1)[0]


# ---- headline


def test_headline_shows_distance_rows_without_paper_values(page):
    headline = page.split('<table class="headline">')[1].split("</table>")[0]
    for key in ("tk_hd95", "tu_hd95", "tk_surface_dice", "tu_surface_dice"):
        row = re.search(rf'<tr data-metric="{key}">(.*?)</tr>', headline).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert cells[1] != "<b>&mdash;</b>", key  # this run's mean is shown
        assert cells[4:] == ["&mdash;"] * 3, key  # paper, leaderboard and winner report none
    assert "masses_dice" not in headline and "kits23_composite" not in headline  # 3-class data


def test_headline_shows_4class_rows(tmp_path):
    per_case_csv, _ = _per_case_and_summary(tmp_path)
    df = pd.read_csv(per_case_csv)
    for col in ev.CYST_COLUMNS:
        df[col] = 0.5
    headline = rh.headline_table(ev.summary_table(df), "kits19")
    for key in ("masses_dice", "masses_hd95", "masses_surface_dice", "kits_hec_dice", "kits_hec_surface_dice"):
        assert f'<tr data-metric="{key}">' in headline, key
    assert re.search(r'<tr data-metric="masses_dice"><td class=txt>[^<]*</td><td><b>0.500</b>', headline)


# ---- distributions


def test_distribution_plot_for_every_metric_with_nan_counts(page):
    # tumor_precision is NaN for one of the three cases
    section = _section(page, "distributions")
    plotted = set()
    for unit, metrics in re.findall(r'<figure class="dist" data-unit="([^"]+)" data-metrics="([^"]*)">', section):
        for m in metrics.split():
            assert rdist.metric_unit(m) == unit, m
            plotted.add(m)
    assert plotted == set(ev.NUMERIC_METRICS)  # every numeric per-case metric, has_tumor is not one
    assert {"tk_dice", "tumor_precision", "tk_surface_dice"} <= set(
        re.search(r'data-unit="score" data-metrics="([^"]*)"', section).group(1).split()
    )
    assert re.search(r'data-unit="mm" data-metrics="tk_hd95 tu_hd95"', section)
    assert 'data-unit="ml-scatter"' in section  # predicted vs true volume
    assert '<tr data-metric="tumor_precision" data-plotted="2" data-skipped="1">' in section
    assert '<tr data-metric="tk_dice" data-plotted="3" data-skipped="0">' in section
    assert "tumor_precision: 1 of 3" in section
    pngs = _pngs(section)
    assert len(pngs) == 4 and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_distribution_values_skip_nan_and_count_them():
    df = pd.DataFrame(
        {
            "case_id": ["a", "b", "c", "d"],
            "tu_hd95": [1.0, np.nan, 3.0, np.inf],
            "has_tumor": [True, False, True, True],
            "note": ["x", "y", "z", "w"],
        }
    )
    values, rows, skipped = rdist.metric_values(df, "tu_hd95")
    assert values.tolist() == [1.0, 3.0] and rows.tolist() == [0, 2] and skipped == 2
    assert rdist.numeric_metric_columns(df) == ["tu_hd95"]  # ids, flags and text are not metrics
    assert [
        rdist.metric_unit(m)
        for m in ("tk_dice", "kidney_recall", "masses_surface_dice", "tu_hd95", "pred_cyst_ml", "seconds")
    ] == ["score", "score", "score", "mm", "ml", "other"]


def test_all_nan_metric_is_stated(tmp_path):
    per_case_csv, _ = _per_case_and_summary(tmp_path)
    df = pd.read_csv(per_case_csv)
    df["tu_hd95"] = np.nan
    section = rdist.distributions_section(df)
    assert '<tr data-metric="tu_hd95" data-plotted="0" data-skipped="3">' in section
    assert "tu_hd95: 3 of 3" in section


# ---- overlays


def test_pick_cases_ranks_tumour_cases_by_tu_dice():
    df = pd.DataFrame(
        {
            "case_id": ["c_free", "c_a", "c_b", "c_c", "c_d", "c_e", "c_nan"],
            "tu_dice": [1.0, 0.9, 0.2, 0.5, 0.7, 0.05, np.nan],
            "tk_dice": [0.99, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            "has_tumor": [False, True, True, True, True, True, True],
        }
    )
    picks, metric = roverlays.pick_cases(df)
    assert metric == "tu_dice"
    # c_free (tumour-free, TU Dice 1.0) and c_nan are not ranked; order 0.9, 0.7, 0.5, 0.2, 0.05
    assert [(p["case_id"], p["roles"]) for p in picks] == [("c_a", ["best"]), ("c_c", ["median"]), ("c_e", ["worst"])]
    assert picks[1]["value"] == 0.5


def test_pick_cases_falls_back_to_tk_dice_without_tumours():
    df = pd.DataFrame(
        {
            "case_id": ["x", "y", "z", "w"],
            "tu_dice": [1.0, 1.0, 0.0, 1.0],
            "tk_dice": [0.5, 0.9, 0.7, 0.7],
            "has_tumor": [False] * 4,
        }
    )
    picks, metric = roverlays.pick_cases(df)
    assert metric == "tk_dice"
    # 0.9 y; ties at 0.7 by case id: w before z; then 0.5 x. Median of 4 = the better middle one.
    assert [(p["case_id"], p["roles"]) for p in picks] == [("y", ["best"]), ("w", ["median"]), ("x", ["worst"])]


def test_pick_cases_merges_roles_with_few_cases():
    one = pd.DataFrame({"case_id": ["only"], "tu_dice": [0.3], "tk_dice": [0.8], "has_tumor": [True]})
    assert [(p["case_id"], p["roles"]) for p in roverlays.pick_cases(one)[0]] == [("only", ["best", "median", "worst"])]
    two = pd.DataFrame({"case_id": ["p", "q"], "tu_dice": [0.3, 0.6], "tk_dice": [0.8, 0.8], "has_tumor": [True, True]})
    assert [(p["case_id"], p["roles"]) for p in roverlays.pick_cases(two)[0]] == [
        ("q", ["best", "median"]),
        ("p", ["worst"]),
    ]
    assert roverlays.pick_cases(None) == ([], None)
    assert roverlays.pick_cases(pd.DataFrame(columns=["case_id", "tu_dice"])) == ([], None)


def test_choose_slice_largest_tumour_then_largest_foreground():
    label = np.zeros((6, 10, 10), np.uint8)
    label[1, :8, :8] = 1  # the largest kidney cross-section
    label[2, :3, :3] = 2  # tumour area 9
    label[4, :4, :4] = 2  # tumour area 16: the largest
    label[5, :4, :4] = 2  # a tie: the first one wins
    assert roverlays.choose_slice(label)[0] == 4
    assert "tumour" in roverlays.choose_slice(label)[1]
    label[label == 2] = 1
    assert roverlays.choose_slice(label)[0] == 1  # no tumour: largest kidney + tumour
    assert roverlays.choose_slice(np.zeros((7, 4, 4), np.uint8))[0] == 3  # empty: middle
    with pytest.raises(ValueError):
        roverlays.choose_slice(np.zeros((4, 4), np.uint8))


def test_overlays_show_best_median_worst_at_the_largest_tumour_slice(full_report, tmp_path):
    section = _section(full_report[1], "overlays")
    figures = re.findall(
        r'<figure class="overlay" data-case="([^"]+)" data-roles="([^"]+)" data-slice="(\d+)"', section
    )
    # case_00003 (UNICODE_CASE in the table) has no tumour, TU Dice 0: by TU Dice over the tumour cases not ranked
    assert [(c, r) for c, r, _ in figures] == [
        ("case_00010", "best"),
        ("case_00021", "median"),
        ("case_00034", "worst"),
    ]
    _, per_case, slices = make_scans(tmp_path / "again")
    assert {c: int(s) for c, _, s in figures} == {c: slices[c] for c, _, _ in figures}
    pngs = _pngs(section)
    assert len(pngs) == 3
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 150_000
    tk = per_case.set_index("case_id").loc["case_00034", "tk_dice"]
    assert f"case_00034 (worst): TK Dice {tk:.3f}, TU Dice" in section


def test_overlay_uses_the_largest_kidney_slice_when_no_case_has_a_tumour(tmp_path):
    kwargs = full_inputs(tmp_path)
    df = pd.read_csv(kwargs["per_case_csv"])
    df = df[df["case_id"] == "case_00003"]  # the only case: no tumour
    section = roverlays.overlays_section(df, kwargs["scans"])
    assert "TK Dice (no test case has a tumour)" in section
    assert re.search(
        rf'data-case="case_00003" data-roles="best median worst" data-slice="{KIDNEY_CENTRE_SLICE}"', section
    )


def test_overlay_png_stays_small_for_a_full_noisy_slice():
    rng = np.random.default_rng(1)
    ct = rng.normal(0, 300, (512, 512)).astype(np.float32)
    truth = np.zeros((512, 512), np.uint8)
    truth[100:400, 80:450] = 1
    truth[200:260, 300:380] = 2
    pred = np.roll(truth, 7, axis=1)
    fig = roverlays.overlay_figure(ct, truth, pred, (0.7, 0.7), "case_00000 (best): TK Dice 0.9, TU Dice 0.8")
    png = roverlays.small_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 150_000


def test_overlay_aspect_follows_the_voxel_spacing():
    ct = np.zeros((40, 40), np.float32)
    truth = np.zeros((40, 40), np.uint8)
    fig = roverlays.overlay_figure(ct, truth, truth, (2.0, 0.5), "t")
    assert fig.axes[0].get_aspect() == pytest.approx(4.0)


def test_missing_or_unreadable_scan_gives_a_note(tmp_path):
    kwargs = full_inputs(tmp_path)
    scans = dict(kwargs["scans"])
    missing = tmp_path / "nowhere" / "imaging.nii.gz"
    scans["case_00010"] = (missing, *scans["case_00010"][1:])
    broken = scans["case_00034"][2]
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated prediction
    section = roverlays.overlays_section(pd.read_csv(kwargs["per_case_csv"]), scans)
    notes = re.findall(r'<p class="note">(.*?)</p>', section)
    assert any("case_00010" in n and str(missing) in n for n in notes), notes
    assert any("case_00034" in n and str(broken) in n for n in notes), notes
    assert re.findall(r'<figure class="overlay" data-case="([^"]+)"', section) == ["case_00021"]  # the good one


def test_no_scans_gives_a_note(page):
    assert "No scans were given for the overlays." in _section(page, "overlays")


# ---- provenance


def _git_repo(path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    path.mkdir(parents=True, exist_ok=True)
    run = lambda *a: subprocess.run(
        [
            git,
            "-C",
            str(path),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",  # noqa: E731
            "-c",
            "commit.gpgsign=false",
            *a,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (path / "Snakefile").write_text("rule all:\n")
    run("init", "-q")
    run("add", "Snakefile")
    run("commit", "-q", "-m", "init")
    return run("rev-parse", "HEAD").stdout.strip()


def test_provenance_shows_commit_versions_and_hardware(tmp_path):
    commit = _git_repo(tmp_path / "wf")
    kwargs = {**full_inputs(tmp_path), "workflow_dir": tmp_path / "wf"}
    prov = _provenance(kwargs)
    assert f'data-commit="{commit}" data-dirty="false"' in prov and "<b>clean</b>" in prov
    (tmp_path / "wf" / "Snakefile").write_text("rule all:\n    input: []\n")
    prov = _provenance(kwargs)
    assert f'data-commit="{commit}" data-dirty="true"' in prov and "modified" in prov
    # training hardware from fold_0/environment.json; fold 1 has none
    fold0 = re.search(r'<tr data-role="training, fold 0">(.*?)</tr>', prov).group(1)
    assert "NVIDIA H200" in fold0 and "gpu-node-7" in fold0 and "Test CPU &lt;Xeon&gt; &amp; co" in fold0
    assert "32 (16 usable)" in fold0 and "jax" in fold0
    assert "not recorded" in re.search(r'<tr data-role="training, fold 1">(.*?)</tr>', prov).group(1)
    host = re.search(r'<tr data-role="report host">(.*?)</tr>', prov).group(1)
    assert "not queried" in host  # the report host's accelerators are not probed
    # package versions: the training fold's and this host's
    numpy_row = re.search(r'<tr data-package="numpy">(.*?)</tr>', prov).group(1)
    assert np.__version__ in numpy_row and "2.0.0" in numpy_row
    assert "3.99.0-test" in re.search(r'<tr data-package="keras">(.*?)</tr>', prov).group(1)
    # data source, case count, split, per-rule run time
    assert "<code>kits19</code>" in prov and "Labelled cases in the split: 12" in prov


def test_provenance_without_git_or_environment(page, tmp_path):
    # the shared page has no workflow_dir and no environment files
    prov = _section(page, "provenance")
    assert "Workflow git commit: not recorded" in prov
    assert "No training environment recorded" in prov
    bad = tmp_path / "model" / "fold_0" / "environment.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    prov = _provenance(_inputs(tmp_path, environment_files=[bad], workflow_dir=tmp_path / "nope"))
    assert "unreadable" in re.search(r'<tr data-role="training, fold 0">(.*?)</tr>', prov).group(1)
    assert "is not a git work tree" in prov


def test_benchmarks_are_aggregated_per_rule(full_report):
    prov = _section(full_report[1], "provenance")
    train = re.search(r'<tr data-rule="train">(.*?)</tr>', prov).group(1)
    assert re.findall(r"<td>([^<]*)</td>", train) == ["2", "150.5", "100.0", "1000.0"]  # jobs, total, max s, max RSS
    evaluate = re.search(r'<tr data-rule="evaluate">(.*?)</tr>', prov).group(1)
    assert re.findall(r"<td>([^<]*)</td>", evaluate) == ["1", "2.0", "2.0", "20.0"]
    assert "train/fold_1" in prov  # the per-job table


# ---- failures


def test_failures_are_rendered_and_escaped(full_report):
    page = full_report[1]
    section = _section(page, "failures")
    row = re.search(r'<tr class="failure" data-case="case_00099">(.*?)</tr>', section).group(1)
    assert re.findall(r"<td class=txt>(.*?)</td>", row) == [
        "case_00099",
        "preprocess",
        "corrupt gzip &lt;b&gt;stream&lt;/b&gt; &amp; more",
        "logs/preprocess/case_00099.log",
    ]
    assert "<b>stream</b>" not in page


@pytest.mark.parametrize("kind", ["none", "missing", "header_only"])
def test_no_failures(tmp_path, kind):
    path = {"none": None, "missing": tmp_path / "absent.csv", "header_only": tmp_path / "f.csv"}[kind]
    if kind == "header_only":
        path.write_text("case_id,stage,reason,log\n")
    section = rh.failures_section(path)
    assert "No failures recorded." in section and "<table" not in section


def test_hostile_failure_case_id(tmp_path):
    failures = tmp_path / "failures.csv"
    pd.DataFrame([{"case_id": '"><script>alert(1)</script>', "stage": "train", "reason": "x", "log": ""}]).to_csv(
        failures, index=False
    )
    section = rh.failures_section(failures)
    assert "<script>alert(1)</script>" not in section
    assert 'data-case="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in section


# ---- self-contained and ASCII


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_page_is_self_contained_even_with_urls_in_the_config(full_report):
    page = full_report[1]  # its config holds URLs
    # the URLs appear once, as escaped text of the config block, and nowhere else
    config_block = re.search(r'<pre class="config">(.*?)</pre>', page, flags=re.S).group(1)
    assert html.escape(URL) in config_block and "http://x.test/" in config_block
    rest = page.replace(config_block, "")
    for needle in ("http://", "https://", 'src="//', "src='//", "<link", "@import", "url("):
        assert needle not in rest, needle
    parser = _Tags()
    parser.feed(page)
    for tag, attrs in parser.tags:
        assert "src" not in attrs or attrs["src"].startswith("data:image/png;base64,"), (tag, attrs)
        assert "href" not in attrs or attrs["href"].startswith("#"), (tag, attrs)
        assert not (tag == "script" and "src" in attrs)
    assert sum(tag == "img" for tag, _ in parser.tags) >= 3 + 4 + 1  # overlays, distributions, curves
    csp = [a for t, a in parser.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert len(csp) == 1
    directives = dict(d.strip().split(None, 1) for d in csp[0]["content"].split(";") if d.strip())
    assert directives["default-src"] == "'none'" and directives["img-src"] == "data:"  # the page may load nothing
    assert not re.search(r"https?:|\*|'self'", csp[0]["content"])


def test_page_is_ascii_safe(full_report):
    kwargs = full_report[0]  # a case id and the config with non-ASCII text
    assert pd.read_csv(kwargs["per_case_csv"])["case_id"][0] == UNICODE_CASE and "\u00fc" in kwargs["config"]["note"]
    raw = kwargs["out_html"].read_bytes()
    raw.decode("ascii")  # raises on any non-ASCII byte
    page = raw.decode("ascii")
    assert "case_&#233;&#20013;" in page and "Z&#252;rich" in page


def test_scans_by_case_groups_three_paths_per_case():
    from kidney_seg.report import scans_by_case

    flat = ["a/img", "a/lab", "a/pred", "b/img", "b/lab", "b/pred"]
    assert scans_by_case(["case_a", "case_b"], flat) == {
        "case_a": ("a/img", "a/lab", "a/pred"),
        "case_b": ("b/img", "b/lab", "b/pred"),
    }
    assert scans_by_case([], []) == {}
    with pytest.raises(ValueError, match="3 paths"):
        scans_by_case(["case_a"], flat)


def test_write_overlay_png_extracts_the_chosen_overlay_of_a_report(full_report, tmp_path):
    section = _section(full_report[1], "overlays")
    report = full_report[0]["out_html"]
    out = tmp_path / "docs" / "overlay.png"
    size = roverlays.write_overlay_png(report, out, "median")
    assert out.read_bytes() == _pngs(section)[1] and size == out.stat().st_size  # best, median, worst order
    assert roverlays.extract_overlay(report, "worst") == _pngs(section)[2]
    with pytest.raises(ValueError, match="no nobody overlay"):
        roverlays.extract_overlay(report, "nobody")


# ---- headline: definitions, misses and the paper's grid (issue 12)


def _scored_summary(plan_grid: bool = False) -> pd.DataFrame:
    """A summary of three real case_metrics records: a good case, a missed tumour, a false-positive tumour."""
    truth = np.zeros((6, 12, 12), np.uint8)
    truth[1:5, 2:10, 2:10] = 1
    truth[2:4, 4:7, 4:7] = 2
    missed = np.where(truth == 2, 1, truth).astype(np.uint8)
    fp = missed.copy()
    fp[3, 8, 8] = 2
    pairs = {
        "case_00001": (np.roll(truth, 1, axis=2), truth),
        "case_00002": (missed, truth),
        "case_00003": (fp, missed),
    }
    rows = []
    for case, (pred, true) in pairs.items():
        row = {"case_id": case, **ev.case_metrics(pred, true, (3.0, 0.8, 0.8))}
        if plan_grid:
            row.update({f"plan_grid_{k}": v for k, v in ev.case_metrics(pred, true, (3.0, 0.7816, 0.7816)).items()})
        rows.append(row)
    return ev.summary_table(pd.DataFrame(rows))


def _headline_row(headline: str, key: str) -> list[str]:
    row = re.search(rf'<tr data-metric="{key}">(.*?)</tr>', headline).group(1)
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


@pytest.mark.parametrize(("source", "challenge"), [("kits19", "KiTS23"), ("kits21", "KiTS21"), ("phantom", "KiTS23")])
def test_headline_names_the_surface_dice_definition_and_tolerances(source, challenge):
    summary = _scored_summary()
    headline = rh.headline_table(summary, source)
    assert _headline_row(headline, "tk_surface_dice")[0] == (
        f"TK surface Dice at 1.0331 mm ({challenge} tolerance, surface-distance)"
    )
    assert _headline_row(headline, "tu_surface_dice")[0].startswith("TU surface Dice at 1.1498 mm")
    note = rh.headline_note(summary, source)
    assert f"{challenge} tolerances 1.0331 / 1.1329 / 1.1498 mm" in note and "surface-distance" in note
    assert "tolerances unknown" in _headline_row(rh.headline_table(summary, None), "tk_surface_dice")[0]


def test_headline_shows_miss_counts_and_penalised_hd95():
    summary = _scored_summary()
    headline = rh.headline_table(summary, "kits19")
    assert _headline_row(headline, "tu_missed_cases")[1:4] == ["<b>1</b>", "&mdash;", "3"]
    assert _headline_row(headline, "tu_false_positive_cases")[1] == "<b>1</b>"
    assert _headline_row(headline, "tk_missed_cases")[1] == "<b>0</b>"
    assert _headline_row(headline, "tu_hd95")[3] == "1"  # only the good case has both masks
    assert _headline_row(headline, "tu_penalised_hd95")[3] == "3"
    keys = re.findall(r'<tr data-metric="([^"]+)">', headline)
    assert keys.index("tu_hd95") < keys.index("tk_penalised_hd95") < keys.index("tu_missed_cases")
    assert "TU: 1 missed, 1 false positive" in rh.headline_note(summary, "kits19")


def test_headline_sets_the_paper_beside_the_plan_grid_columns_when_present():
    headline = rh.headline_table(_scored_summary(plan_grid=True), "kits19")
    keys = re.findall(r'<tr data-metric="([^"]+)">', headline)
    assert keys[keys.index("tk_dice") + 1] == "plan_grid_tk_dice"
    assert keys[keys.index("tu_dice") + 1] == "plan_grid_tu_dice"
    plan = _headline_row(headline, "plan_grid_tk_dice")
    assert "on the plan&#x27;s grid" in plan[0] and plan[4:] == ["0.910", "0.858", "&mdash;"]  # paper, leaderboard
    assert _headline_row(headline, "tk_dice")[4:] == ["&mdash;", "&mdash;", "0.974"]  # the winner: scan grid
    assert _headline_row(headline, "plan_grid_tumor_recall")[4] == "0.238"
    assert "interpolated" in rh.headline_note(_scored_summary(plan_grid=True), "kits19")
    without = rh.headline_table(_scored_summary(), "kits19")
    assert "plan_grid_" not in without
    assert _headline_row(without, "tk_dice")[4:] == ["0.910", "0.858", "0.974"]
