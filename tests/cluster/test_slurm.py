"""The tiny pipeline through a real SLURM (profiles/slurm), checked against a local run.

Needs a running SLURM whose nodes can see this checkout and the temporary folder (one node on
this machine: tests/cluster/setup_slurm.sh, as root) and snakemake-executor-plugin-slurm
(`pip install -e ".[cluster]"`). `make cluster-test` does all of it. Skipped unless
KIDNEY_SEG_CLUSTER_TEST=1; with it, a missing SLURM, `sinfo` not answering or a missing plugin
fails (the profile check at the top always runs).

The cluster run uses a copy of profiles/slurm/config.yaml changed only where a small test
node must differ (see `ci_profile`): no GPUs (gpu: 0, so no job asks SLURM for one), memory
and threads capped to the node, squeue for job status (no slurmdbd here), quick status polls
and kept SLURM logs. Then:

- every job but `all` went through sbatch: the jobs SLURM itself lists under the run's job
  name (squeue keeps finished jobs for MinJobAge) match, rule by rule, the jobs of a local
  run of the same config (`--cores 2`, no executor); all COMPLETED, none with a GPU request,
  each running the same interpreter (.venv) as the submitting snakemake;
- the outputs equal the local run's: split.csv byte for byte, the slice caches array for
  array (and meta.json), the raw and post-processed predictions label for label, and
  per_case.csv value for value.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = shutil.which("snakemake", path=str(VENV_BIN)) or shutil.which("snakemake")
HOW = (
    "run it with `make cluster-test` (as root: installs and starts a one-node SLURM with "
    "tests/cluster/setup_slurm.sh, then runs pytest tests/cluster with KIDNEY_SEG_CLUSTER_TEST=1)"
)
LOCAL_CORES = 2


def _slurm_state() -> str | None:
    """Why SLURM cannot take jobs, or None when a node is ready."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    if not re.search(r"^(idle|mix|alloc)", out.stdout, re.M):
        return f"no SLURM node is up (sinfo: {out.stdout.split()})"
    return None


def _skip_reason() -> str | None:
    if os.environ.get("KIDNEY_SEG_CLUSTER_TEST") != "1":
        return f"SLURM cluster test: {HOW}"
    if SNAKEMAKE is None:
        return "snakemake is not installed"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return f'snakemake-executor-plugin-slurm is missing: pip install -e ".[cluster]"; {HOW}'
    state = _slurm_state()
    return f"{state}: {HOW}" if state else None


SKIP = _skip_reason()


@pytest.fixture(scope="module")
def slurm() -> None:
    """Skip without KIDNEY_SEG_CLUSTER_TEST=1; with it, anything missing (SLURM, the plugin) is a failure."""
    if SKIP is None:
        return
    if os.environ.get("KIDNEY_SEG_CLUSTER_TEST") == "1":
        pytest.fail(f"KIDNEY_SEG_CLUSTER_TEST=1 but the cluster test cannot run: {SKIP}")
    pytest.skip(SKIP)


