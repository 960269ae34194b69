"""The whole workflow on the KiTS19 source, its imaging host and label repository served by a
local HTTP server on 127.0.0.1.

Its own run, in its own working directory (tests/workflow_runs.py).
"""

from __future__ import annotations

import nibabel as nib
import pandas as pd
import pytest
import yaml

from tests.workflow_runs import SNAKEMAKE, planned_jobs, snakemake, tiny_config, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")]


@pytest.fixture
def kits_server(tmp_path):
    """The loopback test server (tests/http_server.py) standing in for the KiTS imaging host and label repository."""
    from kidney_seg.data.phantom import PhantomParams, generate_case
    from kidney_seg.volume import save_nifti
    from tests.http_server import serve

    root = tmp_path / "www"
    params = PhantomParams.from_config({"field_of_view_mm": [120.0, 130.0], "z_extent_mm": [80.0, 90.0]})
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
