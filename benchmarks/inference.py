"""Whole-case inference against the model's bare forward pass; mirror TTA on and off; peak memory.

    .venv/bin/python benchmarks/inference.py [--model demo|paper] [--slices N] [--batch-size B]
        [--tta both|on|off | --no-tta] [--target-spacing Z Y X] [--repeats R] [--case PATH]
        [--out results/benchmarks/inference.json]

Input: the real KiTS19 label case_00000 (611 x 512 x 512, 0.5 x 0.92 x 0.92 mm; a synthetic
label of that shape if the file is absent) with synthetic int16 CT inside it, exactly as
benchmarks/preprocess.py builds it; ``--slices N`` keeps only its first N slices (of the
internal slice axis) so that a CPU run stays short. The model is the config's U-Net with
seeded, untrained weights (timing does not depend on them): ``paper`` = config.yaml (f0 20,
6 levels, patch 224, preprocessing 3.0 x 0.7816 x 0.7816 mm), ``demo`` = config.yaml +
presets/demo.yaml (f0 16, 5 levels, patch 128, 3.0 x 1.5 x 1.5 mm); ``--target-spacing``
overrides the spacing. It is saved to a temporary model folder and loaded with
kidney_seg.inference.load_predictor, so the forward function is the pipeline's own.
Backend: whatever KERAS_BACKEND says (only keras and kidney_seg are imported).

Each measurement runs in a fresh subprocess and reports its own peak RSS (VmHWM):
  model      load the model and run one batch of ``batch_size`` tiles: the model's own
             memory (interpreter, framework, weights, one batch of activations);
  tta_on /   read the scan (kidney_seg.volume.read_image), compile the forward
  tta_off    function for every batch shape the run will use, then time
             kidney_seg.inference.predict_volume on the raw internal-orientation image
             (preprocess, sliding window with or without mirror TTA, Gaussian aggregation,
             linear resampling back to the scan's grid, argmax), its forward function
             wrapped in a counter that records every batch. Then the bare forward: the
             same number of tiles pushed through the same forward function in batches of
             the recorded sizes (random tiles, no aggregation).
Figures per run:
  whole_s      predict_volume wall time (best of --repeats): the time per case;
  bare_s       the bare forward time over the same tiles and batches;
  overhead     whole_s / bare_s - 1 (target <= 0.15): everything that is not the model;
  split        of whole_s, measured by wrapping (not changing) the library's functions in
               this process: preprocess (preprocess_image), forward (inside the forward
               function), aggregation (predict_probabilities minus forward: tiling,
               mirroring, Gaussian weighting, softmax), resample (probabilities_to_labels:
               linear resampling to the scan's grid and argmax), other (the rest);
  peak_rss     VmHWM of the run's process, in MiB and as a multiple of the float32 size
               of the input scan; pipeline_rss = peak_rss - the model run's peak RSS;
  tiles, batches, GFLOP/s of the bare forward (analytic convolution count).
With ``--slices`` the JSON also holds a full-case time estimate: the measured times scaled
by the full case's preprocessed slice count over the run's (an extrapolation, not a run).
Prints a table, writes the JSON atomically and exits 1 if the overhead target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.preprocess import DEFAULT_CASE, make_case, peak_rss_bytes  # noqa: E402

MODELS = {"paper": [ROOT / "config.yaml"], "demo": [ROOT / "config.yaml", ROOT / "presets" / "demo.yaml"]}
TARGET_OVERHEAD = 0.15
PHASES = ("preprocess_image", "predict_probabilities", "probabilities_to_labels")
MIB = 1 / 2**20


# ----------------------------------------------------------------------------- child side


def device_description() -> dict:
    """The backend and the device it computes on: the accelerator's name if any, else the CPU model."""
    import keras

    backend = keras.backend.backend()
    accel = []
    if backend == "jax":
        import jax

        accel = [f"{d.platform}: {d.device_kind}" for d in jax.devices() if d.platform != "cpu"]
    elif any(not d.lower().startswith("cpu") for d in keras.distribution.list_devices()):
        try:
            names = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            ).stdout.split("\n")
            accel = [f"gpu: {n.strip()}" for n in names if n.strip()]
        except (OSError, subprocess.SubprocessError):
            accel = [d for d in keras.distribution.list_devices() if not d.lower().startswith("cpu")]
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "backend": backend,
        "device": accel[0] if accel else f"CPU: {cpu} ({os.cpu_count()} threads)",
        "accelerators": accel,
        "cpu": cpu,
        "cpu_threads": os.cpu_count(),
    }