def run(cmd: list[str], timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command from the repository root with the .venv first on PATH; (process, seconds)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def node_limits() -> tuple[int, int]:
    """CPUs and memory (MB) of the smallest SLURM node."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True, check=True).stdout
    rows = [tuple(int(v) for v in line.split()) for line in out.splitlines() if line.strip()]
    return min(r[0] for r in rows), min(r[1] for r in rows)


def ci_profile(profile: dict) -> dict:
    """The profile for a small CPU-only test node: every change from profiles/slurm is made here."""
    cpus, mem_mb = node_limits()
    cores = min(LOCAL_CORES, cpus)
    out = json.loads(json.dumps(profile))
    for resources in [out.get("default-resources", {}), *out.get("set-resources", {}).values()]:
        if "gpu" in resources:
            resources["gpu"] = 0  # no GPU here; gpu: 0 adds no --gpus to sbatch/srun
        resources.pop("gpu_model", None)
        resources.pop("slurm_partition", None)  # the test cluster's default partition
        resources.pop("slurm_account", None)
        if "mem_mb" in resources:
            resources["mem_mb"] = min(int(resources["mem_mb"]), mem_mb // max(cpus, 1))
    # the same CPU threads as the local run (train: --cores 2 // 1 fold), within the node
    out["set-threads"] = {rule: min(int(n), cores) for rule, n in out.get("set-threads", {}).items()}
    out.update(
        {
            "slurm-status-command": "squeue",  # no slurmdbd, so sacct has no records
            "slurm-init-seconds-before-status-checks": 2,  # poll every 2 s (+10 s while nothing ends)
            "slurm-keep-successful-logs": True,
        }
    )
    return out


def rule_counts(log: str) -> collections.Counter:
    """Jobs per rule that a snakemake log announces (rule/checkpoint, local or not), without `all`."""
    names = re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", log, re.M)
    return collections.Counter(n for n in names if n != "all")


def write_config(root: Path, name: str) -> Path:
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["results_dir"] = str(root / name / "results")
    cfg["dataset"]["root"] = str(root / name / "data")
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """The tiny config run locally and through SLURM; (root, local log, cluster log, SLURM run ID)."""
    root = tmp_path_factory.mktemp("cluster")
    local_cfg, slurm_cfg = write_config(root, "local"), write_config(root, "slurm")

    local, local_s = run([SNAKEMAKE, "--cores", str(LOCAL_CORES), "--configfile", str(local_cfg)], timeout=900)
    assert local.returncode == 0, f"local run failed:\n{local.stderr[-6000:]}"

    profile_dir = root / "profile"
    profile_dir.mkdir()
    (profile_dir / "config.yaml").write_text(yaml.safe_dump(ci_profile(yaml.safe_load(PROFILE.read_text()))))
    slurm_logs = root / "slurm_logs"
    cluster, cluster_s = run(
        [
            SNAKEMAKE,
            "--workflow-profile",
            str(profile_dir),
            "--configfile",
            str(slurm_cfg),
            "--slurm-logdir",
            str(slurm_logs),
        ],
        timeout=1500,
    )
    print(f"\n[cluster-test] local run (--cores {LOCAL_CORES}): {local_s:.0f} s; SLURM run: {cluster_s:.0f} s")
    if cluster.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(slurm_logs.rglob("*.log"))[-3:])
        raise AssertionError(f"SLURM run failed:\n{cluster.stderr[-8000:]}\n{logs}")
    run_id = re.search(r"SLURM run ID: (\S+)", cluster.stderr)
    assert run_id, cluster.stderr[-3000:]
    return root, local.stderr, cluster.stderr, run_id.group(1)


def test_profile_gives_gpus_to_train_and_predict_only():
    """profiles/slurm itself (no SLURM needed): GPUs for train and predict only, memory and time for all,
    and only rule names the workflow has (set-resources silently ignores an unknown rule)."""
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    res = profile["set-resources"]
    assert res["train"]["gpu"] == 1 and res["predict"]["gpu"] == 1
    assert all("gpu" not in r for rule, r in res.items() if rule not in ("train", "predict"))
    assert {"mem_mb", "runtime"} <= set(profile["default-resources"])
    assert all(isinstance(r.get("runtime", 0), int) for r in res.values())  # minutes
    assert profile["set-threads"]["preprocess"] >= 1
    assert set(res) | set(profile["set-threads"]) <= rule_names(), "profile names a rule the workflow lacks"


def rule_names() -> set[str]:
    """The workflow's rules for the phantom source and for a KiTS source (the two have different download rules)."""
    names: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for source in ("phantom", "kits19"):
            config = Path(tmp) / f"{source}.yaml"
            config.write_text(yaml.safe_dump({"dataset": {"source": source, "root": f"{tmp}/data"}}))
            proc, _ = run(
                [
                    SNAKEMAKE,
                    "--list-rules",
                    "--configfile",
                    str(REPO / "tests" / "configs" / "tiny.yaml"),
                    str(config),
                    "--config",
                    f"results_dir={tmp}/results",
                ],
                timeout=120,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            names |= set(proc.stdout.split())
    return names


def squeue_jobs(run_id: str) -> list[dict]:
    """SLURM's own record of the run's jobs (finished ones stay listed for MinJobAge)."""
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--name", run_id, "-o", "%i|%T|%k|%b"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = []
    for line in out.splitlines():
        job_id, state, comment, gres = line.split("|")
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]
        script = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True)
        jobs.append(
            {
                "id": job_id,
                "state": state,
                "rule": rule,
                "gres": gres,
                "tres": subprocess.run(
                    ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True
                ).stdout,
                "script": script.stdout,
            }
        )
    return jobs


