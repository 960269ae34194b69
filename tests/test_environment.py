"""Tests for kidney_seg.environment: git commit, host description, package versions, accelerators."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kidney_seg import environment as envmod
from tests.conftest import REPO

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


def _git(path, *args):
    return subprocess.run(
        [GIT, "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repository with one commit; git may not look above tmp_path."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    path = tmp_path / "repo"
    path.mkdir()
    (path / "a.txt").write_text("one\n")
    _git(path, "init", "-q")
    _git(path, "add", "a.txt")
    _git(path, "commit", "-q", "-m", "first")
    return path


@needs_git
def test_git_commit_of_a_clean_repo(repo):
    info = envmod.git_commit(repo)
    assert info["commit"] == _git(repo, "rev-parse", "HEAD") and len(info["commit"]) == 40
    assert info["dirty"] is False
    assert info["branch"] == _git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    (repo / "sub").mkdir()
    assert envmod.git_commit(repo / "sub") == info  # any folder inside the work tree


@needs_git
def test_git_commit_dirty_flag(repo):
    (repo / "untracked.txt").write_text("new\n")
    assert envmod.git_commit(repo)["dirty"] is False  # untracked files do not count
    (repo / "a.txt").write_text("two\n")
    assert envmod.git_commit(repo)["dirty"] is True
    _git(repo, "add", "a.txt")
    assert envmod.git_commit(repo)["dirty"] is True  # staged, not committed


@needs_git
def test_git_commit_none_outside_a_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    (tmp_path / "plain").mkdir()
    assert envmod.git_commit(tmp_path / "plain") is None
    assert envmod.git_commit(tmp_path / "does-not-exist") is None
    _git(tmp_path / "plain", "init", "-q")  # a repository without a commit
    assert envmod.git_commit(tmp_path / "plain") is None


def test_git_commit_none_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert envmod.git_commit(REPO) is None


def test_describe_environment_keys():
    env = envmod.describe_environment(accelerators=False)
    assert {
        "created",
        "hostname",
        "platform",
        "python",
        "cpu_model",
        "cpu_count",
        "memory_gb",
        "packages",
        "keras_backend",
        "accelerators",
    } <= set(env)
    assert env["accelerators"] is None  # not queried
    assert env["cpu_count"] == os.cpu_count() and env["cpu_model"]
    assert env["python"].endswith(".".join(map(str, sys.version_info[:3])))
    assert env["packages"]["numpy"] == np.__version__
    assert env["packages"]["kidney-seg"]
    assert "not-a-package" not in envmod.package_versions(("numpy", "not-a-package"))
    json.dumps(env)  # JSON-ready


def test_describe_environment_imports_no_framework():
    code = (
        "import sys, kidney_seg.environment as e; e.describe_environment(accelerators=False); "
        "print(sorted(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cpu_model_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Test 9999\n")
    assert envmod.cpu_model(cpuinfo) == "Intel(R) Xeon(R) Test 9999"
    assert envmod.cpu_model(tmp_path / "missing")  # falls back to platform, never empty


def test_keras_backend_without_importing_keras(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert envmod.keras_backend() == "jax"
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "torch"}))
    assert envmod.keras_backend() == "torch"
    (tmp_path / "keras.json").unlink()
    assert envmod.keras_backend() == "tensorflow"


def test_write_environment(tmp_path):
    out = tmp_path / "model" / "fold_0" / "environment.json"
    env = envmod.write_environment(out, accelerators=False)
    assert json.loads(out.read_text()) == env
    assert not list(out.parent.glob(".environment.json.*"))  # no temporary file left


def test_accelerator_probe_failure_is_recorded(monkeypatch):
    def boom(backend=None):
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(envmod, "accelerator_devices", boom)
    env = envmod.describe_environment(accelerators=True)
    assert env["accelerators"] == [] and "driver exploded" in env["accelerator_error"]


def _accelerators_in_subprocess(backend: str, **extra_env) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", **extra_env}
    code = "import json, kidney_seg.environment as e; print('ENV', json.dumps(e.describe_environment(True)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("ENV "))[4:])


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")
def test_tensorflow_accelerators_on_cpu_are_an_empty_list():
    # in this process: the tests' own backend, TensorFlow, with the GPUs hidden by tests/conftest.py
    import tensorflow  # noqa: F401  (imported by the collection of a full run already)

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    env = envmod.describe_environment(True)
    assert env["keras_backend"] == "tensorflow"
    assert env["accelerators"] == [] and "accelerator_error" not in env
    assert env["env"]["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_jax_accelerators_on_cpu_are_an_empty_list():
    env = _accelerators_in_subprocess("jax", JAX_PLATFORMS="cpu")
    assert env["keras_backend"] == "jax"
    assert env["accelerators"] == [] and "accelerator_error" not in env


# ----------------------------------------------------------------------------- the device of a GPU job

H200 = {"name": "NVIDIA H200", "kind": "GPU", "id": "/physical_device:GPU:0"}


def test_a_gpu_job_without_a_gpu_stops_with_the_install_command():
    """With the GPUs hidden (tests/conftest.py), a job that may not use the CPU fails in one line saying what to do."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(envmod.NoAcceleratorError) as caught:
        envmod.require_device("train", allow_cpu=False, backend="tensorflow")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("train: the Keras backend tensorflow sees no GPU")
    assert "make install GPU=1" in message and "pip install -e '.[gpu]'" in message and "allow_cpu: true" in message


