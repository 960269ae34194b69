"""The GPU figures in one run, with Keras on any backend (JAX on GPU machines without TensorFlow).

    KERAS_BACKEND=jax python3 benchmarks/device_check.py [--out results/benchmarks/device_check.json]
        [--steps 30] [--slices N] [--batch-size 64]

Run through benchmarks/device_check.sh, which installs carried wheels first. Measures, with
the paper's model (config.yaml: f0 20, 6 levels, patch 224, batch 7) and seeded untrained
weights (timing does not depend on them):
- ``train_step``: the pipeline's compiled train step (kidney_seg.training.compile_model,
  jit-compiled) on one fixed batch, float32 and mixed bfloat16: seconds per step (median of
  ``--steps`` after 3 warm-up steps), images/s and achieved TFLOP/s (analytic convolution
  count x3 for the backward pass, benchmarks/train_throughput.py);
- ``inference``: kidney_seg.inference.predict_volume on a case_00000-size scan (611 x 512 x
  512 at 0.5 x 0.92 x 0.92 mm, synthetic CT around the real label if ../shared is there,
  else a synthetic one; ``--slices`` keeps the first N) at the paper spacing: sliding window
  and whole slices, mirror TTA on and off; seconds each (the second of two runs: the first
  compiles), and the forward passes' share;
- ``peak_memory``: the accelerator's peak bytes in use after each phase, where the backend
  reports it (JAX: ``Device.memory_stats()``; PyTorch: ``torch.cuda.max_memory_allocated``).
Writes the JSON atomically and prints it. No localisation (it needs trained weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inference import prepare_case  # noqa: E402
from benchmarks.preprocess import DEFAULT_CASE  # noqa: E402
from benchmarks.train_throughput import conv_flops_per_image  # noqa: E402


def peak_memory_bytes() -> int | None:
    """The accelerator's peak bytes in use so far (None on a CPU or where the backend does not say)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        stats = device.memory_stats() if device.platform != "cpu" else None
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    if backend == "torch":
        import torch

        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    return None


def train_step(cfg: dict, precision: str | None, steps: int) -> dict:
    """Seconds per compiled train step of the config's model on one fixed batch, under ``precision``."""
    import keras

    from kidney_seg.model import build_from_config
    from kidney_seg.training import compile_model, precision_policy

    train_cfg = {**cfg["training"], "jit_compile": True}
    batch, patch = train_cfg["batch_size"], tuple(train_cfg["patch_size"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *patch, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=(batch, *patch)).astype(np.int32)
    keras.utils.set_random_seed(cfg["seed"])
    with precision_policy(precision):
        model = build_from_config(cfg["model"], 3, "softmax")
        compile_model(model, 3, train_cfg)
        for _ in range(3):
            model.train_on_batch(x, y)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model.train_on_batch(x, y)  # returns host scalars: the step has finished
            times.append(time.perf_counter() - start)
    s = statistics.median(times)
    flops = 3 * batch * conv_flops_per_image(cfg["model"], patch, 3)
    return {
        "precision": precision or "float32",
        "s_per_step": round(s, 5),
        "steps_per_s": round(1 / s, 2),
        "images_per_s": round(batch / s, 1),
        "tflop_per_s": round(flops / s / 1e12, 2),
        "peak_memory_bytes": peak_memory_bytes(),
    }


class TimedForward:
    """The pipeline's forward function, timed (and keeping the model's ``divisor``)."""

    def __init__(self, forward):
        self.forward, self.divisor, self.seconds = forward, forward.divisor, 0.0

    def __call__(self, batch):
        start = time.perf_counter()
        out = self.forward(batch)
        self.seconds += time.perf_counter() - start
        return out


def inference(cfg: dict, image_path: Path, batch_size: int) -> list[dict]:
    """predict_volume on the scan with the paper plan: each tiling, TTA on and off (second of two runs)."""
    import keras

    from kidney_seg.inference import Forward, predict_volume
    from kidney_seg.model import build_from_config
    from kidney_seg.plan import make_plan
    from kidney_seg.volume import read_image

    keras.utils.set_random_seed(cfg["seed"])
    forward = TimedForward(Forward(build_from_config(cfg["model"], 3, "softmax")))
    plan = make_plan(cfg, None)
    image, geometry = read_image(image_path, "case_00000")
    rows = []
    for tiling in ("sliding_window", "whole_slice"):
        for tta in (True, False):
            icfg = {**cfg["inference"], "tiling": tiling, "mirror_tta": tta, "batch_size": batch_size}
            for _ in range(2):
                forward.seconds = 0.0
                start = time.perf_counter()
                labels = predict_volume(image, geometry.spacing, plan, forward, icfg)
                seconds = time.perf_counter() - start
            rows.append(
                {
                    "tiling": tiling,
                    "mirror_tta": tta,
                    "seconds": round(seconds, 2),
                    "forward_s": round(forward.seconds, 2),
                    "labels_shape": list(labels.shape),
                    "peak_memory_bytes": peak_memory_bytes(),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Train steps, then whole-case inference; write the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "device_check.json")
    p.add_argument("--steps", type=int, default=30, help="timed train steps per precision")
    p.add_argument("--slices", type=int, default=None, help="keep only the first N slices of the scan")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward call in inference")
    args = p.parse_args(argv)

    import keras

    from kidney_seg.atomic import write_json_atomic
    from kidney_seg.config import load_config
    from kidney_seg.environment import accelerator_devices, describe_device

    cfg = load_config(ROOT / "config.yaml")
    started = time.perf_counter()
    result = {
        "backend": keras.backend.backend(),
        "device": describe_device(accelerator_devices()),
        "model": {k: cfg["model"][k] for k in ("base_filters", "levels")},
        "train_step": [train_step(cfg, precision, args.steps) for precision in (None, "bfloat16")],
    }
    print(json.dumps(result["train_step"]), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        image_path, note, _, _ = prepare_case(DEFAULT_CASE, args.slices, Path(tmp))
        result["case"] = note
        result["inference"] = inference(cfg, image_path, args.batch_size)
    result["peak_memory_bytes"] = peak_memory_bytes()
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["env"] = {k: os.environ.get(k) for k in ("KERAS_BACKEND", "XLA_PYTHON_CLIENT_PREALLOCATE")}
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
