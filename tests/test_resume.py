"""Determinism, resuming and Snakemake's lock, on two shared runs of the tiny pipeline.

With ``deterministic: true`` two runs give bitwise-identical results. A pipeline killed with
SIGKILL (the whole snakemake process group) during training, or during prediction, completes
when rerun with --rerun-incomplete: training resumes from its last checkpoint, and every
result is bitwise the uninterrupted run's. While the resumed run trains, an identical second
invocation must stop at once on Snakemake's lock, and the first goes on undisturbed.

The two runs (tests/workflow_runs.py): ``deterministic_reference``, uninterrupted on 2 cores,
and ``interrupted_run``, on 1 core, killed during training and during prediction and resumed
each time. So one comparison covers core counts, interruptions and repeatability at once.
All the tests using them live in this one file, so that `--dist loadfile` runs them on one
pytest-xdist worker (session fixtures are made once per worker).
"""

from __future__ import annotations

import io
import shutil
import zipfile

import h5py
import numpy as np
import pandas as pd
import pytest

from tests.workflow_runs import DETERMINISTIC_EPOCHS as EPOCHS
from tests.workflow_runs import LOCK_ERROR, SNAKEMAKE, differences

pytestmark = [pytest.mark.workflow, pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")]


def test_killed_training_resumes_from_its_checkpoint_bitwise(deterministic_reference, interrupted_run):
    run = interrupted_run
    done = run.epoch_at_training_kill
    assert run.epoch_a_second_later == done, "a train job outlived the kill"
    assert done is not None and 1 <= done < EPOCHS and not run.model_after_training_kill
    fold = run.results / "model" / "fold_0"
    log = (run.results / "logs" / "train" / "fold_0.log").read_text()
    assert f"after epoch {done}\n" in log and f"epochs {done + 1}-{EPOCHS} x 3 steps" in log
    assert pd.read_csv(fold / "history.csv")["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert not [p for p in fold.rglob(".*") if p.is_file()], "partial files of the killed run were left behind"
    assert differences(deterministic_reference, run.results) == []


def test_killed_prediction_reruns_to_the_same_result(deterministic_reference, interrupted_run):
    run = interrupted_run
    expected = len(list((deterministic_reference / "raw_predictions").glob("*.nii.gz")))
    assert run.model_after_prediction_kill  # killed after training, during prediction
    assert run.raw_predictions_after_prediction_kill < expected
    assert not run.metrics_after_prediction_kill
    # training was not redone by the final run: its log and model are those of the killed run
    assert (run.results / "logs" / "train" / "fold_0.log").read_text() == run.train_log_before_finish
    assert (run.results / "model" / "fold_0" / "model.keras").read_bytes() == run.model_bytes_before_finish
    assert differences(deterministic_reference, run.results) == []


def test_second_invocation_fails_fast_on_the_lock_and_the_first_completes(interrupted_run):
    run = interrupted_run
    out = run.lock_output
    assert LOCK_ERROR in out, f"the second invocation did not hit the lock (rc {run.lock_rc}):\n{out[-6000:]}"
    assert run.lock_rc not in (0, None)
    assert run.first_running_when_second_ended, "the first invocation had already ended: the test proved nothing"
    assert run.lock_seconds < 120, f"the second invocation took {run.lock_seconds:.0f} s to give up"
    assert "--unlock" in out  # Snakemake's advice in the lock message
    assert "Finished job" not in out and "localrule" not in out, "the second invocation ran jobs"
    # the first went on to prediction (where it was killed on purpose) and the run completed
    assert run.model_after_prediction_kill
    results = run.results
    assert (results / "report.html").stat().st_size > 0 and "</html>" in (results / "report.html").read_text()
    per_case = pd.read_csv(results / "metrics" / "per_case.csv")
    assert len(per_case) >= 1 and per_case["tk_dice"].between(0, 1).all()
    leftovers = [p for p in results.rglob(".*") if p.is_file()]
    assert not leftovers, f"temporary files left in the results: {leftovers}"


def test_two_deterministic_runs_are_bitwise_identical(deterministic_reference, interrupted_run):
    # one core there, two in the reference: deterministic runs use one compute thread whatever --cores says
    results = interrupted_run.results
    assert differences(deterministic_reference, results) == []
    for log in ("train/fold_0.log", *(f"predict/{p.stem}.log" for p in (results / "raw_predictions").glob("*.json"))):
        assert "deterministic: seed 42, backend tensorflow" in (results / "logs" / log).read_text(), log


def test_differences_sees_a_flipped_bit(deterministic_reference, tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(deterministic_reference, copy)
    assert differences(deterministic_reference, copy) == []
    model = copy / "model" / "fold_0" / "model.keras"
    with zipfile.ZipFile(model) as archive:
        members = {item.filename: archive.read(item) for item in archive.infolist()}
    with h5py.File(io.BytesIO(members["model.weights.h5"]), "r") as f:
        name = next(n for n in _h5_datasets(f) if f[n].dtype == np.float32 and f[n].size)
    buffer = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buffer, "r+") as f:
        data = f[name][()]
        data.reshape(-1).view(np.uint32)[0] ^= 1  # the last bit of one weight
        f[name][...] = data
    members["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(model, "w") as archive:
        for filename, content in members.items():
            archive.writestr(filename, content)
    label = next((copy / "preprocessed").glob("*/label.npy"))
    array = np.load(label)
    array.reshape(-1)[0] ^= 1
    np.save(label, array)
    found = differences(deterministic_reference, copy)
    assert len(found) == 2 and found[0].startswith(str(label.relative_to(copy))) and "model.keras: 1 of" in found[1]


def _h5_datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    return names
