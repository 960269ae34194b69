"""A pipeline killed with SIGKILL (the whole snakemake process group) during training, or during
prediction, completes when rerun with --rerun-incomplete: training resumes from its last
checkpoint, and with ``deterministic: true`` every result is bitwise the uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from kidney_seg.training import checkpoint_epoch
from tests.conftest import REPO
from tests.test_determinism import EPOCHS, deterministic_config, deterministic_reference, differences  # noqa: F401
from tests.test_workflow import SNAKEMAKE, snakemake

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")


def history_rows(path: Path) -> int:
    """Rows written so far to a history CSV (0 while absent or empty)."""
    try:
        return len(pd.read_csv(path))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def run_and_kill(cfg: Path, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Run the whole pipeline and SIGKILL snakemake's process group (its jobs too) as soon as ``ready()``."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([SNAKEMAKE, "--cores", "2", "--configfile", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"snakemake ended before {what}"
            assert time.monotonic() < deadline, f"no {what} in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def finish(cfg: Path) -> None:
    """Rerun after a kill: remove the stale lock, then complete the run, redoing incomplete jobs."""
    snakemake("--unlock", "--cores", "1", "--configfile", str(cfg))
    snakemake("--cores", "2", "--rerun-incomplete", "--configfile", str(cfg))


def test_killed_training_resumes_from_its_checkpoint_bitwise(deterministic_reference, tmp_path):
    cfg = deterministic_config(tmp_path)
    fold = tmp_path / "results" / "model" / "fold_0"
    run_and_kill(cfg, lambda: history_rows(fold / "checkpoint" / "history.csv") >= 2, "two epochs of training")
    done = checkpoint_epoch(fold / "checkpoint" / "last.keras")
    time.sleep(1)
    assert checkpoint_epoch(fold / "checkpoint" / "last.keras") == done, "a train job outlived the kill"
    assert done is not None and 1 <= done < EPOCHS and not (fold / "model.keras").exists()
    finish(cfg)
    log = (tmp_path / "results" / "logs" / "train" / "fold_0.log").read_text()
    assert f"after epoch {done}\n" in log and f"epochs {done + 1}-{EPOCHS} x 3 steps" in log
    assert pd.read_csv(fold / "history.csv")["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert not [p for p in fold.rglob(".*") if p.is_file()], "partial files of the killed run were left behind"
    assert differences(deterministic_reference, tmp_path / "results") == []


def test_killed_prediction_reruns_to_the_same_result(deterministic_reference, tmp_path):
    cfg = deterministic_config(tmp_path)
    results = tmp_path / "results"
    run_and_kill(cfg, lambda: any((results / "logs" / "predict").glob("*.log")), "predict job")
    expected = len(list((deterministic_reference / "raw_predictions").glob("*.nii.gz")))
    assert (results / "model" / "fold_0" / "model.keras").is_file()  # killed after training, during prediction
    assert len(list((results / "raw_predictions").glob("*.nii.gz"))) < expected
    assert not (results / "metrics" / "per_case.csv").exists()
    finish(cfg)
    assert "resuming" not in (results / "logs" / "train" / "fold_0.log").read_text()  # training was not redone
    assert differences(deterministic_reference, results) == []
