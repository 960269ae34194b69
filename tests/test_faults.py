"""Faults (issue "Faults"): a full disk, and two invocations of the workflow at once.

Disk full: an output that cannot be written fails with an error naming that output (errno
kept, original chained) and leaves nothing truncated behind: once simulated (a serialiser
that writes some bytes, then raises ENOSPC, EDQUOT, EROFS...), once for real on a 512 KiB
tmpfs mounted for the test (root only; skipped with the reason otherwise).

Two invocations: the tiny pipeline runs in the background from the repository root; once
it holds Snakemake's lock and a job runs, an identical second invocation must stop at once
with Snakemake's lock error while the first finishes with complete outputs.
"""

from __future__ import annotations

import errno
import gc
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from kidney_seg.atomic import OutputWriteError, save_npy_atomic, write_json_atomic

from kidney_seg.volume import save_like, save_nifti
from kidney_seg.split import write_split
from tests.conftest import REPO, kits_affine, write_nifti
from tests.test_atomic import MARK, FailingSerialiser

# ----------------------------------------------------------------------------- disk full, simulated

CODES = {"ENOSPC": errno.ENOSPC, "EDQUOT": errno.EDQUOT, "EROFS": errno.EROFS, "EFBIG": errno.EFBIG}


def _big_volume() -> np.ndarray:
    """About 1 MiB of incompressible float32."""
    return np.random.default_rng(0).normal(size=(16, 128, 128)).astype(np.float32)


def _writes(folder: Path):
    """name -> (serialiser the data goes through, output path, the write)."""
    ref = folder / "ref.nii.gz"
    return {
        "nifti": ("nib.save", folder / "vol.nii.gz", lambda: save_nifti(folder / "vol.nii.gz", _big_volume(), kits_affine())),
        "nifti_like": ("nib.save", folder / "pred.nii.gz",
                       lambda: save_like(folder / "pred.nii.gz", np.ones((4, 8, 8), np.uint8), ref)),
        "json": ("Path.write_text", folder / "big.json",
                 lambda: write_json_atomic(folder / "big.json", {"values": np.arange(200_000).tolist()})),
        "npy": ("np.save", folder / "arr.npy", lambda: save_npy_atomic(folder / "arr.npy", _big_volume())),
        "csv": ("DataFrame.to_csv", folder / "split.csv",
                lambda: write_split(pd.DataFrame({"case_id": [f"case_{i:05d}" for i in range(60_000)], "subset": "train"}),
                                    folder / "split.csv")),
    }


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
@pytest.mark.parametrize("what", ["nifti", "nifti_like", "json", "npy", "csv"])
def test_simulated_disk_full_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, what, code):
    write_nifti(tmp_path / "ref.nii.gz", np.zeros((4, 8, 8), np.int16), kits_affine())
    (tmp_path / "keep.txt").write_text("was here before")
    serialiser, target, write = _writes(tmp_path)[what]
    before = _listing(tmp_path)
    fault = FailingSerialiser(monkeypatch, serialiser, make_error=lambda: OSError(code, os.strerror(code)))
    with pytest.raises(OSError) as info:
        write()
    err = info.value
    assert isinstance(err, OutputWriteError) and err.errno == code and err.__cause__ is fault.raised
    assert str(target) in str(err) and os.strerror(code) in str(err)
    assert _listing(tmp_path) == before  # no output, no temporary file, the other files untouched


# ----------------------------------------------------------------------------- disk full, for real

SMALL_FS = "512k"


