"""The whole workflow with a broken case: --keep-going finishes the others; a bad case is left out
and listed, or (on_bad_case: fail) fails its check naming the case and the file.

Each test makes its own run, in its own working directory (tests/workflow_runs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.workflow_runs import SNAKEMAKE, snakemake, tiny_config, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")]


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
