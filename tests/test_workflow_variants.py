"""The whole workflow beyond the tiny defaults, in one shared run: the KiTS19 source served by a local
HTTP server on 127.0.0.1, two folds and a broken case.

The run (``variants_run``) downloads every image of a KiTS19-layout source (6 labelled cases and the
imaging-only case_00210) and every label from the loopback server, cuts one development case's label short (a download
damaged after the fact), then runs the whole pipeline with ``split.folds: 2``:

- the two folds train in separate jobs, every usable development case gets an out-of-fold prediction,
  and the test case is predicted by the ensemble of both models;
- the broken case is left out, listed in failures.csv and the report, and the run finishes;
- with ``on_bad_case: fail`` the check itself fails, naming the case and the file;
- the imaging-only case is predicted on its own grid, and is in neither the split nor the metrics.

One run in its own working directory (tests/workflow_runs.py); every test using it lives in this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.workflow_runs import SNAKEMAKE, planned_jobs, snakemake, tiny_config, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")]

LABELLED = (0, 1, 2, 3, 4, 5)
IMAGING_ONLY = "case_00210"


@dataclass(frozen=True)
class VariantsRun:
    """The shared run: its config, folders, split, broken case and what snakemake printed."""

    config: Path
    results: Path
    raw: Path
    split: pd.DataFrame
    bad: str
    dry_run: str
    stderr: str


def serve_kits19(root: Path):
    """The loopback test server (tests/http_server.py) standing in for the KiTS imaging host and label
    repository, serving phantom cases in the KiTS19 layout."""
    from kidney_seg.data.phantom import PhantomParams, generate_case
    from kidney_seg.volume import save_nifti
    from tests.http_server import serve

    params = PhantomParams.from_config({"field_of_view_mm": [120.0, 130.0], "z_extent_mm": [80.0, 90.0]})
    for index in (*LABELLED, 210):
        case = generate_case(index, 7, params)
        save_nifti(root / "img" / f"case_{index:05d}.nii.gz", case.image, case.affine)
        if index in LABELLED:
            save_nifti(root / "lab" / f"case_{index:05d}" / "segmentation.nii.gz", case.label, case.affine)
    files = {f"/{p.relative_to(root).as_posix()}": p.read_bytes() for p in root.rglob("*.nii.gz")}
    return serve(files)


def variants_config(root: Path, base: str) -> Path:
    """The tiny config on the KiTS19 source at ``base``, with two folds and dataset statistics (a fingerprint)."""
    cfg = tiny_config(root)
    cfg["dataset"] = {
        "source": "kits19",
        "root": str(root.parent / "kits19"),
        "cases": len(LABELLED),
        "unlabelled_cases": 1,
        "kits_imaging_url": f"{base}/img",
        "kits_labels_url": f"{base}/lab",
        "allow_http": True,  # the local test server speaks plain http
    }
    cfg["preprocessing"].update({"clip": "auto", "normalization": "dataset"})
    cfg["split"] = {"folds": 2}
    return write_config(root, cfg)


@pytest.fixture(scope="module")
def variants_run(tmp_path_factory) -> VariantsRun:
    """Download, break one development case, run everything; then the strict config's checks (read-only)."""
    from kidney_seg.split import make_split

    root = tmp_path_factory.mktemp("variants")
    with serve_kits19(root / "www") as (base, _):
        config = variants_config(root / "run", base)
        dry = snakemake(config, "-n", "--cores", "4", "--resources", "gpu=2").stdout
        raw = root / "kits19"
        downloads = [raw / f"case_{i:05d}" / "imaging.nii.gz" for i in (*LABELLED, 210)]
        downloads += [raw / f"case_{i:05d}" / "segmentation.nii.gz" for i in LABELLED]  # checked against the image
        snakemake(config, *map(str, downloads), "--cores", "2")
        split = make_split([f"case_{i:05d}" for i in LABELLED], (0.8, 0.1, 0.1), 42, 2)
        bad = split.loc[split.subset != "test", "case_id"].iloc[0]
        broken = raw / bad / "segmentation.nii.gz"  # not the image: the label's download is checked against it
        broken.write_bytes(broken.read_bytes()[:300])  # a download cut short
        proc = snakemake(config, "--cores", "2")
    return VariantsRun(config, root / "run" / "results", raw, split, bad, dry, proc.stderr)


