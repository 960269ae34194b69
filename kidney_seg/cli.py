"""The ``kidney-seg`` command: segment new scans and score predictions outside the workflow."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from kidney_seg import __version__
from kidney_seg.config import with_defaults
from kidney_seg.dicom import is_series_folder
from kidney_seg.errors import CaseDataError
from kidney_seg.vocabulary import (
    IMAGE_NAME,
    LABEL_NAME,
    SOURCE_LABELS,
    challenge_title,
    surface_tolerances,
    tolerance_challenge,
)


def scan_inputs(paths: list[str]) -> list[Path]:
    """Expand files and folders into scans: NIfTI files and DICOM series folders.

    A folder that holds DICOM files is one series; any other folder gives its NIfTI files,
    its KiTS-layout ``case_*/imaging.nii.gz`` and its sub-folders that are series.
    """
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if is_series_folder(p):
            found.append(p)
        elif p.is_dir():
            found += sorted(p.glob("*.nii.gz")) + sorted(p.glob("*.nii")) + sorted(p.glob(f"case_*/{IMAGE_NAME}"))
            found += [d for d in sorted(p.iterdir()) if not d.name.startswith(".") and is_series_folder(d)]
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    if not found:
        raise FileNotFoundError(f"no NIfTI files or DICOM series found in {', '.join(paths)}")
    return found


def case_name(path: Path) -> str:
    """A name for the output: the folder of a DICOM series or of a KiTS-layout case, else the file stem."""
    if path.is_dir():
        return path.resolve().name
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
    given = {
        "step": args.step,
        "batch_size": args.batch_size,
        "tiling": "whole_slice" if args.whole_slice else None,
        "mirror_tta": False if args.no_tta else None,
        "localize": True if args.localize else None,
    }
    return with_defaults("inference", {k: v for k, v in given.items() if v is not None})


def check_output_format(inputs: list[Path], output_format: str) -> None:
    """Raise before any prediction when an input cannot be written in the output format (DICOM SEG needs a series)."""
    if output_format != "dicom-seg":
        return
    files = [str(p) for p in inputs if not p.is_dir()]
    if files:
        raise ValueError(
            f"--output-format dicom-seg needs DICOM series folders as inputs (a SEG references its source "
            f"images); not a series: {', '.join(files)}"
        )


def model_name(model_dir: Path, folders: list[Path]) -> str:
    """How a SEG names the model: its folder and the number of ensemble members."""
    return f"2D U-Net {model_dir.resolve().name} ({len(folders)} model(s))"


def qc_reference_of(model_dir: Path) -> dict | None:
    """The model folder's QC reference (its qc_reference.json), or None with a note on stderr."""
    from kidney_seg.quality import read_reference

    path = model_dir / "qc_reference.json"
    if path.is_file():
        return read_reference(path)
    print(f"no {path}: QC flags without the training-range and uncertainty checks", file=sys.stderr)
    return None


def segment_one(args: argparse.Namespace, path: Path, run: dict, scratch: Path) -> dict:
    """Segment one scan, write its output (NIfTI, or DICOM SEG and no NIfTI) and return its qc.csv row."""
    from kidney_seg.dicom import read_series_header, write_seg
    from kidney_seg.inference import segment_case
    from kidney_seg.quality import assess_labels
    from kidney_seg.volume import read_label

    name, out_dir = case_name(path), Path(args.output)
    seg = args.output_format == "dicom-seg"
    nifti = (scratch if seg else out_dir) / f"{name}.nii.gz"
    uncertainty_path = out_dir / f"{name}.uncertainty.nii.gz" if args.uncertainty_map else None
    result = segment_case(name, path, nifti, run["predictor"], run["inference"], run["postprocess"], uncertainty_path)
    labels, geometry = read_label(nifti, name, tuple(run["predictor"][1]["labels"]))
    qc = assess_labels(labels, geometry.spacing, result.summary, run["reference"])
    output = nifti
    if seg:
        output = out_dir / f"{name}.dcm"
        datasets = read_series_header(path, name).datasets
        write_seg(result.labels, datasets, output, run["predictor"][1]["class_names"], run["model"])
        nifti.unlink()
    return {"case": name, "input": str(path), "output": str(output), **qc}


