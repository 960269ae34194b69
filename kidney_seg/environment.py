"""Where a step ran: host, CPU, memory, package versions, Keras backend, accelerators and git commit.

``describe_environment`` never imports a deep-learning framework unless ``accelerators`` is
True, and then only the active Keras backend's (tensorflow, jax or torch). Package
versions come from ``importlib.metadata``, so nothing is imported to read them.
Every probe is best effort: a failing probe leaves its field empty (or records an error
string), never raises.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from kidney_seg.atomic import write_json_atomic

#: Distributions whose versions are recorded (those installed).
PACKAGES: tuple[str, ...] = (
    "kidney-seg",
    "keras",
    "tensorflow",
    "jax",
    "jaxlib",
    "torch",
    "numpy",
    "scipy",
    "nibabel",
    "pandas",
    "snakemake",
    "batchgenerators",
)
#: Environment variables that decide which devices and backend a run uses (recorded when set).
ENV_VARS: tuple[str, ...] = ("KERAS_BACKEND", "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", "OMP_NUM_THREADS")
GIT_TIMEOUT_S = 10.0


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (missing distributions are left out); nothing is imported."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        except Exception:  # a broken distribution's metadata must not stop the report
            continue
    return out


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memory_bytes() -> int | None:
    """Physical memory of the host in bytes, or None where it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _usable_cpus() -> int | None:
    """CPUs this process may run on (affinity), where the platform tells."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def keras_backend() -> str:
    """The Keras backend in use (or that ``import keras`` would pick), without importing Keras.

    Keras itself when already imported; otherwise KERAS_BACKEND, then the ``backend`` of
    ``$KERAS_HOME/keras.json`` (default ``~/.keras``), then Keras' default, tensorflow.
    """
    keras = sys.modules.get("keras")
    if keras is not None:
        try:
            return str(keras.backend.backend())
        except Exception:
            pass
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        backend = json.loads(Path(home, "keras.json").read_text()).get("backend")
        if backend:
            return str(backend)
    except (OSError, ValueError, AttributeError):
        pass
    return "tensorflow"


def _tensorflow_devices() -> list[dict]:
    import tensorflow as tf

    devices = []
    for dev in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(dev) or {}
        except Exception:
            details = {}
        entry = {"name": str(details.get("device_name") or dev.name), "kind": "GPU", "id": dev.name}
        if details.get("compute_capability"):
            entry["compute_capability"] = ".".join(str(v) for v in details["compute_capability"])
        devices.append(entry)
    return devices


def _jax_devices() -> list[dict]:
    import jax

    return [
        {"name": str(getattr(d, "device_kind", d)), "kind": str(d.platform).upper(), "id": str(d.id)}
        for d in jax.devices()
        if d.platform != "cpu"
    ]


def _torch_devices() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        {"name": str(torch.cuda.get_device_name(i)), "kind": "GPU", "id": f"cuda:{i}"}
        for i in range(torch.cuda.device_count())
    ]


def accelerator_devices(backend: str | None = None) -> list[dict]:
    """Accelerators (GPUs, TPUs) the active Keras backend sees; [] on a CPU-only host.

    Imports only that backend's framework. Raises what the framework raises.
    """
    backend = backend or keras_backend()
    probes = {"tensorflow": _tensorflow_devices, "jax": _jax_devices, "torch": _torch_devices}
    if backend not in probes:
        return []
    return probes[backend]()


#: What a GPU job without a GPU tells its user (the README's GPU section).
GPU_INSTALL_HINT = (
    "install the GPU build (`make install GPU=1`, or `pip install -e '.[gpu]'`, which brings TensorFlow's CUDA "
    "libraries) and check `nvidia-smi`, or set `allow_cpu: true` in the config to run on the CPU"
)


class NoAcceleratorError(RuntimeError):
    """A job that asked for a GPU sees none, and the config does not allow the CPU."""


def describe_device(accelerators: list[dict]) -> str:
    """One line naming where a job computes: its accelerators, else the CPU model and usable cores."""
    if accelerators:
        return ", ".join(f"{d['kind']} {d['name']} ({d['id']})" for d in accelerators)
    return f"CPU {cpu_model() or 'unknown model'} ({_usable_cpus() or os.cpu_count()} usable cores)"


#: The collector's first threshold while the framework is imported (Python's default: 700 allocations).
IMPORT_GC_THRESHOLD = 50_000


def import_framework() -> None:
    """Import Keras and its backend with the cyclic garbage collector held back, then freeze what they made.

    TensorFlow's import makes about 450,000 long-lived objects, over which Python's default collector runs
    full collections while they are made and once more at exit, all for nothing. Frozen objects are left out
    of every later collection; the thresholds go back to what they were. A job calls this before it touches
    the framework (after setting ``KERAS_BACKEND`` or ``XLA_FLAGS``). Measured: about 1.5 s less a job, start to
    exit (benchmarks/job_startup.py)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(IMPORT_GC_THRESHOLD, *thresholds[1:])
    try:
        import keras  # noqa: F401  (imports the backend too)
    finally:
        gc.freeze()
        gc.set_threshold(*thresholds)
    atexit.register(gc.freeze)  # at exit: no final full collection over the framework's objects