def single_predictor(model_dir: str):
    """One forward function and the settings from load_predictor (which may return a list of one)."""
    from kidney_seg.inference import load_predictor

    fns, settings = load_predictor(model_dir)
    return (fns if callable(fns) else fns[0]), settings


class CountingForward:
    """A forward function that records each batch's size and the time spent inside it."""

    def __init__(self, predict_fn):
        self.predict_fn, self.sizes, self.seconds = predict_fn, [], 0.0
        if hasattr(predict_fn, "divisor"):  # whole-slice tiling pads to the model's own multiple
            self.divisor = predict_fn.divisor

    def __call__(self, x):
        t0 = time.perf_counter()
        out = self.predict_fn(x)
        self.seconds += time.perf_counter() - t0
        self.sizes.append(int(len(x)))
        return out


@contextlib.contextmanager
def timed_functions(module, names):
    """Wrap ``module``'s functions ``names`` (those it has) to sum their wall time; restore them on exit."""
    seconds = {}
    originals = {n: getattr(module, n) for n in names if callable(getattr(module, n, None))}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

        return timed

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield seconds
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def batch_plan(shape, patch, step: float, mirror_tta: bool, batch_size: int) -> list[int]:
    """Batch sizes predict_probabilities will use on a preprocessed volume of ``shape`` (from
    the library's own slab_size, tile_corners and MIRRORS); checked against the counted run."""
    from kidney_seg.inference import MIRRORS, slab_size, tile_corners

    padded = tuple(max(int(s), int(p)) for s, p in zip(shape[1:], patch))
    per_slice = len(tile_corners(padded, tuple(patch), step)) * (len(MIRRORS) if mirror_tta else 1)
    k = slab_size(tuple(shape[1:]), tuple(patch), step, mirror_tta, batch_size)
    plan = []
    for z in range(0, int(shape[0]), k):
        n = min(k, int(shape[0]) - z) * per_slice
        plan += [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return plan


def child_build(spec: dict) -> dict:
    """Build the seeded, untrained model and save it as a model folder (model.keras + inference.json)."""
    import keras

    from benchmarks.train_throughput import conv_flops_per_image
    from kidney_seg.atomic import write_json_atomic
    from kidney_seg.model import build_from_config

    keras.utils.set_random_seed(spec["seed"])
    model = build_from_config(spec["model_cfg"], spec["settings"]["num_classes"], spec["settings"]["output_activation"])
    folder = Path(spec["model_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    write_json_atomic(folder / "inference.json", spec["settings"])
    flops = conv_flops_per_image(
        spec["model_cfg"], tuple(spec["settings"]["patch_size"]), int(model.outputs[0].shape[-1])
    )
    return {"params": int(model.count_params()), "gflop_per_tile": flops / 1e9, **device_description()}


def child_model(spec: dict) -> dict:
    """Only the model: load it and run one batch (twice: the first compiles)."""
    import numpy as np

    baseline = peak_rss_bytes()
    predict_fn, settings = single_predictor(spec["model_dir"])
    batch = (
        np.random.default_rng(0).standard_normal((spec["batch_size"], *settings["patch_size"], 1)).astype(np.float32)
    )
    t0 = time.perf_counter()
    predict_fn(batch)
    t1 = time.perf_counter()
    predict_fn(batch)
    return {
        "first_batch_s": t1 - t0,
        "batch_s": time.perf_counter() - t1,
        "peak_rss": peak_rss_bytes(),
        "baseline_rss": baseline,
    }


def child_infer(spec: dict) -> dict:
    """predict_volume on the scan, timed and split; then the bare forward over the same batches."""
    import numpy as np

    import kidney_seg.inference as inference
    from kidney_seg.preprocessing import preprocess_image
    from kidney_seg.volume import read_image

    baseline = peak_rss_bytes()
    predict_fn, settings = single_predictor(spec["model_dir"])
    cfg, patch = spec["inference_cfg"], tuple(settings["patch_size"])
    t0 = time.perf_counter()
    image, geometry = read_image(spec["image"], "case_00000")
    read_s = time.perf_counter() - t0
    volume, _ = preprocess_image(image, geometry.spacing, settings)  # for the shape (and warm caches)
    pre_shape = [int(s) for s in volume.shape]
    del volume
    plan = batch_plan(pre_shape, patch, cfg["step"], cfg["mirror_tta"], cfg["batch_size"])
    inputs = {}

    def warm_up(sizes) -> None:
        """Random tiles for every new batch size, each pushed through once (compiling it) outside the timings."""
        for n in sorted(set(sizes) - set(inputs)):
            inputs[n] = np.random.default_rng(n).standard_normal((n, *patch, 1)).astype(np.float32)
            predict_fn(inputs[n])

    t0 = time.perf_counter()
    warm_up(plan)
    compile_s = time.perf_counter() - t0

    runs, bare = [], []
    for _ in range(spec["repeats"]):  # alternate whole and bare so that both see the same machine load
        counter = CountingForward(predict_fn)
        with timed_functions(inference, PHASES) as phase_s:
            t0 = time.perf_counter()
            labels = inference.predict_volume(image, geometry.spacing, settings, counter, cfg)
            whole = time.perf_counter() - t0
        runs.append({"whole_s": whole, "forward_s": counter.seconds, "sizes": counter.sizes, "phase_s": dict(phase_s)})
        del labels
        peak = peak_rss_bytes()  # before the bare forward, which adds nothing but its one batch
        warm_up(counter.sizes)  # a no-op unless the run used a batch size the plan did not foresee
        t0 = time.perf_counter()
        for n in counter.sizes:
            predict_fn(inputs[n])
        bare.append(time.perf_counter() - t0)
    best = min(runs, key=lambda r: r["whole_s"])

    phase = best["phase_s"]
    split = {
        "preprocess": phase.get("preprocess_image"),
        "forward": best["forward_s"],
        "aggregation": phase["predict_probabilities"] - best["forward_s"] if "predict_probabilities" in phase else None,
        "resample": phase.get("probabilities_to_labels"),
    }
    split["other"] = best["whole_s"] - sum(v for v in split.values() if v is not None)
    return {
        "mirror_tta": bool(cfg["mirror_tta"]),
        "image_shape": [int(s) for s in image.shape],
        "spacing": [float(s) for s in geometry.spacing],
        "preprocessed_shape": pre_shape,
        "tiles": int(sum(best["sizes"])),
        "batches": len(best["sizes"]),
        "batch_sizes": sorted(set(best["sizes"])),
        "tiles_planned": int(sum(plan)),
        "batches_planned": len(plan),
        "plan_matches": best["sizes"] == plan,
        "read_s": read_s,
        "compile_s": compile_s,
        "whole_s": best["whole_s"],
        "bare_s": min(bare),
        "overhead": best["whole_s"] / min(bare) - 1,
        "split_s": split,
        "whole_s_all": [r["whole_s"] for r in runs],
        "bare_s_all": bare,
        "peak_rss": peak,
        "baseline_rss": baseline,
    }


# ----------------------------------------------------------------------------- parent side


def first_slices(label: Path, n: int, tmp: Path) -> Path:
    """A copy of a KiTS-layout label holding only its first ``n`` slices (file axis 0 = internal slice axis)."""
    import nibabel as nib
    import numpy as np

    from kidney_seg.volume import save_nifti

    img = nib.load(str(label))
    if nib.aff2axcodes(img.affine)[0] != "I":
        raise SystemExit(f"{label}: expected a KiTS-layout (I, P, L) label, got {nib.aff2axcodes(img.affine)}")
    if not 1 <= n <= img.shape[0]:
        raise SystemExit(f"--slices must be between 1 and {img.shape[0]}")
    part = img.slicer[:n]
    path = tmp / f"first_{n}" / "segmentation.nii.gz"
    path.parent.mkdir()
    save_nifti(path, np.asarray(part.dataobj), part.affine, dtype=np.uint8)
    return path


def prepare_case(case: Path, slices: int | None, tmp: Path) -> tuple[Path, str, list[int], list[float]]:
    """Write the synthetic CT (of the first ``slices`` slices, if given); return its path, a note, and
    the full case's internal shape and spacing."""
    import nibabel as nib

    from kidney_seg.volume import geometry_of

    if slices is None:
        image, label, note = make_case(case, tmp, "int16")
    else:
        label = case if case is not None and case.is_file() else make_case(case, tmp, "int16")[1]
        image, _, note = make_case(first_slices(label, slices, tmp), tmp, "int16")
        note = f"first {slices} slices of {'real label ' + str(case) if label == case else 'a synthetic label'}"
    geometry = geometry_of(nib.load(str(label)))
    return image, note, list(geometry.internal_shape), list(geometry.spacing)


def child(mode: str, spec: dict, tmp: Path, name: str | None = None) -> dict:
    """Run one measurement in a fresh interpreter; it writes its result next to its spec."""
    from kidney_seg.atomic import write_json_atomic

    spec_path, result_path, log_path = (tmp / f"{name or mode}.{kind}" for kind in ("spec.json", "result.json", "log"))
    write_json_atomic(spec_path, {**spec, "result": str(result_path)})
    with open(log_path, "w") as log:
        code = subprocess.call(
            [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
        )
    if code != 0 or not result_path.is_file():
        raise SystemExit(f"benchmark child {mode} failed ({code}):\n{log_path.read_text()[-4000:]}")
    return json.loads(result_path.read_text())


def model_spec(args) -> dict:
    """The model, preprocessing and inference settings of ``--model`` with the command-line overrides."""
    from kidney_seg.config import load_config
    from kidney_seg.plan import make_plan

    cfg = load_config(*MODELS[args.model])
    if args.target_spacing:
        cfg["preprocessing"]["target_spacing"] = args.target_spacing
    settings = make_plan(cfg, None)  # what the model's inference.json holds
    batch_size = args.batch_size or cfg["inference"]["batch_size"]
    return {
        "model": args.model,
        "model_cfg": cfg["model"],
        "seed": cfg["seed"],
        "settings": settings,
        "inference_cfg": {**cfg["inference"], "batch_size": batch_size},
        "batch_size": batch_size,
        "repeats": args.repeats,
    }


def full_case_estimate(run: dict, full_shape, full_spacing, target_spacing) -> dict:
    """Times scaled from the run's preprocessed slices to the full case's (an extrapolation)."""
    from kidney_seg.preprocessing import resampled_shape

    full_z = resampled_shape(tuple(full_shape), full_spacing, target_spacing)[0]
    scale = full_z / run["preprocessed_shape"][0]
    return {
        "preprocessed_slices": int(full_z),
        "scale": scale,
        "tiles": round(run["tiles"] * scale),
        "whole_s": run["whole_s"] * scale,
        "bare_s": run["bare_s"] * scale,
    }


def print_table(result: dict) -> None:
    """The human-readable summary."""
    m, runs = result["model"], result["runs"]
    first = next(iter(runs.values()))
    f32 = result["input"]["float32_bytes"]
    print(
        f"\nmodel {m['name']}: f0 {m['base_filters']}, {m['levels']} levels, patch {m['patch']}, "
        f"{m['params'] / 1e6:.2f}M params, {m['gflop_per_tile']:.2f} GFLOP/tile; backend {result['backend']} on "
        f"{result['device']}; batch {result['batch_size']}"
    )
    print(
        f"input {'x'.join(map(str, first['image_shape']))} ({result['input']['note']}), float32 {f32 * MIB:.0f} MiB; "
        f"preprocessed {'x'.join(map(str, first['preprocessed_shape']))} at "
        f"{' x '.join(map(str, result['target_spacing']))} mm"
    )
    print(
        f"{'run':<8} {'tiles':>6} {'batch':>6} {'whole s':>8} {'bare s':>8} {'overhd':>7} | {'prep':>6} {'fwd':>7} "
        f"{'aggr':>6} {'resamp':>6} {'other':>6} | {'GFLOP/s':>7} {'peak MiB':>8} {'x f32':>6} {'pipe MiB':>8}"
    )
    for name, r in runs.items():
        s = {k: (f"{v:6.2f}" if v is not None else f"{'-':>6}") for k, v in r["split_s"].items()}
        print(
            f"{name:<8} {r['tiles']:6d} {r['batches']:6d} {r['whole_s']:8.2f} {r['bare_s']:8.2f} "
            f"{r['overhead']:7.3f} | "
            f"{s['preprocess']} {r['split_s']['forward']:7.2f} {s['aggregation']} {s['resample']} {s['other']} | "
            f"{r['bare_gflops']:7.1f} {r['peak_rss'] * MIB:8.0f} {r['peak_rss'] / f32:6.2f} "
            f"{r['pipeline_rss'] * MIB:8.0f}"
        )
    mod = result["model_only"]
    print(
        f"model only (load + one batch of {result['batch_size']}): peak RSS {mod['peak_rss'] * MIB:.0f} MiB "
        f"(interpreter + imports {mod['baseline_rss'] * MIB:.0f} MiB); batch {mod['batch_s']:.3f} s "
        f"(first, compiling: {mod['first_batch_s']:.2f} s)"
    )
    for name, est in result.get("full_case_estimate", {}).items():
        print(
            f"full case estimate, {name}: {est['preprocessed_slices']} preprocessed slices, ~{est['tiles']} tiles, "
            f"whole ~{est['whole_s']:.0f} s, bare ~{est['bare_s']:.0f} s (scaled x{est['scale']:.1f}, not measured)"
        )
    for name, r in runs.items():
        if not r["plan_matches"]:
            print(
                f"NOTE {name}: counted {r['tiles']} tiles in {r['batches']} batches, the plan from the shape said "
                f"{r['tiles_planned']} in {r['batches_planned']}"
            )
    verdict = "PASS" if result["pass"] else "FAIL"
    overheads = ", ".join(f"{n} {r['overhead']:.3f}" for n, r in runs.items())
    print(f"overhead whole / bare - 1: {overheads} (target <= {TARGET_OVERHEAD}) -> {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="paper")
    parser.add_argument("--slices", type=int, default=None, help="benchmark only the first N slices of the case")
    parser.add_argument("--batch-size", type=int, default=None, help="tiles per forward call (default: the config's)")
    parser.add_argument("--tta", choices=("both", "on", "off"), default="both", help="mirror TTA runs to measure")
    parser.add_argument("--no-tta", dest="tta", action="store_const", const="off", help="same as --tta off")
    parser.add_argument(
        "--target-spacing",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=None,
        help="preprocessing spacing in mm (default: the model config's)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per run (the best is kept)")
    parser.add_argument(
        "--case", type=Path, default=DEFAULT_CASE, help="a KiTS-layout label file (segmentation.nii.gz)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "inference.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--repeats and --batch-size must be at least 1")

    from kidney_seg.atomic import write_json_atomic

    if args.child:
        mode, spec_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        result = {"build": child_build, "model": child_model, "infer": child_infer}[mode](spec)
        write_json_atomic(spec["result"], result)
        return 0

    spec = model_spec(args)
    settings = spec["settings"]
    tta = {"both": (True, False), "on": (True,), "off": (False,)}[args.tta]
    with tempfile.TemporaryDirectory(prefix="kidney-seg-bench-") as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        image, note, full_shape, full_spacing = prepare_case(args.case, args.slices, tmp)
        print(f"input: {note}; synthetic CT (int16) written in {time.perf_counter() - t0:.1f} s", flush=True)
        spec.update(image=str(image), model_dir=str(tmp / "model"))
        built = child("build", spec, tmp)
        print(
            f"model {args.model} built ({built['params']} params), backend {built['backend']}, {built['device']}",
            flush=True,
        )
        model_only = child("model", spec, tmp)
        runs = {}
        for on in tta:
            name = "tta_on" if on else "tta_off"
            runs[name] = child(
                "infer", {**spec, "inference_cfg": {**spec["inference_cfg"], "mirror_tta": on}}, tmp, name
            )
            print(f"{name}: whole {runs[name]['whole_s']:.2f} s, bare {runs[name]['bare_s']:.2f} s", flush=True)

    patch, gflop = tuple(settings["patch_size"]), built["gflop_per_tile"]
    shape = runs[next(iter(runs))]["image_shape"]
    float32_bytes = 4 * shape[0] * shape[1] * shape[2]
    for r in runs.values():
        r["bare_gflops"] = gflop * r["tiles"] / r["bare_s"]
        r["pipeline_rss"] = r["peak_rss"] - model_only["peak_rss"]
        r["peak_rss_mib"], r["peak_rss_x_float32_input"] = r["peak_rss"] * MIB, r["peak_rss"] / float32_bytes
    result = {
        "model": {
            "name": args.model,
            "base_filters": spec["model_cfg"]["base_filters"],
            "levels": spec["model_cfg"]["levels"],
            "patch": list(patch),
            "params": built["params"],
            "gflop_per_tile": gflop,
            "weights": "seeded, untrained",
        },
        "backend": built["backend"],
        "device": built["device"],
        "cpu": built["cpu"],
        "cpu_threads": built["cpu_threads"],
        "batch_size": spec["batch_size"],
        "repeats": args.repeats,
        "target_spacing": settings["preprocessing"]["target_spacing"],
        "inference_cfg": spec["inference_cfg"],
        "input": {
            "note": note,
            "shape": shape,
            "full_case_shape": full_shape,
            "spacing": full_spacing,
            "slices": args.slices,
            "float32_bytes": float32_bytes,
            "float32_mib": float32_bytes * MIB,
        },
        "model_only": {**model_only, "peak_rss_mib": model_only["peak_rss"] * MIB},
        "runs": runs,
        "target_overhead": TARGET_OVERHEAD,
        "pass": all(r["overhead"] <= TARGET_OVERHEAD for r in runs.values()),
        "python": sys.version.split()[0],
    }
    if args.slices is not None:
        result["full_case_estimate"] = {
            n: full_case_estimate(r, full_shape, full_spacing, settings["preprocessing"]["target_spacing"])
            for n, r in runs.items()
        }
    write_json_atomic(args.out, result)
    print_table(result)
    print(f"wrote {args.out}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
