"""A dry run on a fresh results folder lists every stage: the DAG is static (no checkpoint)."""

from __future__ import annotations

from pathlib import Path

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
        "download_image": 6,
        "download_label": 6,
        "check_case": 6,
        "collect_checks": 1,
        "split": 1,
        "preprocess": 5,
        "train": 1,
        "predict": 2,
        "decide_postprocessing": 1,
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