def cmd_predict(args: argparse.Namespace) -> int:
    """Segment each input scan with a trained model folder (one model or a fold ensemble); write qc.csv beside."""
    from tqdm import tqdm

    from kidney_seg.environment import accelerator_devices, describe_device, import_framework
    from kidney_seg.inference import load_predictor, model_folders
    from kidney_seg.postprocessing import decided_steps
    from kidney_seg.quality import write_qc_csv

    import_framework()

    model_dir = Path(args.model_dir)
    folders = model_folders(model_dir)
    decision = postprocessing_decision(model_dir, not args.no_postprocessing)
    inputs = scan_inputs(args.inputs)
    check_output_format(inputs, args.output_format)
    run = {
        "predictor": load_predictor(folders),
        "inference": inference_config(args),
        "postprocess": decided_steps(decision),
        "model": model_name(model_dir, folders),
        "reference": qc_reference_of(model_dir),
    }
    steps = ", ".join(decision["apply"]) if decision and decision["apply"] else "none"
    print(f"{len(folders)} model(s) from {model_dir}; post-processing: {steps}", file=sys.stderr)
    print(f"running on {describe_device(accelerator_devices())}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="kidney-seg-") as scratch:  # the NIfTI predictions behind DICOM SEGs
        rows = [segment_one(args, path, run, Path(scratch)) for path in tqdm(inputs, desc="segmenting", unit="scan")]
    table = write_qc_csv(rows, Path(args.output) / "qc.csv")
    flagged = table.loc[table["qc_flagged"], ["case", "qc_reasons"]]
    print(f"wrote {len(inputs)} segmentation(s) and qc.csv to {args.output}; {len(flagged)} flagged")
    for case, reasons in flagged.itertuples(index=False):
        print(f"  {case}: {reasons}")
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
        help="segment new CT scans (NIfTI files, DICOM series or folders of them)",
        description="Segment CT scans with a model folder the pipeline trained (results/model). "
        "Each output is a uint8 NIfTI (0 background, 1 kidney, 2 tumour) on the input's exact grid, "
        "or with --output-format dicom-seg a DICOM Segmentation of the input series. qc.csv beside them lists "
        "each scan's uncertainty and QC flags with their reasons, flagged scans first.",
    )
    p.add_argument(
        "model_dir",
        help="trained model folder: results/model (every fold_*/ model, averaged, plus its "
        "postprocessing.json and qc_reference.json) or one folder holding model.keras and inference.json",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="NIfTI files, DICOM series folders (one CT series per folder; the output is named after the folder), "
        "or folders of NIfTI files (KiTS layout case_*/imaging.nii.gz works) or of series folders",
    )
    p.add_argument("-o", "--output", required=True, help="folder for the segmentations")
    p.add_argument(
        "--output-format",
        choices=("nifti", "dicom-seg"),
        default="nifti",
        help="nifti (default): NAME.nii.gz; dicom-seg: NAME.dcm, a BINARY DICOM SEG (one segment per class, "
        "SNOMED CT coded) referencing the source series, and no NIfTI (it is written to a temporary folder and "
        "removed); needs DICOM series inputs, checked before any prediction",
    )
    p.add_argument(
        "--uncertainty-map",
        action="store_true",
        help="also write NAME.uncertainty.nii.gz: the normalised entropy of the class scores (0 certain, 1 uniform), "
        "float32 on the input's grid; the per-scan summaries go to qc.csv either way",
    )
    p.add_argument(
        "--whole-slice",
        action="store_true",
        help="predict each slice in one pass instead of overlapping tiles (inference.tiling: whole_slice; faster)",
    )
    p.add_argument(
        "--localize",
        action="store_true",
        help="predict fully only near the kidneys, found by a cheap first pass, falling back to every slice when it "
        "misses (inference.localize; 2-4x faster on CPU, benchmarks/README.md)",
    )
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