def configure_threads(threads: int | None) -> None:
    """Limit the backend's CPU threads to what the scheduler granted."""
    if not threads:
        return
    import keras

    if keras.backend.backend() == "tensorflow":
        import logging

        import tensorflow as tf

        log = logging.getLogger(__name__)
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(min(2, int(threads)))
        except RuntimeError:  # runtime already initialised
            log.warning("could not set TensorFlow thread counts; the runtime was already initialised")
            return
        log.info("TensorFlow CPU threads: %d intra-op, %d inter-op", int(threads), min(2, int(threads)))


def require_device(job: str, allow_cpu: bool, backend: str | None = None) -> list[dict]:
    """The accelerators a GPU job (train, predict) runs on, logged; without any, NoAcceleratorError unless
    ``allow_cpu``."""
    import logging

    backend = backend or keras_backend()
    found = accelerator_devices(backend)
    log = logging.getLogger(__name__)
    if found:
        log.info("%s runs on %s (Keras backend %s)", job, describe_device(found), backend)
        return found
    if not allow_cpu:
        raise NoAcceleratorError(f"{job}: the Keras backend {backend} sees no GPU: {GPU_INSTALL_HINT}")
    log.info("%s runs on %s: no GPU visible, allow_cpu is true (Keras backend %s)", job, describe_device([]), backend)
    return found


def describe_environment(accelerators: bool = True) -> dict:
    """The host, interpreter, packages and (when ``accelerators``) the backend's devices, as a JSON-ready dict.

    ``accelerators`` is None when not asked for; ``accelerator_error`` holds the reason
    when the probe failed.
    """
    mem = memory_bytes()
    backend = keras_backend()
    env = {
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": _usable_cpus(),
        "memory_bytes": mem,
        "memory_gb": None if mem is None else round(mem / 2**30, 1),
        "packages": package_versions(),
        "keras_backend": backend,
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "accelerators": None,
    }
    if accelerators:
        try:
            env["accelerators"] = accelerator_devices(backend)
        except Exception as exc:  # an unusable framework is recorded, not fatal
            env["accelerators"] = []
            env["accelerator_error"] = f"{type(exc).__name__}: {exc}"
    return env


def write_environment(path: str | os.PathLike, accelerators: bool = True) -> dict:
    """Write :func:`describe_environment` as JSON atomically; return it."""
    env = describe_environment(accelerators)
    write_json_atomic(path, env)
    return env


def _git(path: str | os.PathLike, *args: str) -> str | None:
    """stdout of ``git -C path args`` (stripped), or None when git fails, is missing or hangs."""
    try:
        proc = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(path), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit(path: str | os.PathLike) -> dict | None:
    """{'commit', 'branch', 'dirty'} of the git work tree holding ``path``; None outside a repository or without git.

    ``dirty`` is True when tracked files differ from the commit (staged or not);
    untracked files do not count (as ``git describe --dirty``).
    """
    if not Path(path).exists():
        return None
    commit = _git(path, "rev-parse", "--verify", "HEAD")
    if not commit:
        return None
    status = _git(path, "status", "--porcelain", "--untracked-files=no")
    branch = _git(path, "rev-parse", "--abbrev-ref", "HEAD")
    return {
        "commit": commit,
        "branch": None if branch in (None, "HEAD") else branch,
        "dirty": None if status is None else bool(status),
    }
