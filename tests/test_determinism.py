"""With ``deterministic: true`` two runs of the tiny pipeline give bitwise-identical results.

The session-scoped :func:`deterministic_reference` run is also what the kill-and-resume
tests in tests/test_resume.py compare with, so the whole pipeline runs once for all.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from tests.test_workflow import SNAKEMAKE, snakemake

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")
EPOCHS = 12  # of 3 steps: long enough for a kill to land mid-training


def deterministic_config(root: Path) -> Path:
    """The tiny config with ``deterministic: true``, its data and results under ``root``.

    A patience of 2 epochs makes ReduceLROnPlateau cut the learning rate during the run, so
    a resumed run must restore the callback's counters to repeat the schedule.
    """
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["deterministic"] = True
    cfg["results_dir"] = str(root / "results")
    cfg["dataset"]["root"] = str(root / "data")
    cfg["training"].update(epochs=EPOCHS, lr_patience=2, lr_factor=0.5)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


_REFERENCE: list[Path] = []  # shared by every module that uses the fixture (a fixture is cached per defining module)


@pytest.fixture(scope="session")
def deterministic_reference(tmp_path_factory) -> Path:
    """The results folder of one uninterrupted deterministic run of the tiny pipeline (2 cores), made once per session."""
    if not _REFERENCE:
        cfg = deterministic_config(tmp_path_factory.mktemp("deterministic_reference"))
        snakemake("--cores", "2", "--configfile", str(cfg))
        results = cfg.parent / "results"
        assert pd.read_csv(results / "model" / "fold_0" / "history.csv")["lr"].nunique() > 1, "the rate was never cut"
        _REFERENCE.append(results)
    return _REFERENCE[0]


def keras_weights(path: Path) -> dict[str, np.ndarray]:
    """Every array of a .keras archive's weights file, by its name there (the archive itself holds timestamps)."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
        weights.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
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
        ha, hb = (pd.read_csv(r / rel).drop(columns="seconds") for r in (a, b))
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


def test_two_deterministic_runs_are_bitwise_identical(deterministic_reference, tmp_path):
    cfg = deterministic_config(tmp_path)
    # one core here, two in the reference: deterministic runs use one compute thread whatever --cores says
    snakemake("--cores", "1", "--configfile", str(cfg))
    assert differences(deterministic_reference, tmp_path / "results") == []
    for log in ("train/fold_0.log", *(f"predict/{p.name[:-7]}.log" for p in (tmp_path / "results" / "raw_predictions").iterdir())):
        assert "deterministic: seed 42, backend tensorflow" in (tmp_path / "results" / "logs" / log).read_text(), log


def test_differences_sees_a_flipped_bit(deterministic_reference, tmp_path):
    import shutil

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
