"""The whole workflow on variants of the tiny config: two folds, a broken case (with --keep-going,
left out, or failing the run), and the KiTS19 source served by a local HTTP server.

Each test makes its own run, in its own working directory (tests/workflow_runs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.workflow_runs import SNAKEMAKE, planned_jobs, snakemake, tiny_config, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")]


def test_two_folds_train_separately_and_predict_as_an_ensemble(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["split"] = {"folds": 2}
    cfg_path = write_config(tmp_path, cfg)
    dry = snakemake(cfg_path, "-n", "--cores", "4", "--resources", "gpu=2").stdout
    assert "fold_0/model.keras" in dry and "fold_1/model.keras" in dry
    snakemake(cfg_path, "--cores", "2")
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
    cfg = tiny_config(tmp_path)
    cfg["dataset"] = {"source": "local", "root": str(tmp_path / "data"), "on_bad_case": "fail"}
    cfg_path = write_config(tmp_path, cfg)
    targets = [str(tmp_path / "results" / "preprocessed" / f"case_{i:05d}" / "meta.json") for i in range(3)]
    proc = snakemake(cfg_path, *targets, "--cores", "2", "--keep-going", check=False)
    assert proc.returncode != 0
    assert Path(targets[0]).is_file() and Path(targets[2]).is_file()
    assert not (tmp_path / "results" / "preprocessed" / "case_00001").exists() or not any(
        (tmp_path / "results" / "preprocessed" / "case_00001").iterdir()
    )
    log = (tmp_path / "results" / "logs" / "check_case" / "case_00001.log").read_text()
    assert "case_00001" in log and str(broken) in log and "truncated" in log


def _tiny_config(tmp_path: Path, **overrides) -> Path:
    """The tiny config with its outputs under ``tmp_path``; top-level keys overridden."""
    cfg = tiny_config(tmp_path)
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return write_config(tmp_path, cfg)


def test_a_bad_case_is_left_out_listed_and_the_run_finishes(tmp_path):
    from kidney_seg.split import cases_in, make_split

    cfg = _tiny_config(tmp_path)
    cases = [f"case_{i:05d}" for i in range(6)]
    snakemake(cfg, *[str(tmp_path / "data" / c / "imaging.nii.gz") for c in cases], "--cores", "2")
    bad = cases_in(make_split(cases, (0.8, 0.1, 0.1), 42), "train")[0]
    broken = tmp_path / "data" / bad / "imaging.nii.gz"
    broken.write_bytes(broken.read_bytes()[:300])  # a download cut short
    proc = snakemake(cfg, "--cores", "2")
    results = tmp_path / "results"
    failures = pd.read_csv(results / "failures.csv")
    assert failures["case_id"].tolist() == [bad] and "truncated" in failures["reason"].item()
    assert "WARNING: 1 case(s) failed" in proc.stderr and bad in proc.stderr
    assert "3 train cases" in (results / "logs" / "train" / "fold_0.log").read_text()  # 4 in the split, 1 left out
    assert json.loads((results / "preprocessed" / bad / "meta.json").read_text())["excluded"] is True  # its record
    assert not list((results / "preprocessed" / bad).glob("*.npy"))  # and no slice cache
    html = (results / "report.html").read_text()
    failures_section = html[html.index('id="failures"') :]
    assert bad in failures_section and "truncated" in failures_section
    # with on_bad_case: fail the check itself fails, naming the case and the file; the others still finish
    strict = _tiny_config(tmp_path / "strict", dataset={"on_bad_case": "fail", "root": str(tmp_path / "data")})
    proc = snakemake(strict, "--cores", "2", "--keep-going", check=False)
    assert proc.returncode != 0
    log = (tmp_path / "strict" / "results" / "logs" / "check_case" / f"{bad}.log").read_text()
    assert bad in log and str(broken) in log and "truncated" in log
    assert len(list((tmp_path / "strict" / "results" / "checks").glob("*.json"))) == 5


@pytest.fixture
def kits_server(tmp_path):
    """The loopback test server (tests/http_server.py) standing in for the KiTS imaging host and label repository."""
    from kidney_seg.data.phantom import PhantomParams, generate_case
    from kidney_seg.volume import save_nifti
    from tests.http_server import serve

    root = tmp_path / "www"
    params = PhantomParams(field_of_view_mm=(120.0, 130.0), z_extent_mm=(80.0, 90.0))
    for index in (0, 1, 2, 3, 4, 5, 210):
        case = generate_case(index, 7, params)
        save_nifti(root / "img" / f"case_{index:05d}.nii.gz", case.image, case.affine)
        if index < 210:
            save_nifti(root / "lab" / f"case_{index:05d}" / "segmentation.nii.gz", case.label, case.affine)
    files = {f"/{p.relative_to(root).as_posix()}": p.read_bytes() for p in root.rglob("*.nii.gz")}
    with serve(files) as (base, _):
        yield base


def test_kits19_through_the_real_rules_against_a_local_server(tmp_path, kits_server):
    cfg = tiny_config(tmp_path)
    cfg["dataset"] = {
        "source": "kits19",
        "root": str(tmp_path / "kits19"),
        "cases": 6,
        "unlabelled_cases": 1,
        "kits_imaging_url": f"{kits_server}/img",
        "kits_labels_url": f"{kits_server}/lab",
        "allow_http": True,
    }  # the local test server speaks plain http
    cfg["preprocessing"].update({"clip": "auto", "normalization": "dataset"})
    cfg_path = write_config(tmp_path, cfg)
    snakemake(cfg_path, "--cores", "2")
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
