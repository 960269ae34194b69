"""A TensorFlow job's fixed cost: starting the framework and exiting, with and without ``import_framework``.

    .venv/bin/python benchmarks/job_startup.py [--rounds 5] [--config tests/configs/tiny.yaml]
        [--out results/benchmarks/job_startup.json]

Every train and predict job of the workflow is a fresh Python process that imports Keras and
its backend, builds or loads a model, traces a function and exits. TensorFlow's import makes
about 450,000 long-lived Python objects; Python's default garbage collector walks them in
full collections while they are made, while the job's own objects come and go, and once more
at exit. ``kidney_seg.environment.import_framework`` (called first by the train and predict
scripts and by ``kidney-seg predict``) holds the collector back during the import, freezes what
the import made and freezes again at exit.

Each measurement is a fresh process, timed from its start to its end (exit included), with its
CPU time (user + system) from ``getrusage``; the variants alternate for ``--rounds`` rounds and
the median and best of each are kept, so that both see the same machine load:

- ``import``: import the framework, exit;
- ``model``: the same, then build the config's U-Net (seeded weights) and run ``predict_on_batch``
  on one batch of patch-sized tiles (a trace and a forward pass, as a predict job makes); the model
  is ``config.yaml`` merged with ``--config``.

``plain`` is ``import keras``; ``import_framework`` is the library's call. Runs on the
``KERAS_BACKEND`` the environment names (TensorFlow by default).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kidney_seg.atomic import write_json_atomic  # noqa: E402
from kidney_seg.environment import cpu_model  # noqa: E402

VARIANTS = {
    "plain": "import keras",
    "import_framework": "from kidney_seg.environment import import_framework\nimport_framework()\nimport keras",
}
MODEL_WORK = """
import numpy as np
from kidney_seg.config import load_config
from kidney_seg.model import build_from_config
cfg = load_config({base!r}, {config!r})
keras.utils.set_random_seed(0)
model = build_from_config(cfg["model"], 3, cfg["training"]["output_activation"])
patch = cfg["training"]["patch_size"]
model.predict_on_batch(np.zeros((cfg["inference"]["batch_size"], *patch, 1), np.float32))
"""
WORKLOADS = ("import", "model")


def script(variant: str, workload: str, config: Path) -> str:
    """The Python source of one measured process."""
    body = VARIANTS[variant]
    return body + (MODEL_WORK.format(base=str(REPO / "config.yaml"), config=str(config)) if workload == "model" else "")


def measure(source: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a fresh interpreter running ``source``, start to exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", source], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the measured process failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run(rounds: int, config: Path) -> dict:
    """Every (workload, variant) ``rounds`` times, alternating: {workload: {variant: {wall: [...], cpu: [...]}}}."""
    found: dict = {w: {v: {"wall": [], "cpu": []} for v in VARIANTS} for w in WORKLOADS}
    for _ in range(rounds):
        for workload in WORKLOADS:
            for variant in VARIANTS:
                wall, cpu = measure(script(variant, workload, config))
                found[workload][variant]["wall"].append(wall)
                found[workload][variant]["cpu"].append(cpu)
    return found


def summary(found: dict) -> list[dict]:
    """One row per workload and variant: median and best wall and CPU seconds, and the saving over plain."""
    rows = []
    for workload, variants in found.items():
        plain = statistics.median(variants["plain"]["wall"])
        for variant, times in variants.items():
            median = statistics.median(times["wall"])
            rows.append(
                {
                    "workload": workload,
                    "variant": variant,
                    "median_wall_s": round(median, 2),
                    "best_wall_s": round(min(times["wall"]), 2),
                    "median_cpu_s": round(statistics.median(times["cpu"]), 2),
                    "saving_vs_plain_s": round(plain - median, 2),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", type=Path, default=REPO / "tests" / "configs" / "tiny.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "job_startup.json")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rows = summary(run(args.rounds, args.config.resolve()))
    print(f"{'workload':9s} {'variant':17s} {'median s':>9s} {'best s':>7s} {'CPU s':>6s} {'saving s':>9s}")
    for r in rows:
        print(
            f"{r['workload']:9s} {r['variant']:17s} {r['median_wall_s']:9.2f} {r['best_wall_s']:7.2f} "
            f"{r['median_cpu_s']:6.2f} {r['saving_vs_plain_s']:9.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out,
        {
            "cpu": cpu_model(),
            "backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
            "rounds": args.rounds,
            "config": str(args.config),
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
