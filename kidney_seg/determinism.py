"""Bitwise-repeatable runs (the config key ``deterministic``): seeds, deterministic ops, one compute thread.

:func:`enable` is called by the train and predict jobs before the framework does any
work. It sets every seed (:func:`keras.utils.set_random_seed`: Python, NumPy, TensorFlow,
torch and Keras' global seed generator) and, for the active Keras backend:

- TensorFlow: ``tf.config.experimental.enable_op_determinism()`` and one intra-op thread
  (a CPU kernel's reduction order depends on how many threads share the work, so runs
  with different thread counts differ in the last bits);
- JAX: ``--xla_gpu_deterministic_ops=true`` in ``XLA_FLAGS`` (deterministic GPU reductions
  and scatters, non-deterministic kernels excluded from autotuning). XLA reads the flags
  once, when JAX creates its first backend, so :func:`prepare_environment` must run before
  that (the workflow scripts call it before importing anything that imports JAX). On the
  CPU, JAX's results depend on how many CPUs the process may use (measured: 1 vs 2 CPUs
  under ``taskset`` differ in the last bits; ``--xla_cpu_multi_thread_eigen=false`` does not
  change that), which no flag here fixes;
- torch: ``torch.use_deterministic_algorithms(True)``, cuDNN benchmarking off,
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS needs it for deterministic results) and one
  intra-op thread.

The batch stream is already a pure function of ``(seed, step)`` (:mod:`kidney_seg.sampling`)
and preprocessing, the split and evaluation are NumPy/SciPy code without randomness, so
these settings concern the framework's kernels only.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

XLA_FLAGS = ("--xla_gpu_deterministic_ops=true",)
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def prepare_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Set the environment variables that frameworks read when they start (XLA flags, cuBLAS workspace).

    Flags already present in ``XLA_FLAGS`` (with any value) are left as they are.
    """
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "").split()
    names = {f.split("=", 1)[0] for f in flags}
    flags += [f for f in XLA_FLAGS if f.split("=", 1)[0] not in names]
    environ["XLA_FLAGS"] = " ".join(flags)
    environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)


def _jax_started() -> bool:
    """Whether JAX has already created a backend (and so read XLA_FLAGS)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # noqa: BLE001  (a private module; assume the worst if it moved)
        return True


def enable(seed: int) -> str:
    """Make this process's framework work deterministic; return the Keras backend's name.

    Call it before the framework has run any op: TensorFlow's thread pools and JAX's XLA
    flags are fixed once the runtime starts (a warning says so when it is too late).
    """
    jax_was_started = _jax_started()
    prepare_environment()
    import keras

    keras.utils.set_random_seed(int(seed))
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
        except RuntimeError:  # the runtime already started
            if tf.config.threading.get_intra_op_parallelism_threads() != 1:
                log.warning(
                    "deterministic: TensorFlow had already started; its intra-op thread count stays "
                    "%d and results can depend on it",
                    tf.config.threading.get_intra_op_parallelism_threads(),
                )
    elif backend == "jax":
        if jax_was_started:
            log.warning(
                "deterministic: JAX had already started, so XLA_FLAGS=%r may not be in effect; "
                "set it before JAX initialises",
                os.environ.get("XLA_FLAGS"),
            )
    elif backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.set_num_threads(1)
    log.info("deterministic: seed %d, backend %s, XLA_FLAGS=%r", seed, backend, os.environ.get("XLA_FLAGS", ""))
    return backend