@pytest.fixture
def small_fs(tmp_path):
    """A 512 KiB tmpfs mounted for the test (root only), unmounted afterwards."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the simulated disk-full tests cover the logic")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount not available")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS},mode=0755", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (container without CAP_SYS_ADMIN?): {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        gc.collect()  # close any file object an aborted serialiser left open
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def _free_blocks(path: Path) -> int:
    gc.collect()
    return os.statvfs(path).f_bfree


@pytest.mark.parametrize("previous", ["fresh", "existing"])
@pytest.mark.parametrize("what", ["nifti", "json", "npy", "csv"])
def test_real_disk_full_names_the_file_and_leaves_nothing(small_fs, what, previous):
    (small_fs / "keep.txt").write_text("was here before")
    _, target, write = _writes(small_fs)[what]
    if previous == "existing":
        target.write_bytes(b"an earlier complete version")
    before, free = _listing(small_fs), _free_blocks(small_fs)
    with pytest.raises(OSError) as info:
        write()
    err = info.value
    assert err.errno == errno.ENOSPC, err  # np.save reports a short write without errno: atomic_path says ENOSPC
    assert isinstance(err, OutputWriteError) and str(target) in str(err), err
    assert _listing(small_fs) == before  # nothing truncated, no temporary file; an old version is intact
    del info, err  # the traceback's frames hold the serialiser's file object, and with it the unlinked file's space
    assert _free_blocks(small_fs) == free  # the temporary file's space is given back


def test_read_only_file_system_names_the_file(small_fs):
    target = small_fs / "metrics" / "summary.json"
    write_json_atomic(target, {"dice": 0.9})
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True).returncode == 0
    with pytest.raises(OutputWriteError) as info:
        write_json_atomic(target, {"dice": 0.95})
    assert info.value.errno == errno.EROFS and str(target) in str(info.value)
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"dice":0.9}'
    with pytest.raises(OutputWriteError, match=r"new\.nii\.gz"):
        save_nifti(small_fs / "new" / "new.nii.gz", np.zeros((2, 2, 2), np.uint8), np.eye(4))


def test_small_fs_holds_what_fits(small_fs):
    """The limit is real: a small file is written; then a second, large one fails and the first is intact."""
    save_nifti(small_fs / "small.nii.gz", np.zeros((4, 8, 8), np.uint8), kits_affine())
    assert nib.load(str(small_fs / "small.nii.gz")).shape == (4, 8, 8)
    with pytest.raises(OutputWriteError, match="large.npy"):
        save_npy_atomic(small_fs / "large.npy", _big_volume())
    assert sorted(p.name for p in small_fs.iterdir()) == ["small.nii.gz"]
    assert not any(MARK in p.read_bytes() for p in small_fs.iterdir())


# ----------------------------------------------------------------------------- two invocations at once

SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")
LOCKS = REPO / ".snakemake" / "locks"
LOCK_ERROR = "Directory cannot be locked"  # snakemake.exceptions.LockException


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "TF_CPP_MIN_LOG_LEVEL": "2"}


def _tiny_config(root: Path) -> Path:
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["results_dir"] = str(root / "results")
    cfg["dataset"]["root"] = str(root / "data")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _holds_lock(results: Path) -> bool:
    """Whether a lock file under .snakemake/locks lists one of our outputs."""
    needle = str(results)
    for lockfile in LOCKS.glob("*.lock") if LOCKS.is_dir() else []:
        try:
            if needle in lockfile.read_text():
                return True
        except OSError:  # removed meanwhile
            continue
    return False


def _stop(proc: subprocess.Popen) -> None:
    """Stop an invocation we started (its own process group: snakemake and its jobs)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class _LockWatch(threading.Thread):
    """Notices our lock disappearing while the first invocation still runs.

    Snakemake removes the whole .snakemake/locks folder when any invocation in the same
    working directory finishes (persistence/file.py, _delete_locks), so an unrelated run
    that ends at the wrong moment (another test running the workflow from the repository
    root) drops our lock. The test then cannot tell anything and starts over.
    """

    def __init__(self, results: Path, first: subprocess.Popen):
        super().__init__(daemon=True)
        self.results, self.first = results, first
        self.lost = False
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set() and self.first.poll() is None:
            if not _holds_lock(self.results) and self.first.poll() is None:
                self.lost = True
                return
            time.sleep(0.05)


def _attempt(root: Path) -> tuple[str, dict]:
    """One try: ('ok' | 'interfered', details)."""
    root.mkdir(parents=True)
    cfg = _tiny_config(root)
    results = root / "results"
    cmd = [SNAKEMAKE, "--cores", "2", "--configfile", str(cfg)]
    first_log = open(root / "first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=first_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # running: it holds the lock and its training job has started (the longest job, so that the
        # second invocation is not also told about files a just-finished job has not yet released)
        deadline = time.monotonic() + 600
        train_log = results / "logs" / "train" / "fold_0.log"
        while not (_holds_lock(results) and train_log.exists()):
            assert first.poll() is None, f"first invocation ended early:\n{(root / 'first.log').read_text()[-4000:]}"
            assert time.monotonic() < deadline, "first invocation did not reach training within 10 minutes"
            time.sleep(0.2)
        watch = _LockWatch(results, first)
        watch.start()
        t0 = time.monotonic()
        with open(root / "second.log", "w") as second_log:
            second = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=second_log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
            try:
                while second.poll() is None:
                    if watch.lost:  # our lock is gone: whatever the second does now proves nothing
                        time.sleep(1.0)  # it may be printing the lock error right now
                        if second.poll() is None:
                            return "interfered", {}
                    assert time.monotonic() - t0 < 600, "the second invocation neither failed nor finished"
                    time.sleep(0.1)
            finally:
                _stop(second)
        took = time.monotonic() - t0
        first_running = first.poll() is None
        watch.done.set()
        watch.join(1)
        out = (root / "second.log").read_text()
        if LOCK_ERROR not in out and watch.lost:
            return "interfered", {"second": out}
        assert LOCK_ERROR in out, f"second invocation did not hit the lock (rc {second.returncode}):\n{out[-6000:]}"
        assert second.returncode != 0
        assert first_running, "the first invocation had already finished: the test proved nothing"
        assert "Finished job" not in out and "localrule" not in out, "the second invocation ran jobs"
        rc = first.wait(timeout=1200)
        first_log.close()
        log = (root / "first.log").read_text()
        assert rc == 0, f"first invocation failed (rc {rc}):\n{log[-6000:]}"
        return "ok", {"second_seconds": took, "second_output": out, "results": results}
    finally:
        _stop(first)
        first_log.close()


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")
def test_second_invocation_fails_fast_on_the_lock_and_the_first_completes(tmp_path):
    for attempt in range(3):
        status, info = _attempt(tmp_path / f"try{attempt}")
        if status == "ok":
            break
    else:
        pytest.skip("three times another Snakemake run in this working directory removed .snakemake/locks "
                    "(Snakemake deletes the whole folder when a run ends) before the second invocation checked it")
    assert info["second_seconds"] < 120, f"the second invocation took {info['second_seconds']:.0f} s to give up"
    assert "--unlock" in info["second_output"]  # Snakemake's advice in the lock message
    results = info["results"]
    assert (results / "report.html").stat().st_size > 0
    per_case = pd.read_csv(results / "metrics" / "per_case.csv")
    assert len(per_case) >= 1 and per_case["tk_dice"].between(0, 1).all()
    assert "</html>" in (results / "report.html").read_text()
    leftovers = [p for p in results.rglob(".*") if p.is_file()]
    assert not leftovers, f"temporary files left in the results: {leftovers}"