@pytest.mark.workflow
def test_every_job_went_through_sbatch(runs):
    _, local_log, cluster_log, run_id = runs
    expected = rule_counts(local_log)
    assert expected["train"] == 1 and expected["preprocess"] >= 1, expected
    # the cluster run ran nothing itself but the target rule `all`
    local_jobs = set(re.findall(r"^local(?:rule|checkpoint) (\w+):$", cluster_log, re.M))
    assert local_jobs <= {"all"}, f"jobs run outside SLURM: {local_jobs}"
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", cluster_log)
    assert len(submitted) == sum(expected.values()), (len(submitted), expected)

    jobs = squeue_jobs(run_id)
    assert sorted(j["id"] for j in jobs) == sorted(submitted)
    assert collections.Counter(j["rule"] for j in jobs) == expected
    assert all(j["state"] == "COMPLETED" for j in jobs), [(j["rule"], j["state"]) for j in jobs]
    for job in jobs:
        assert job["gres"] in ("", "(null)", "N/A"), job["gres"]
        assert "gpu" not in job["tres"].lower(), job["tres"]
        # the job runs `<this .venv's python> -m snakemake` (sbatch --export=ALL passes PATH on)
        assert f"{VENV_BIN}/python" in job["script"] and "-m snakemake" in job["script"], job["script"][:500]


@pytest.mark.workflow
def test_outputs_match_a_local_run(runs):
    import nibabel as nib
    import numpy as np
    import pandas as pd

    root = runs[0]
    local, cluster = root / "local" / "results", root / "slurm" / "results"
    assert (cluster / "split.csv").read_bytes() == (local / "split.csv").read_bytes()

    caches = sorted(p.name for p in (local / "preprocessed").iterdir())
    assert caches and caches == sorted(p.name for p in (cluster / "preprocessed").iterdir())
    for case in caches:
        for name in ("image.npy", "label.npy"):
            a, b = np.load(local / "preprocessed" / case / name), np.load(cluster / "preprocessed" / case / name)
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{case}/{name} differs"
        meta = [json.loads((r / "preprocessed" / case / "meta.json").read_text()) for r in (local, cluster)]
        assert meta[0] == meta[1], f"{case}/meta.json differs"

    for folder in ("raw_predictions", "predictions"):
        names = sorted(p.name for p in (local / folder).glob("*.nii.gz"))
        assert names and names == sorted(p.name for p in (cluster / folder).glob("*.nii.gz"))
        for name in names:
            a, b = nib.load(str(local / folder / name)), nib.load(str(cluster / folder / name))
            np.testing.assert_array_equal(a.affine, b.affine)
            # CPU training with the same thread count repeats bit for bit (two local runs agree),
            # so a difference means the SLURM job ran differently (threads, environment, code)
            np.testing.assert_array_equal(
                np.asanyarray(a.dataobj),
                np.asanyarray(b.dataobj),
                err_msg=f"{folder}/{name}: labels differ from the local run",
            )

    pd.testing.assert_frame_equal(
        pd.read_csv(cluster / "metrics" / "per_case.csv"),
        pd.read_csv(local / "metrics" / "per_case.csv"),
        check_exact=True,
    )
