"""Tests for kidney_seg.environment: git commit, host description, package versions, accelerators."""

from __future__ import annotations

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
