"""A dry run on a fresh results folder lists every stage: the DAG is static (no checkpoint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.workflow_runs import SNAKEMAKE, snakemake, tiny_config, write_config

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")


def _fresh_config(tmp_path: Path, **preprocessing) -> Path:
    """The tiny config with a fresh (empty) results folder and data root under ``tmp_path``."""
    cfg = tiny_config(tmp_path)
    cfg["preprocessing"].update(preprocessing)
    return write_config(tmp_path, cfg)


def job_counts(config: Path) -> dict[str, int]:
    """{rule: number of jobs} that ``snakemake -n`` plans."""
    out = snakemake(config, "-n", "--quiet", "rules", timeout=300).stdout
    rows = [line.split() for line in out.splitlines()]
    return {r[0]: int(r[1]) for r in rows if len(r) == 2 and r[1].isdigit() and r[0] != "total"}


def test_a_dry_run_on_a_fresh_folder_lists_every_stage(tmp_path):
    jobs = job_counts(_fresh_config(tmp_path))
    # 6 phantom cases, split 4 train, 1 validation, 1 test: one job per case or fold, as the real run has
    expected = {
        "generate_phantom": 6,
        "check_case": 6,
        "collect_checks": 1,
        "split": 1,
        "preprocess": 5,
        "train": 1,
        "predict": 2,
        "decide_postprocessing": 1,
        "qc_reference": 1,
        "postprocess": 1,
        "evaluate_case": 1,
        "evaluate": 1,
        "report": 1,
        "all": 1,
    }
    assert {rule: jobs.get(rule) for rule in expected} == expected, jobs
    assert "fingerprint" not in jobs  # the tiny config's fixed window and per-slice z-score need none
    assert not list((tmp_path / "results").rglob("*.json"))  # nothing ran


def test_a_dry_run_lists_the_fingerprint_where_the_config_needs_it(tmp_path):
    jobs = job_counts(_fresh_config(tmp_path, clip="auto", normalization="dataset"))
    assert jobs.get("fingerprint") == 1 and jobs.get("train") == 1 and jobs.get("report") == 1, jobs


@pytest.mark.workflow  # runs part of the workflow (download, check, preprocess): not in `make test-quick`
def test_a_local_case_given_as_a_dicom_series_is_checked_and_preprocessed(tmp_path):
    """A manifest's image may be a DICOM series folder: the rules take the folder as input and read it."""
    import json

    from kidney_seg.data.phantom import PhantomParams, generate_case
    from kidney_seg.dicom import write_series
    from kidney_seg.volume import save_nifti

    data = tmp_path / "data"
    params = PhantomParams.from_config({"field_of_view_mm": [120.0, 130.0], "z_extent_mm": [80.0, 90.0]})
    rows = ["case_id,image,label"]
    for index in range(6):
        case = generate_case(index, 7, params)
        label = data / f"label_{index}.nii.gz"
        save_nifti(label, case.label, case.affine)
        image = data / f"image_{index}.nii.gz"
        if index == 1:  # this one as a series: slices along axis 2, as DICOM stores them
            image = data / "series_1"
            write_series(np.transpose(case.image, (2, 1, 0)), case.affine[:, [2, 1, 0, 3]], image)
            save_nifti(label, np.transpose(case.label, (2, 1, 0)), case.affine[:, [2, 1, 0, 3]])
        else:
            save_nifti(image, case.image, case.affine)
        rows.append(f"case_{index:05d},{image.name},{label.name}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(tmp_path)
    cfg["dataset"] = {"source": "local", "manifest": str(data / "manifest.csv")}
    config = write_config(tmp_path, cfg)
    meta = tmp_path / "results" / "preprocessed" / "case_00001" / "meta.json"
    snakemake(config, str(meta), "--cores", "1", timeout=300)
    check = json.loads((tmp_path / "results" / "checks" / "case_00001.json").read_text())
    assert check["ok"], check
    written = json.loads(meta.read_text())
    assert written["class_volumes_ml"][1] > 0 and written["shape"][0] > 1
