"""Whole-workflow runs for the tests: configs, invocations and the runs that several tests share.

Every invocation gets its own working directory (the folder of its config file, passed as
``--directory``), because Snakemake removes ``.snakemake/locks`` of its working directory
when any run there ends: runs in one shared folder would drop each other's locks. The
repository's own ``config.yaml`` is passed first on the command line (a run in another
folder does not see it), then the test's config, so the two merge as they do for a user.

The session-scoped fixture ``deterministic_runs`` in tests/conftest.py calls
:func:`make_deterministic_runs` once: its uninterrupted run is also the tiny run that the read-only
checks of tests/test_workflow.py use.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from kidney_seg.checkpoint import TIMING_COLUMNS
from tests.conftest import REPO

VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = shutil.which("snakemake", path=str(VENV_BIN)) or shutil.which("snakemake")
SNAKEFILE = REPO / "Snakefile"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
LOCK_ERROR = "Directory cannot be locked"  # snakemake.exceptions.LockException
#: What a copy of the workflow needs (tests that edit a library module work on a copy, never on the tree).
WORKFLOW_PARTS = ("Snakefile", "config.yaml", "rules", "workflow_scripts", "kidney_seg", "report", "envs")
DETERMINISTIC_EPOCHS = 12  # of 3 steps: long enough for a kill to land mid-training


# ----------------------------------------------------------------------------- configs


def tiny_config(root: Path) -> dict:
    """The tiny phantom config with its data and results under ``root``."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["results_dir"] = str(root / "results")
    cfg["dataset"]["root"] = str(root / "data")
    return cfg


def write_config(root: Path, cfg: dict) -> Path:
    """Write ``cfg`` to ``root/config.yaml``; ``root`` is also the run's working directory."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def deterministic_config(root: Path) -> Path:
    """The tiny config with ``deterministic: true`` and 12 epochs, its data and results under ``root``.

    A patience of 2 epochs makes ReduceLROnPlateau cut the learning rate during the run, so
    a resumed run must restore the callback's counters to repeat the schedule.
    """
    cfg = tiny_config(root)
    cfg["deterministic"] = True
    cfg["training"].update(epochs=DETERMINISTIC_EPOCHS, lr_patience=2, lr_factor=0.5)
    return write_config(root, cfg)


# ----------------------------------------------------------------------------- invocations


def snakemake_env(snakefile: Path = SNAKEFILE) -> dict:
    """This interpreter's environment first on PATH; a copied workflow's library first on PYTHONPATH."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if snakefile.parent != REPO:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(snakefile.parent), os.environ.get("PYTHONPATH")) if p)
    return env


def snakemake_command(config: Path, *args: str, snakefile: Path = SNAKEFILE) -> list[str]:
    """The command line of a run of ``config`` in its own folder (``args`` first: targets go there)."""
    return [
        SNAKEMAKE,
        *args,
        "--snakefile",
        str(snakefile),
        "--directory",
        str(config.parent),
        "--configfile",
        str(snakefile.parent / "config.yaml"),
        str(config),
    ]


