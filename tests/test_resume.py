"""A train job killed with SIGKILL resumes from its last checkpoint when the rule is rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from tests.test_workflow import SNAKEMAKE, snakemake

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")
EPOCHS = 8


def history_rows(path: Path) -> int:
    """Rows written so far to a history CSV (0 while absent or empty)."""
    try:
        return len(pd.read_csv(path))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def test_killed_training_resumes_from_its_checkpoint(tmp_path):
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["dataset"]["root"] = str(tmp_path / "data")
    cfg["training"]["epochs"] = EPOCHS
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    model = tmp_path / "results" / "model" / "fold_0" / "model.keras"
    checkpoint_history = tmp_path / "results" / "model" / "fold_0" / "checkpoint" / "history.csv"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([SNAKEMAKE, str(model), "--cores", "2", "--configfile", str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while history_rows(checkpoint_history) < 2:
            assert proc.poll() is None, "snakemake ended before training had two epochs"
            assert time.monotonic() < deadline, "training did not reach epoch 2 in time"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole snakemake process group, mid-training
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = history_rows(checkpoint_history)
    assert 2 <= done < EPOCHS and not model.exists()
    snakemake("--unlock", "--cores", "1", "--configfile", str(cfg_path))
    snakemake(str(model), "--cores", "2", "--rerun-incomplete", "--configfile", str(cfg_path))
    log = (tmp_path / "results" / "logs" / "train" / "fold_0.log").read_text()
    assert f"after epoch {done}" in log or any(f"after epoch {n}" in log for n in range(done, EPOCHS))
    history = pd.read_csv(tmp_path / "results" / "model" / "fold_0" / "history.csv")
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert model.is_file()
