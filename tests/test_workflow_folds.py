"""The whole workflow with two folds: separate train jobs, out-of-fold validation, an ensemble for the test case.

Its own run, in its own working directory (tests/workflow_runs.py); a file of its own so that
pytest-xdist runs it beside the other whole-workflow files.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.workflow_runs import SNAKEMAKE, snakemake, tiny_config, write_config

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