def snakemake(
    config: Path, *args: str, check: bool = True, snakefile: Path = SNAKEFILE, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run snakemake on ``config`` in its own working directory; raise with its output if ``check`` and it fails."""
    proc = subprocess.run(
        snakemake_command(config, *args, snakefile=snakefile),
        cwd=config.parent,
        env=snakemake_env(snakefile),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def start_snakemake(config: Path, *args: str, log: Path, snakefile: Path = SNAKEFILE) -> subprocess.Popen:
    """Start snakemake on ``config`` in the background, in its own process group, output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            snakemake_command(config, *args, snakefile=snakefile),
            cwd=config.parent,
            env=snakemake_env(snakefile),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a background invocation's process group (snakemake and its jobs) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def wait_for(ready: Callable[[], bool], proc: subprocess.Popen, what: str, log: Path, timeout: float = 600) -> None:
    """Poll ``ready()`` until true; fail if ``proc`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def holds_lock(config: Path) -> bool:
    """Whether a lock file in the run's working directory lists one of its results."""
    locks = config.parent / ".snakemake" / "locks"
    needle = str(config.parent / "results")
    for lockfile in locks.glob("*.lock") if locks.is_dir() else []:
        try:
            if needle in lockfile.read_text():
                return True
        except OSError:  # removed meanwhile
            continue
    return False


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow and its library to ``dest``; return the copy's Snakefile."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            shutil.copy2(source, dest / part)
    return dest / "Snakefile"


def planned_jobs(config: Path, *extra: str, snakefile: Path = SNAKEFILE) -> set[str]:
    """Rule names a dry run would execute."""
    out = snakemake(config, "-n", "--quiet", "rules", *extra, snakefile=snakefile).stdout
    rows = [line.split() for line in out.splitlines()]
    return {r[0] for r in rows if len(r) == 2 and r[1].isdigit() and r[0] != "total"}


# ----------------------------------------------------------------------------- comparing results


def keras_weights(path: Path) -> dict[str, np.ndarray]:
    """Every array of a .keras archive's weights file, by its name there (the archive itself holds timestamps)."""
    import h5py

    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
        weights.visititems(
            lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
        )
    return arrays


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _files(results: Path, pattern: str) -> list[Path]:
    """Result files (not hidden temporary ones) matching ``pattern``, relative to ``results``."""
    return sorted(p.relative_to(results) for p in results.glob(pattern) if not p.name.startswith("."))


def differences(a: Path, b: Path) -> list[str]:
    """What differs, bit for bit, between two results folders (empty: nothing).

    Compared: split.csv's bytes; every array of the slice caches; every weight array of
    every .keras file under model/ (published models and checkpoints); the training
    history but its timings; every prediction's voxels and affine (gzip headers hold
    mtimes); per_case.csv and summary.csv.
    """
    import nibabel as nib

    found = []
    if (a / "split.csv").read_bytes() != (b / "split.csv").read_bytes():
        found.append("split.csv")
    for pattern in ("preprocessed/*/*.npy", "model/**/*.keras", "raw_predictions/*.nii.gz", "predictions/*.nii.gz"):
        if _files(a, pattern) != _files(b, pattern):
            found.append(f"{pattern}: {_files(a, pattern)} != {_files(b, pattern)}")
    for rel in _files(a, "preprocessed/*/*.npy"):
        if (b / rel).is_file() and not _same_array(np.load(a / rel), np.load(b / rel)):
            found.append(str(rel))
    for rel in _files(a, "model/**/*.keras"):
        if not (b / rel).is_file():
            continue
        wa, wb = keras_weights(a / rel), keras_weights(b / rel)
        bad = sorted(k for k in wa.keys() | wb.keys() if k not in wa or k not in wb or not _same_array(wa[k], wb[k]))
        if bad:
            found.append(f"{rel}: {len(bad)} of {len(wa)} weight arrays, e.g. {bad[:3]}")
    for rel in _files(a, "model/fold_*/history.csv"):
        ha, hb = (pd.read_csv(r / rel).drop(columns=list(TIMING_COLUMNS)) for r in (a, b))
        if not ha.equals(hb):
            found.append(f"{rel}:\n{ha.compare(hb) if ha.shape == hb.shape else (ha.shape, hb.shape)}")
    for rel in _files(a, "raw_predictions/*.nii.gz") + _files(a, "predictions/*.nii.gz"):
        if not (b / rel).is_file():
            continue
        ia, ib = nib.load(str(a / rel)), nib.load(str(b / rel))
        va, vb = np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)
        if not _same_array(va, vb) or not np.array_equal(ia.affine, ib.affine):
            found.append(f"{rel}: {int((va != vb).sum()) if va.shape == vb.shape else 'shape'} voxels differ")
    for name in ("per_case.csv", "summary.csv"):
        ma, mb = (pd.read_csv(r / "metrics" / name) for r in (a, b))
        if not ma.equals(mb):
            found.append(f"metrics/{name}")
    return found


# ----------------------------------------------------------------------------- the shared runs


@dataclass(frozen=True)
class TinyRun:
    """The deterministic tiny config run once, uninterrupted, from a copy of the workflow (so that a test may
    edit the copy's library)."""

    results: Path
    config: Path
    data: Path
    snakefile: Path


