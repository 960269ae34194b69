"""Fast whole-case inference against full tiling, with a trained model: time per case and Dice, in one run.

    .venv/bin/python benchmarks/fast_inference.py --model-dir results/demo/model --images DIR/case_*/imaging.nii.gz
        [--modes full whole localized] [--set inference.KEY=VALUE ...] [--out results/benchmarks/fast_inference.json]

For each scan (``--images``; its label is the ``segmentation.nii.gz`` beside it, when there is one)
and each mode, :func:`kidney_seg.inference.predict_volume` runs with the model's plan and the
config's ``inference`` section (schema defaults, then ``--set``) overlaid by the mode:

  full       sliding window of the training patch, Gaussian weights, mirror TTA (the paper setting);
  whole      whole slices (``tiling: whole_slice``), mirror TTA;
  localized  whole slices, mirror TTA, the full pass only on the box a cheap pass finds (its
             slices, cropped in-plane; ``localize: true``, with its fallbacks;
             kidney_seg/localization.py), the crop predicted whole;
  tiles_localized  the same, the crop tiled by the sliding window (Gaussian weights, mirror TTA).

The scan is read once per case, outside the timing; each mode's time is the whole
``predict_volume`` (preprocess, forward passes, aggregation, resampling to the scan's grid,
argmax). The modes run one after the other in this process, so their ratios come from one
run on one machine state. Per case and mode: seconds, speed-up over ``full``, TK and TU Dice
against the label and against ``full``'s labels; the means go to the table (printed) and,
with every case, to the JSON (written atomically).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = {
    "full": {"tiling": "sliding_window", "mirror_tta": True, "localize": False},
    "whole": {"tiling": "whole_slice", "mirror_tta": True, "localize": False},
    "localized": {"tiling": "whole_slice", "mirror_tta": True, "localize": True},
    "tiles_localized": {"tiling": "sliding_window", "mirror_tta": True, "localize": True},
}


def parse_set(text: str) -> tuple[str, object]:
    """``inference.KEY=VALUE`` (VALUE read as YAML) as (KEY, value)."""
    import yaml

    key, _, value = text.partition("=")
    section, _, name = key.partition(".")
    if section != "inference" or not name or not _:
        raise argparse.ArgumentTypeError(f"expected inference.KEY=VALUE, got {text!r}")
    return name, yaml.safe_load(value)


def region_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """TK (labels > 0) and TU (label 2) Dice."""
    from kidney_seg.evaluation import dice

    return {"tk": dice(pred > 0, truth > 0), "tu": dice(pred == 2, truth == 2)}


def run_case(image_path: Path, predictor, base_cfg: dict, modes: list[str]) -> dict:
    """Every mode on one scan: seconds, labels' Dice against the truth (if any) and against the first mode."""
    from kidney_seg.inference import predict_volume
    from kidney_seg.volume import read_image, read_label

    case = image_path.parent.name
    image, geometry = read_image(image_path, case)
    label_path = image_path.parent / "segmentation.nii.gz"
    fns, plan = predictor
    truth = read_label(label_path, case, tuple(plan["labels"]))[0] if label_path.is_file() else None
    out, first = {"case": case, "shape": list(image.shape), "spacing": list(geometry.spacing)}, None
    for mode in modes:
        cfg = {**base_cfg, **MODES[mode]}
        start = time.perf_counter()
        labels = predict_volume(image, geometry.spacing, plan, fns, cfg)
        seconds = time.perf_counter() - start
        row = {"seconds": round(seconds, 2)}
        if truth is not None:
            row["dice"] = region_dice(labels, np.asarray(truth))
        if first is None:
            first = labels
        else:
            row["dice_vs_" + modes[0]] = region_dice(labels, first)
        out[mode] = row
        print(f"{case} {mode}: {seconds:.1f} s {row.get('dice', '')}", file=sys.stderr, flush=True)
    return out


def summarize(cases: list[dict], modes: list[str]) -> dict:
    """Per mode: mean seconds, speed-up over the first mode (ratio of summed times), mean Dice, worst drop."""
    total = {m: sum(c[m]["seconds"] for c in cases) for m in modes}
    out = {}
    for m in modes:
        row = {"mean_s": round(total[m] / len(cases), 1), "speedup": round(total[modes[0]] / total[m], 2)}
        for region in ("tk", "tu"):
            scored = [c[m]["dice"][region] for c in cases if "dice" in c[m]]
            if scored:
                row[f"{region}_dice"] = round(float(np.mean(scored)), 4)
            versus = [c[m][f"dice_vs_{modes[0]}"][region] for c in cases if f"dice_vs_{modes[0]}" in c[m]]
            if versus:
                row[f"{region}_dice_vs_{modes[0]}_min"] = round(float(np.min(versus)), 4)
            if scored and m != modes[0]:
                first = [c[modes[0]]["dice"][region] for c in cases if "dice" in c[m]]
                row[f"{region}_dice_change"] = round(float(np.mean(scored) - np.mean(first)), 4)
        out[m] = row
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every mode on every scan; print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True, help="a model folder, or a folder of fold_* folders")
    p.add_argument("--images", type=Path, nargs="+", required=True, help="imaging.nii.gz files (label beside)")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["full", "whole", "localized"])
    p.add_argument("--set", dest="sets", type=parse_set, action="append", default=[], metavar="inference.KEY=VALUE")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "fast_inference.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)

    from kidney_seg.atomic import write_json_atomic
    from kidney_seg.config import with_defaults
    from kidney_seg.environment import accelerator_devices, cpu_model, describe_device
    from kidney_seg.inference import load_predictor

    base_cfg = with_defaults("inference", dict(args.sets))
    predictor = load_predictor(args.model_dir)
    cases = [run_case(path, predictor, base_cfg, args.modes) for path in args.images]
    result = {
        "model_dir": str(args.model_dir),
        "device": describe_device(accelerator_devices()),
        "cpu_model": cpu_model(),
        "threads": os.cpu_count(),
        "inference": base_cfg,
        "summary": summarize(cases, args.modes),
        "cases": cases,
    }
    write_json_atomic(args.out, result)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
