"""Faults (issue "Faults"): a full disk.

Disk full: an output that cannot be written fails with an error naming that output (errno
kept, original chained) and leaves nothing truncated behind: once simulated (a serialiser
that writes some bytes, then raises ENOSPC, EDQUOT, EROFS...), once for real on a 512 KiB
tmpfs mounted for the test (root only; skipped with the reason otherwise).

Two invocations of the workflow at once (the second must stop on Snakemake's lock) are
checked on the session's interrupted run: tests/test_workflow.py.
"""

from __future__ import annotations

import errno
import gc
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kidney_seg.atomic import OutputWriteError, save_npy_atomic, write_json_atomic
from kidney_seg.split import write_split
from kidney_seg.volume import save_like, save_nifti
from tests.conftest import kits_affine, write_nifti
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
        "nifti": (
            "nib.save",
            folder / "vol.nii.gz",
            lambda: save_nifti(folder / "vol.nii.gz", _big_volume(), kits_affine()),
        ),
        "nifti_like": (
            "nib.save",
            folder / "pred.nii.gz",
            lambda: save_like(folder / "pred.nii.gz", np.ones((4, 8, 8), np.uint8), ref),
        ),
        "json": (
            "Path.write_text",
            folder / "big.json",
            lambda: write_json_atomic(folder / "big.json", {"values": np.arange(200_000).tolist()}),
        ),
        "npy": ("np.save", folder / "arr.npy", lambda: save_npy_atomic(folder / "arr.npy", _big_volume())),
        "csv": (
            "DataFrame.to_csv",
            folder / "split.csv",
            lambda: write_split(
                pd.DataFrame({"case_id": [f"case_{i:05d}" for i in range(60_000)], "subset": "train"}),
                folder / "split.csv",
            ),
        ),
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
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS},mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (container without CAP_SYS_ADMIN?): {proc.stderr.strip()}")
    # Objects older than the test cannot hold its files: frozen, the collections below (up to 1 s each in a
    # worker that holds TensorFlow) look only at the objects the test makes. Thawed afterwards (so is what
    # conftest.py froze after collection): garbage of earlier tests that got frozen with them is collected later.
    gc.freeze()
    try:
        yield mountpoint
    finally:
        gc.collect()  # close any file object an aborted serialiser left open
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        gc.unfreeze()


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