def make_deterministic_runs(root: Path) -> tuple[TinyRun, InterruptedRun]:
    """The uninterrupted reference (2 cores, in the background, from a copy of the workflow) and, meanwhile,
    the interrupted run (1 core, the working tree's workflow).

    Deterministic runs use one compute thread, so the two side by side take little longer than one.
    """
    snakefile = copy_workflow(root / "workflow")
    config = deterministic_config(root / "reference")
    log = root / "reference.log"
    reference = start_snakemake(config, "--cores", "2", log=log, snakefile=snakefile)
    try:
        interrupted = make_interrupted_run(root / "interrupted")
        rc = reference.wait(timeout=900)
    finally:
        kill_group(reference)
    assert rc == 0, f"the reference run failed (rc {rc}):\n{log.read_text()[-6000:]}"
    tiny = TinyRun(root / "reference" / "results", config, root / "reference" / "data", snakefile)
    return tiny, interrupted


def history_rows(path: Path) -> int:
    """Rows written so far to a history CSV (0 while absent or empty)."""
    try:
        return len(pd.read_csv(path))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


@dataclass
class InterruptedRun:
    """What was seen while the deterministic run was killed twice and finished (see :func:`make_interrupted_run`)."""

    results: Path
    epoch_at_training_kill: int | None = None  # checkpoint epoch right after the kill during training
    epoch_a_second_later: int | None = None  # the same a second later (no train job outlived the kill)
    model_after_training_kill: bool = False
    lock_seconds: float = 0.0  # how long the second, identical invocation took to give up
    lock_rc: int | None = None
    lock_output: str = ""
    first_running_when_second_ended: bool = False
    model_after_prediction_kill: bool = False
    raw_predictions_after_prediction_kill: int = 0
    metrics_after_prediction_kill: bool = False
    train_log_before_finish: str = ""
    model_bytes_before_finish: bytes = b""


def make_interrupted_run(root: Path) -> InterruptedRun:
    """The deterministic config on 1 core (the reference uses 2), killed and resumed along the way.

    1. SIGKILL of snakemake's process group once two epochs are in the training checkpoint.
    2. Unlock, rerun with --rerun-incomplete: training resumes. While it trains, an identical
       second invocation is started and must stop on Snakemake's lock. Once a predict job
       has started, SIGKILL again.
    3. Unlock, rerun to the end.
    """
    config = deterministic_config(root)
    run = InterruptedRun(root / "results")
    fold = run.results / "model" / "fold_0"
    last = fold / "checkpoint" / "last.keras"
    train_log = run.results / "logs" / "train" / "fold_0.log"
    args = ("--cores", "1", "--rerun-incomplete")
    from kidney_seg.checkpoint import checkpoint_epoch

    first = start_snakemake(config, *args, log=root / "killed-in-training.log")
    try:
        wait_for(
            lambda: history_rows(fold / "checkpoint" / "history.csv") >= 2,
            first,
            "two epochs of training",
            root / "killed-in-training.log",
        )
    finally:
        kill_group(first)
    run.epoch_at_training_kill = checkpoint_epoch(last)
    time.sleep(1)
    run.epoch_a_second_later = checkpoint_epoch(last)
    run.model_after_training_kill = (fold / "model.keras").exists()
    assert run.epoch_at_training_kill is not None, "the kill landed before the first checkpoint"

    snakemake(config, "--unlock", "--cores", "1")
    resumed_from = f"epochs {run.epoch_at_training_kill + 1}-"
    log = root / "resumed.log"
    resumed = start_snakemake(config, *args, log=log)
    try:
        wait_for(
            lambda: holds_lock(config) and train_log.is_file() and resumed_from in train_log.read_text(),
            resumed,
            "resumed training",
            log,
        )
        start = time.monotonic()
        second = start_snakemake(config, *args, log=root / "second.log")
        try:
            second.wait(timeout=300)
        finally:
            kill_group(second)
        run.lock_seconds = time.monotonic() - start
        run.first_running_when_second_ended = resumed.poll() is None
        run.lock_rc = second.returncode
        run.lock_output = (root / "second.log").read_text()
        wait_for(lambda: any((run.results / "logs" / "predict").glob("*.log")), resumed, "predict job", log)
    finally:
        kill_group(resumed)
    run.model_after_prediction_kill = (fold / "model.keras").is_file()
    run.raw_predictions_after_prediction_kill = len(list((run.results / "raw_predictions").glob("*.nii.gz")))
    run.metrics_after_prediction_kill = (run.results / "metrics" / "per_case.csv").exists()
    run.train_log_before_finish = train_log.read_text()
    run.model_bytes_before_finish = (fold / "model.keras").read_bytes() if run.model_after_prediction_kill else b""

    snakemake(config, "--unlock", "--cores", "1")
    snakemake(config, *args)
    return run
