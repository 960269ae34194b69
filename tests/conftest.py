"""Shared fixtures: small synthetic volumes and the real KiTS label headers."""

from __future__ import annotations

import os

# NumPy asks the kernel for transparent huge pages on every large array (madvise). Where the kernel then
# compacts memory on the page fault (transparent_hugepage/defrag "madvise", as on the 2-vCPU hosts these tests
# are timed on), the tests that make many large arrays wait in the kernel, by how much depending on the host's
# memory at the time: test_report, test_phantom and test_kits_metrics on one core took 46.5 s with it and 36 s
# without (two pairs, 14:50), then 64 s and 60 s (two pairs, 15:10; Intel Xeon, 2026-12-03).
# Read by NumPy when it is imported, so set first; a value given by the caller is kept.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

# Under pytest-xdist each worker is one process of several on a few cores: BLAS and OpenMP threads beyond one
# per worker only contend (OpenBLAS spins while it waits). Set before NumPy loads OpenBLAS; a value given by
# the caller is kept.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import gc  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Collection imports TensorFlow and Keras (about 450,000 long-lived objects): the collector held back from here
# on (as kidney_seg.environment.import_framework does for a job) saves about a second of each worker's collection.
gc.set_threshold(50_000, 50, 50)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests run on the CPU, on any machine (no test may need a GPU): GPUs are hidden before anything imports
# TensorFlow, from this process and from the subprocesses and workflow runs it starts.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def kits_affine(spacing=(3.0, 0.8, 0.8)) -> np.ndarray:
    """The KiTS19 header convention: axis codes (I, P, L), slices on axis 0."""
    s0, s1, s2 = spacing
    return np.array([[0, 0, -s2, 0], [0, -s1, 0, 0], [-s0, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 1) -> Path:
    """Write a NIfTI file with given qform/sform codes."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, qcode)
    img.set_sform(affine, scode)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def dotted_name(node) -> str:
    """``a.b.c`` of an ast Name/Attribute chain, '' for anything else (for the static source audits)."""
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


@pytest.fixture
def kits_labels_dir() -> Path:
    """The real KiTS19 label files in ../shared/data, or skip."""
    d = SHARED_DATA / "kits19-labels"
    if not d.is_dir():
        pytest.skip(f"real KiTS labels not found at {d} (../shared/data is absent)")
    return d


# ----------------------------------------------------------------------------- the shared whole-workflow runs
# Made once per session, and so once per pytest-xdist worker: every test that uses them lives in
# tests/test_workflow.py, and `make test` distributes by file (--dist loadfile). (--dist loadgroup with
# xdist_group marks would be the finer tool, but pytest-xdist 3.8 cannot tag node ids under pytest 9.2, so
# its groups are ignored.)


@pytest.fixture(scope="session")
def deterministic_runs(tmp_path_factory):
    """(TinyRun, InterruptedRun): the two deterministic runs of the tiny pipeline, made side by side."""
    from tests.workflow_runs import make_deterministic_runs

    return make_deterministic_runs(tmp_path_factory.mktemp("deterministic"))


@pytest.fixture(scope="session")
def tiny_run(deterministic_runs):
    """The uninterrupted deterministic run (2 cores) of tests/configs/tiny.yaml, from a copy of the workflow:
    read-only for tests, but for the copy's library, which a test may edit and restore."""
    import pandas as pd

    run = deterministic_runs[0]
    assert pd.read_csv(run.results / "model" / "fold_0" / "history.csv")["lr"].nunique() > 1, "the rate was never cut"
    return run


@pytest.fixture(scope="session")
def deterministic_reference(tiny_run) -> Path:
    """The results folder of the uninterrupted deterministic run."""
    return tiny_run.results


@pytest.fixture(scope="session")
def interrupted_run(deterministic_runs):
    """The deterministic run on 1 core, killed in training, resumed (meeting a second invocation on the lock),
    killed in prediction and finished: what was seen along the way (tests/workflow_runs.InterruptedRun)."""
    return deterministic_runs[1]


@pytest.fixture
def server():
    """A scriptable HTTP server on 127.0.0.1 (tests/http_server.py); yields (base URL, handler class)."""
    from tests.http_server import serve

    with serve() as running:
        yield running


def pytest_collection_finish(session) -> None:
    """Freeze what collection imported (TensorFlow and Keras: about half a million objects), which lives for the
    session: Python's full garbage collections, tens of them in a worker, then skip it. Tracing a Keras model
    allocates millions of short-lived objects: the young generation of 50,000 set above instead of 700 collects
    it about a tenth less often in time (test_training.py and test_schedules.py: 51 s instead of 55 s on one
    core)."""
    import atexit

    gc.freeze()
    atexit.register(gc.freeze)  # and no last full collection when the worker exits


#: The files of the most CPU time outside the whole-workflow tests, slowest first (seconds on one core, measured
#: December 2026): handed out first, after the whole-workflow tests, so that both workers end on short files.
SLOW_FILES = (
    "test_training.py",  # ~48
    "test_phantom.py",  # ~19
    "test_schedules.py",  # ~16
    "test_kits_metrics.py",  # ~16
    "test_backends.py",  # ~15
    "test_browser.py",  # ~10
    "test_atomic.py",  # ~9
    "test_model.py",  # ~8
    "test_sampling.py",  # ~7
    "test_report.py",  # ~6
    "test_dry_run.py",  # ~5
    "test_slurm.py",  # ~4 (tests/cluster: its profile checks; the cluster runs themselves are `make cluster-test`)
)


def pytest_collection_modifyitems(config, items) -> None:
    """Whole-workflow tests first, then SLOW_FILES (a stable sort): under pytest-xdist the slowest files start
    first, not last."""

    def rank(item) -> tuple[bool, int]:
        name = item.path.name
        return item.get_closest_marker("workflow") is None, SLOW_FILES.index(name) if name in SLOW_FILES else 99

    items.sort(key=rank)
