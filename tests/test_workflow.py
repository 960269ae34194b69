"""The whole Snakemake workflow on a tiny phantom config, plus lint and rerun behaviour."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")
pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")


def snakemake(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake from the repository root with this interpreter's environment first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([SNAKEMAKE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def test_lint_is_clean():
    proc = snakemake("--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run the whole workflow once on the tiny config; return (results dir, config file)."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["results_dir"] = str(root / "results")
    cfg["dataset"]["root"] = str(root / "data")
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    snakemake("--cores", "2", "--configfile", str(cfg_path))
    return root / "results", cfg_path, root / "data"


def test_outputs_exist_and_are_well_formed(tiny_run):
    results, _, data = tiny_run
    split = pd.read_csv(results / "split.csv")
    assert list(split.columns) == ["case_id", "subset"] and len(split) == 6
    assert split["subset"].value_counts().to_dict() == {"train": 4, "val": 1, "test": 1}
    assert (results / "model" / "fold_0" / "model.keras").stat().st_size > 0
    assert not (results / "model" / "fold_1").exists()
    history = pd.read_csv(results / "model" / "fold_0" / "history.csv")
    assert len(history) == 2 and {"epoch", "lr", "loss", "val_loss", "val_dice_kidney", "val_dice_tumor"} <= set(history.columns)
    test_cases = split.loc[split.subset == "test", "case_id"].tolist()
    for case in test_cases:
        pred = nib.load(str(results / "predictions" / f"{case}.nii.gz"))
        image = nib.load(str(data / case / "imaging.nii.gz"))
        assert pred.shape == image.shape and pred.get_data_dtype() == np.uint8
        np.testing.assert_allclose(pred.affine, image.affine)
        assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1, 2}
    per_case = pd.read_csv(results / "metrics" / "per_case.csv")
    assert per_case["case_id"].tolist() == test_cases
    assert {"tk_dice", "tu_dice", "kidney_dice", "kidney_precision", "kidney_recall", "tumor_precision",
            "tumor_recall"} <= set(per_case.columns)
    assert per_case["tk_dice"].between(0, 1).all()
    summary = pd.read_csv(results / "metrics" / "summary.csv")
    assert list(summary.columns) == ["metric", "n", "mean", "median", "std", "min", "max"]
    decision = json.loads((results / "model" / "postprocessing.json").read_text())
    assert decision["validation_cases"] == split.loc[split.subset == "val", "case_id"].tolist()
    assert [step["name"] for step in decision["steps"]] == ["foreground", "tumor"]
    assert (results / "raw_predictions" / f"{decision['validation_cases'][0]}.nii.gz").is_file()
    html = (results / "report.html").read_text()
    assert "Post-processing" in html
    assert html.count('class="case-row"') == len(test_cases)
    assert all(f'data-case="{c}"' in html for c in test_cases)
    for rule in ("download", "preprocess", "train", "predict", "decide_postprocessing", "postprocess", "report"):
        assert any((results / "benchmarks").rglob(f"*{rule}*")), rule
        assert any((results / "logs").rglob(f"*{rule}*")), rule


def test_forced_evaluate_reruns_only_that_rule_with_same_result(tiny_run):
    results, cfg, _ = tiny_run
    before = (results / "metrics" / "per_case.csv").read_bytes()
    proc = snakemake("--cores", "2", "--configfile", str(cfg), "-f", "evaluate")
    assert "evaluate" in proc.stderr and "train" not in proc.stderr.split("Job stats:")[-1]
    assert (results / "metrics" / "per_case.csv").read_bytes() == before


def test_cli_segments_a_phantom_scan_with_the_trained_model(tiny_run, tmp_path):
    results, _, data = tiny_run
    split = pd.read_csv(results / "split.csv")
    case = split.loc[split.subset == "test", "case_id"].iloc[0]
    scan = tmp_path / "scans" / "new_scan.nii.gz"  # a scan the CLI has never seen by this name
    scan.parent.mkdir()
    shutil.copyfile(data / case / "imaging.nii.gz", scan)
    kidney_seg = Path(sys.executable).parent / "kidney-seg"
    proc = subprocess.run([str(kidney_seg), "predict", str(results / "model"), str(scan.parent), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "segmenting" in proc.stderr and "1 model(s)" in proc.stderr  # progress bar and what was loaded
    out = nib.load(str(tmp_path / "out" / "new_scan.nii.gz"))
    workflow_pred = nib.load(str(results / "predictions" / f"{case}.nii.gz"))
    np.testing.assert_allclose(out.affine, nib.load(str(scan)).affine)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(workflow_pred.dataobj))
    bad = subprocess.run([str(kidney_seg), "predict", str(results / "model"), str(tmp_path / "missing.nii.gz"), "-o",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "missing.nii.gz" in bad.stderr


def test_snakemake_report_holds_the_tagged_outputs(tiny_run, tmp_path):
    _, cfg, _ = tiny_run
    out = tmp_path / "snakemake-report.html"
    snakemake("--report", str(out), "--configfile", str(cfg))
    page = out.read_text()
    for name in ("per_case.csv", "summary.csv", "curves.png", "report.html"):  # results tagged with report()
        assert name in page, name
    for category in ("Metrics", "Training", "Report"):
        assert category in page, category
    assert "patch-aggregated sliding-window inference" in page  # report/workflow.rst


def planned_jobs(cfg: Path, *extra: str) -> set[str]:
    """Rule names a dry run would execute."""
    out = snakemake("-n", "--quiet", "rules", "--configfile", str(cfg), *extra).stdout
    rows = [line.split() for line in out.splitlines()]
    return {r[0] for r in rows if len(r) == 2 and r[1].isdigit() and r[0] != "total"}


def test_rerun_train_plans_everything_downstream(tiny_run):
    _, cfg, _ = tiny_run
    assert planned_jobs(cfg) == set()
    assert planned_jobs(cfg, "-R", "train") == {"train", "predict", "decide_postprocessing", "postprocess", "evaluate_case",
                                                "evaluate", "report", "all"}


def test_editing_a_library_module_triggers_its_rules(tiny_run):
    _, cfg, _ = tiny_run
    module = REPO / "kidney_seg" / "evaluation.py"
    original, stat = module.read_bytes(), module.stat()
    try:  # Snakemake >= 9.18 compares checksums, so the content must really change
        module.write_bytes(original + b"\n# edited by test_editing_a_library_module_triggers_its_rules\n")
        # post-processing is decided and applied with evaluation's Dice, so it reruns too
        assert planned_jobs(cfg) == {"decide_postprocessing", "postprocess", "evaluate_case", "evaluate", "report", "all"}
    finally:
        module.write_bytes(original)
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned_jobs(cfg) == set()


def test_two_folds_train_separately_and_predict_as_an_ensemble(tmp_path):
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["dataset"]["root"] = str(tmp_path / "data")
    cfg["split"] = {"folds": 2}
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    dry = snakemake("-n", "--cores", "4", "--resources", "gpu=2", "--configfile", str(cfg_path)).stdout
    assert "fold_0/model.keras" in dry and "fold_1/model.keras" in dry
    snakemake("--cores", "2", "--configfile", str(cfg_path))
    results = tmp_path / "results"
    split = pd.read_csv(results / "split.csv", dtype=str, keep_default_na=False)
    development = split.loc[split.subset != "test", "case_id"].tolist()
    for fold in ("0", "1"):
        log = (results / "logs" / "train" / f"fold_{fold}.log").read_text()
        held_out = split.loc[split.fold == fold, "case_id"].tolist()
        assert f"{len(development) - len(held_out)} train cases, {len(held_out)} val cases" in log
    decision = json.loads((results / "model" / "postprocessing.json").read_text())
    assert sorted(decision["validation_cases"]) == sorted(development)  # out-of-fold predictions of every case
    test_case = split.loc[split.subset == "test", "case_id"].item()
    assert "loaded 2 model(s)" in (results / "logs" / "predict" / f"{test_case}.log").read_text()
    assert "loaded 1 model(s)" in (results / "logs" / "predict" / f"{development[0]}.log").read_text()
    assert (results / "predictions" / f"{test_case}.nii.gz").is_file()


def test_keep_going_finishes_the_good_cases(tmp_path):
    from tests.conftest import kits_affine, write_nifti

    rng = np.random.default_rng(0)
    for i in range(3):
        label = np.zeros((6, 40, 40), np.uint8)
        label[2:4, 10:20, 10:20] = 1
        image = rng.normal(40, 20, label.shape).astype(np.float32)
        write_nifti(tmp_path / "data" / f"case_{i:05d}" / "imaging.nii.gz", image, kits_affine())
        write_nifti(tmp_path / "data" / f"case_{i:05d}" / "segmentation.nii.gz", label, kits_affine())
    broken = tmp_path / "data" / "case_00001" / "imaging.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["dataset"] = {"source": "local", "root": str(tmp_path / "data")}
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    targets = [str(tmp_path / "results" / "preprocessed" / f"case_{i:05d}" / "meta.json") for i in range(3)]
    proc = snakemake(*targets, "--cores", "2", "--keep-going", "--configfile", str(cfg_path), check=False)
    assert proc.returncode != 0
    assert Path(targets[0]).is_file() and Path(targets[2]).is_file()
    assert not (tmp_path / "results" / "preprocessed" / "case_00001").exists() or not any(
        (tmp_path / "results" / "preprocessed" / "case_00001").iterdir())
    log = (tmp_path / "results" / "logs" / "preprocess" / "case_00001.log").read_text()
    assert "case_00001" in log and str(broken) in log and "truncated" in log


def _tiny_config(tmp_path: Path, **overrides) -> Path:
    """The tiny config with its outputs under ``tmp_path``; top-level keys overridden."""
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["dataset"]["root"] = str(tmp_path / "data")
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_bad_case_is_left_out_listed_and_the_run_finishes(tmp_path):
    from kidney_seg.split import cases_in, make_split

    cfg = _tiny_config(tmp_path)
    cases = [f"case_{i:05d}" for i in range(6)]
    snakemake(*[str(tmp_path / "data" / c / "imaging.nii.gz") for c in cases], "--cores", "2", "--configfile", str(cfg))
    bad = cases_in(make_split(cases, (0.8, 0.1, 0.1), 42), "train")[0]
    broken = tmp_path / "data" / bad / "imaging.nii.gz"
    broken.write_bytes(broken.read_bytes()[:300])  # a download cut short
    proc = snakemake("--cores", "2", "--configfile", str(cfg))
    results = tmp_path / "results"
    failures = pd.read_csv(results / "failures.csv")
    assert failures["case_id"].tolist() == [bad] and "truncated" in failures["reason"].item()
    assert f"WARNING: 1 case(s) failed" in proc.stderr and bad in proc.stderr
    assert "3 train cases" in (results / "logs" / "train" / "fold_0.log").read_text()  # 4 in the split, 1 left out
    assert not (results / "preprocessed" / bad).exists()
    html = (results / "report.html").read_text()
    failures_section = html[html.index('id="failures"'):]
    assert bad in failures_section and "truncated" in failures_section
    # with on_bad_case: fail the check itself fails, naming the case and the file; the others still finish
    strict = _tiny_config(tmp_path / "strict", dataset={"on_bad_case": "fail", "root": str(tmp_path / "data")})
    proc = snakemake("--cores", "2", "--keep-going", "--configfile", str(strict), check=False)
    assert proc.returncode != 0
    log = (tmp_path / "strict" / "results" / "logs" / "check_case" / f"{bad}.log").read_text()
    assert bad in log and str(broken) in log and "truncated" in log
    assert len(list((tmp_path / "strict" / "results" / "checks").glob("*.json"))) == 5


@pytest.fixture
def kits_server(tmp_path):
    """A local HTTP server standing in for the KiTS imaging host and label repository."""
    import functools
    import http.server
    import threading

    from kidney_seg.data.phantom import PhantomParams, generate_case
    from kidney_seg.volume import save_nifti

    root = tmp_path / "www"
    params = PhantomParams(field_of_view_mm=(120.0, 130.0), z_extent_mm=(80.0, 90.0))
    for index in (0, 1, 2, 3, 4, 5, 210):
        case = generate_case(index, 7, params)
        save_nifti(root / "img" / f"case_{index:05d}.nii.gz", case.image, case.affine)
        if index < 210:
            save_nifti(root / "lab" / f"case_{index:05d}" / "segmentation.nii.gz", case.label, case.affine)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_kits19_through_the_real_rules_against_a_local_server(tmp_path, kits_server):
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["dataset"] = {"source": "kits19", "root": str(tmp_path / "kits19"), "cases": 6, "unlabelled_cases": 1,
                      "kits_imaging_url": f"{kits_server}/img", "kits_labels_url": f"{kits_server}/lab",
                      "allow_http": True}  # the local test server speaks plain http
    cfg["preprocessing"].update({"clip": "auto", "normalization": "dataset"})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    snakemake("--cores", "2", "--configfile", str(cfg_path))
    results = tmp_path / "results"
    assert (tmp_path / "kits19" / "case_00210" / "imaging.nii.gz").is_file()
    assert not (tmp_path / "kits19" / "case_00210" / "segmentation.nii.gz").exists()
    pred = nib.load(str(results / "predictions" / "case_00210.nii.gz"))
    assert pred.shape == nib.load(str(tmp_path / "kits19" / "case_00210" / "imaging.nii.gz")).shape
    assert "case_00210" not in pd.read_csv(results / "split.csv")["case_id"].tolist()
    assert "case_00210" not in pd.read_csv(results / "metrics" / "per_case.csv")["case_id"].tolist()
    fingerprint = yaml.safe_load((results / "fingerprint.json").read_text())
    assert fingerprint["percentile_00_5"] < fingerprint["percentile_99_5"]
    assert planned_jobs(cfg_path) == set()  # a second run downloads nothing