def test_two_folds_train_separately_and_predict_as_an_ensemble(variants_run):
    run = variants_run
    assert "fold_0/model.keras" in run.dry_run and "fold_1/model.keras" in run.dry_run
    split = pd.read_csv(run.results / "split.csv", dtype=str, keep_default_na=False)
    assert (
        split["case_id"].tolist() == run.split["case_id"].tolist()
        and run.bad in split.loc[split.fold != "", "case_id"].tolist()
    )
    development = [c for c in split.loc[split.subset != "test", "case_id"] if c != run.bad]
    for fold in ("0", "1"):
        log = (run.results / "logs" / "train" / f"fold_{fold}.log").read_text()
        held_out = [c for c in split.loc[split.fold == fold, "case_id"] if c != run.bad]
        assert f"{len(development) - len(held_out)} train cases, {len(held_out)} val cases" in log
    decision = json.loads((run.results / "model" / "postprocessing.json").read_text())
    assert sorted(decision["validation_cases"]) == sorted(development)  # out-of-fold predictions of every case
    test_case = split.loc[split.subset == "test", "case_id"].item()
    assert "loaded 2 model(s)" in (run.results / "logs" / "predict" / f"{test_case}.log").read_text()
    assert "loaded 1 model(s)" in (run.results / "logs" / "predict" / f"{development[0]}.log").read_text()
    assert (run.results / "predictions" / f"{test_case}.nii.gz").is_file()


def test_a_bad_case_is_left_out_listed_and_the_run_finishes(variants_run):
    run, bad = variants_run, variants_run.bad
    failures = pd.read_csv(run.results / "failures.csv")
    assert failures["case_id"].tolist() == [bad] and "truncated" in failures["reason"].item()
    assert "WARNING: 1 case(s) failed" in run.stderr and bad in run.stderr
    assert json.loads((run.results / "preprocessed" / bad / "meta.json").read_text())["excluded"] is True  # its record
    assert not list((run.results / "preprocessed" / bad).glob("*.npy"))  # and no slice cache
    assert not (run.results / "raw_predictions" / f"{bad}.nii.gz").exists()
    html = (run.results / "report.html").read_text()
    failures_section = html[html.index('id="failures"') :]
    assert bad in failures_section and "truncated" in failures_section


def test_on_bad_case_fail_fails_the_check_naming_case_and_file(variants_run, tmp_path):
    run, bad = variants_run, variants_run.bad
    cfg = yaml.safe_load(run.config.read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["dataset"]["on_bad_case"] = "fail"
    strict = write_config(tmp_path, cfg)  # the same (downloaded) raw folder: nothing is fetched again
    proc = snakemake(strict, "--cores", "2", "--keep-going", check=False)
    assert proc.returncode != 0
    log = (tmp_path / "results" / "logs" / "check_case" / f"{bad}.log").read_text()
    assert bad in log and str(run.raw / bad / "segmentation.nii.gz") in log and "truncated" in log
    assert len(list((tmp_path / "results" / "checks").glob("*.json"))) == len(LABELLED)  # 7 cases, 1 failed


def test_kits19_imaging_only_case_is_predicted_on_its_own_grid(variants_run):
    run = variants_run
    assert (run.raw / IMAGING_ONLY / "imaging.nii.gz").is_file()
    assert not (run.raw / IMAGING_ONLY / "segmentation.nii.gz").exists()
    pred = nib.load(str(run.results / "predictions" / f"{IMAGING_ONLY}.nii.gz"))
    image = nib.load(str(run.raw / IMAGING_ONLY / "imaging.nii.gz"))
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine)
    assert IMAGING_ONLY not in pd.read_csv(run.results / "split.csv")["case_id"].tolist()
    assert IMAGING_ONLY not in pd.read_csv(run.results / "metrics" / "per_case.csv")["case_id"].tolist()
    fingerprint = json.loads((run.results / "fingerprint.json").read_text())
    assert fingerprint["percentile_00_5"] < fingerprint["percentile_99_5"]


def test_a_second_run_plans_nothing(variants_run):
    assert planned_jobs(variants_run.config) == set()  # no download again, the broken case stays left out


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
