"""The ``kidney-seg`` command: segment new scans and score predictions outside the workflow."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kidney_seg import __version__
from kidney_seg.config import with_defaults
from kidney_seg.errors import CaseDataError
from kidney_seg.vocabulary import (
    IMAGE_NAME,
    LABEL_NAME,
    SOURCE_LABELS,
    challenge_title,
    surface_tolerances,
    tolerance_challenge,
)


def nifti_inputs(paths: list[str]) -> list[Path]:
    """Expand files and folders into NIfTI files (a KiTS-layout folder gives its imaging files)."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found += sorted(p.glob("*.nii.gz")) + sorted(p.glob("*.nii")) + sorted(p.glob(f"case_*/{IMAGE_NAME}"))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    if not found:
        raise FileNotFoundError(f"no NIfTI files found in {', '.join(paths)}")
    return found


def case_name(path: Path) -> str:
    """A name for the output: the case folder for KiTS layout, else the file stem."""
    if path.name == IMAGE_NAME:
        return path.parent.name
    return path.name.removesuffix(".gz").removesuffix(".nii")


def postprocessing_decision(model_dir: Path, enabled: bool) -> dict | None:
    """The post-processing decided for a model folder (its postprocessing.json), if any and wanted."""
    from kidney_seg.postprocessing import read_decision

    path = model_dir / "postprocessing.json"
    return read_decision(path) if enabled and path.is_file() else None


def inference_config(args: argparse.Namespace) -> dict:
    """The ``inference`` config section of the options given; the rest from the schema's defaults."""
    given = {"step": args.step, "batch_size": args.batch_size}
    return with_defaults(
        "inference",
        {**{k: v for k, v in given.items() if v is not None}, **({"mirror_tta": False} if args.no_tta else {})},
    )


def cmd_predict(args: argparse.Namespace) -> int:
    """Segment each input scan with a trained model folder (one model or a fold ensemble)."""
    from tqdm import tqdm

    from kidney_seg.environment import accelerator_devices, describe_device
    from kidney_seg.inference import load_predictor, model_folders, predict_case
    from kidney_seg.postprocessing import decided_steps

    model_dir = Path(args.model_dir)
    folders = model_folders(model_dir)
    decision = postprocessing_decision(model_dir, not args.no_postprocessing)
    inputs = nifti_inputs(args.inputs)
    predictor = load_predictor(folders)
    cfg = inference_config(args)
    out_dir = Path(args.output)
    steps = ", ".join(decision["apply"]) if decision and decision["apply"] else "none"
    postprocess = decided_steps(decision)
    print(f"{len(folders)} model(s) from {model_dir}; post-processing: {steps}", file=sys.stderr)
    print(f"running on {describe_device(accelerator_devices())}", file=sys.stderr)
    for path in tqdm(inputs, desc="segmenting", unit="scan"):
        name = case_name(path)
        predict_case(
            name, path, model_dir, out_dir / f"{name}.nii.gz", cfg, predictor=predictor, postprocess=postprocess
        )
    print(f"wrote {len(inputs)} segmentation(s) to {out_dir}")
    return 0


def tolerance_note(source: str) -> str:
    """Which surface-Dice tolerances score a source, in words (for messages)."""
    tolerances = ", ".join(f"{region} {mm:.4f}" for region, mm in surface_tolerances(source).items())
    return f"surface Dice with {challenge_title(tolerance_challenge(source))} tolerances (mm): {tolerances}"


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score predictions against ground truth (the workflow's scorer) and write the metrics CSVs."""
    from kidney_seg.evaluation import evaluate_case, summarize

    pred_dir, truth_dir, out_dir = Path(args.pred_dir), Path(args.truth_dir), Path(args.output)
    for d in (pred_dir, truth_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"no such folder: {d}")
    jsons = []
    for pred in sorted(pred_dir.glob("*.nii.gz")):
        name = case_name(pred)
        truth = next((p for p in (truth_dir / name / LABEL_NAME, truth_dir / pred.name) if p.is_file()), None)
        if truth is None:
            raise FileNotFoundError(f"no ground truth for {name} in {truth_dir}")
        out = out_dir / "cases" / f"{name}.json"
        evaluate_case(name, pred, truth, out, args.source)
        jsons.append(out)
    if not jsons:
        raise FileNotFoundError(f"no predictions (*.nii.gz) in {pred_dir}")
    summarize(jsons, out_dir / "per_case.csv", out_dir / "summary.csv")
    print(f"wrote {out_dir / 'per_case.csv'} and {out_dir / 'summary.csv'} ({len(jsons)} cases)")
    print(f"{args.source} labels; {tolerance_note(args.source)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="kidney-seg", description="Kidney and kidney-tumour segmentation of CT scans with a trained 2D U-Net."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "predict",
        help="segment new CT scans (NIfTI files or folders)",
        description="Segment CT scans with a model folder the pipeline trained (results/model). "
        "Each output is a uint8 NIfTI (0 background, 1 kidney, 2 tumour) on the input's exact grid.",
    )
    p.add_argument(
        "model_dir",
        help="trained model folder: results/model (every fold_*/ model, averaged, plus its "
        "postprocessing.json) or one folder holding model.keras and inference.json",
    )
    p.add_argument(
        "inputs", nargs="+", help="NIfTI files, or folders of them (KiTS layout case_*/imaging.nii.gz works)"
    )
    p.add_argument("-o", "--output", required=True, help="folder for the segmentations")
    p.add_argument("--no-tta", action="store_true", help="switch off mirror test-time augmentation (4x faster)")
    p.add_argument(
        "--no-postprocessing",
        action="store_true",
        help="write the raw argmax, ignoring the model folder's postprocessing.json",
    )
    defaults = with_defaults("inference", {})
    p.add_argument("--step", type=float, help=f"tile step as a fraction of the patch (default {defaults['step']})")
    p.add_argument("--batch-size", type=int, help=f"tiles per forward pass (default {defaults['batch_size']})")
    p.set_defaults(func=cmd_predict)
    e = sub.add_parser(
        "evaluate",
        help="score predictions against ground truth",
        description="Compute per-case Dice, precision, recall, HD95, surface Dice (DeepMind's surface-distance, "
        "as the KiTS21/23 scorer), misses and volumes, and their summary: the workflow's evaluate step.",
    )
    e.add_argument("pred_dir", help="folder of predicted NIfTI files (NAME.nii.gz)")
    e.add_argument("truth_dir", help="folder of ground truth: NAME/segmentation.nii.gz or NAME.nii.gz")
    e.add_argument("-o", "--output", default="metrics", help="output folder (default: metrics)")
    e.add_argument(
        "--source",
        required=True,
        choices=sorted(SOURCE_LABELS),
        help="dataset source, as dataset.source in the config: its labels (kits21/kits23 add cyst = 3) and "
        "surface-Dice tolerances (KiTS21's for kits21, KiTS23's for every other source)",
    )
    e.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors give one line on stderr and exit code 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (CaseDataError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"kidney-seg: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