def test_allow_cpu_runs_on_the_cpu_and_logs_it(caplog):
    caplog.set_level("INFO", logger="kidney_seg.environment")
    assert envmod.require_device("predict", allow_cpu=True, backend="tensorflow") == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("predict runs on CPU ") and "usable cores" in line and "allow_cpu is true" in line


def test_a_visible_gpu_is_logged_whatever_allow_cpu_says(monkeypatch, caplog):
    monkeypatch.setattr(envmod, "accelerator_devices", lambda backend=None: [H200])
    caplog.set_level("INFO", logger="kidney_seg.environment")
    for allow_cpu in (False, True):
        assert envmod.require_device("train", allow_cpu=allow_cpu, backend="jax") == [H200]
    assert [r.getMessage() for r in caplog.records] == [
        "train runs on GPU NVIDIA H200 (/physical_device:GPU:0) (Keras backend jax)"
    ] * 2


class _Job:
    """What Snakemake hands a script as ``snakemake``: only what the scripts read before the device check."""

    def __init__(self, log, allow_cpu: bool):
        self.log = [str(log)]
        self.params = type("Params", (), {"allow_cpu": allow_cpu, "deterministic": False})()


@pytest.mark.parametrize("script", ["train", "predict"])
def test_the_gpu_rules_scripts_stop_before_any_work_without_a_gpu(script, tmp_path):
    """workflow_scripts/{train,predict}.py with allow_cpu false on this GPU-less host: the error, in the job's log."""
    import runpy

    log = tmp_path / f"{script}.log"
    with pytest.raises(envmod.NoAcceleratorError, match="make install GPU=1"):
        runpy.run_path(str(REPO / "workflow_scripts" / f"{script}.py"), {"snakemake": _Job(log, allow_cpu=False)})
    assert f"failed: {script}: the Keras backend tensorflow sees no GPU" in log.read_text()


def test_the_gpu_install_path():
    """`make install GPU=1` installs the `gpu` extra: TensorFlow with its CUDA libraries, as pinned as the CPU build."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (cpu,) = [d for d in project["dependencies"] if d.startswith("tensorflow")]
    assert project["optional-dependencies"]["gpu"] == [cpu.replace("tensorflow", "tensorflow[and-cuda]", 1)]
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed: the README's set-up needs it")
    plan = subprocess.run(
        [make, "-n", "-B", "install", "GPU=1", "PYTHON=python3"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert 'pip install --quiet -e ".[test,lint,gpu]"' in plan.stdout, plan.stdout
    plain = subprocess.run([make, "-n", "-B", "install", "PYTHON=python3"], cwd=REPO, capture_output=True, text=True)
    assert 'pip install --quiet -e ".[test,lint]"' in plain.stdout, plain.stdout


def test_import_framework_holds_the_collector_back_then_freezes_and_restores_it(monkeypatch):
    import keras  # noqa: F401  (first: its own exit handlers stay real)

    frozen_under: list[tuple[int, ...]] = []
    at_exit: list = []
    monkeypatch.setattr(envmod.gc, "freeze", lambda: frozen_under.append(gc.get_threshold()))
    monkeypatch.setattr(envmod.atexit, "register", at_exit.append)
    before = gc.get_threshold()
    gc.set_threshold(700, 11, 12)
    try:
        envmod.import_framework()
        after = gc.get_threshold()
    finally:
        gc.set_threshold(*before)
    assert frozen_under == [(envmod.IMPORT_GC_THRESHOLD, 11, 12)]  # frozen once, while still held back
    assert after == (700, 11, 12)  # the caller's thresholds again
    assert len(at_exit) == 1
    at_exit[0]()
    assert len(frozen_under) == 2  # at exit: frozen again, so no last full collection
