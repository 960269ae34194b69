"""The model's CPU forward pass in float32, in mixed bfloat16 and compiled by XLA: is either faster?

    .venv/bin/python benchmarks/forward_variants.py [--config config.yaml] [--batch-size 8]
        [--rounds 2] [--seconds 8] [--out results/benchmarks/forward_variants.json]

Issue 14 lists bfloat16 (where the CPU has it) and a compiled forward pass (XLA) as candidates
for faster inference. This script builds the config's U-Net (seeded, untrained weights: the
cost of a forward pass does not depend on them) and times ``predict_on_batch`` on one batch
of patch-sized tiles, as inference calls it, in three variants:

- ``float32``: the model as ``load_predictor`` runs it;
- ``mixed_bfloat16``: the same weights in a model built under Keras' ``mixed_bfloat16`` policy
  (bfloat16 compute, float32 variables);
- ``xla``: the float32 model compiled with ``jit_compile=True``.

Each variant runs for ``--seconds`` per round, the variants alternating for ``--rounds``
rounds; the best round of each is kept, so that all see the same machine load. Reports
seconds per batch, the speed-up over float32, and the largest difference of the logits
from float32's. Prints a table and writes JSON, with the CPU model and its bfloat16 flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kidney_seg.atomic import write_json_atomic  # noqa: E402
from kidney_seg.config import load_config  # noqa: E402
from kidney_seg.environment import cpu_model  # noqa: E402

VARIANTS = ("float32", "mixed_bfloat16", "xla")


def cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")) -> list[str]:
    """Which of ``wanted`` this CPU lists in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in wanted if f in flags]


def build_variant(variant: str, model_cfg: dict, num_classes: int, activation: str, weights: list):
    """The config's U-Net in ``variant``, holding ``weights``."""
    import keras

    from kidney_seg.model import build_from_config

    policy = "mixed_bfloat16" if variant == "mixed_bfloat16" else "float32"
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = build_from_config(model_cfg, num_classes, activation)
    finally:
        keras.config.set_dtype_policy(previous)
    model.set_weights(weights)
    model.compile(jit_compile=variant == "xla")
    return model


def seconds_per_batch(model, batch: np.ndarray, seconds: float) -> float:
    """Mean seconds of ``predict_on_batch`` over about ``seconds`` of calls (after one untimed call)."""
    model.predict_on_batch(batch)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        model.predict_on_batch(batch)
        n += 1
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    """Time the variants; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default="results/benchmarks/forward_variants.json")
    args = parser.parse_args(argv)

    import keras

    from kidney_seg.model import build_from_config, output_channels

    cfg = load_config(REPO / "config.yaml", args.config)  # a preset is merged over config.yaml
    activation = cfg["training"]["output_activation"]
    patch = cfg["training"]["patch_size"]
    keras.utils.set_random_seed(cfg["seed"])
    reference = build_from_config(cfg["model"], 3, activation)
    weights = reference.get_weights()
    batch = np.random.default_rng(0).normal(size=(args.batch_size, *patch, 1)).astype(np.float32)
    models = {v: build_variant(v, cfg["model"], 3, activation, weights) for v in VARIANTS}
    logits = {v: keras.ops.convert_to_numpy(m.predict_on_batch(batch)).astype(np.float32) for v, m in models.items()}
    best = {v: float("inf") for v in VARIANTS}
    for _ in range(args.rounds):
        for v, m in models.items():
            best[v] = min(best[v], seconds_per_batch(m, batch, args.seconds))
    result = {
        "config": args.config,
        "keras_backend": keras.backend.backend(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "batch": [args.batch_size, *patch, 1],
        "output_channels": output_channels(3, activation),
        "variants": {
            v: {
                "seconds_per_batch": round(best[v], 4),
                "speedup_over_float32": round(best["float32"] / best[v], 3),
                "max_abs_logit_difference": float(np.abs(logits[v] - logits["float32"]).max()),
            }
            for v in VARIANTS
        },
        "float32_max_abs_logit": float(np.abs(logits["float32"]).max()),
    }
    print(f"{result['cpu']} ({', '.join(result['cpu_flags'])}), Keras backend {result['keras_backend']}")
    print(f"batch {result['batch']}, best of {args.rounds} rounds of {args.seconds:.0f} s")
    print(f"{'variant':16} {'s/batch':>8} {'speed-up':>9} {'max |logit diff|':>17}")
    for v, r in result["variants"].items():
        speed, diff = r["speedup_over_float32"], r["max_abs_logit_difference"]
        print(f"{v:16} {r['seconds_per_batch']:8.3f} {speed:9.2f} {diff:17.5f}")
    write_json_atomic(Path(args.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
