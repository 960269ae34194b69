"""Do the uncertainty score and the QC flags mean something? Rank correlation with Dice, flagged against unflagged.

    .venv/bin/python benchmarks/qc_evidence.py --out results/qc_evidence \\
        --run real results/real_geometry/paper/results results/real_geometry/data --corrupt real \\
        [--run phantom results/demo/results results/demo/data/phantom] [--set inference.KEY=VALUE ...]

Each ``--run NAME RESULTS DATA`` is a finished workflow run: ``RESULTS`` holds ``split.csv`` and
``model/`` (the fold models and postprocessing.json), ``DATA`` the cases in KiTS layout
(``case_X/imaging.nii.gz`` and ``segmentation.nii.gz``). Its test cases are segmented again here,
as ``kidney-seg predict`` does it (:func:`kidney_seg.inference.segment_case`, the decided
post-processing, the ``inference`` config of the schema with ``--set`` on top), scored with the
workflow's metrics and flagged with :func:`kidney_seg.quality.assess_labels` against the run's
``model/qc_reference.json``, or, for a run made before that file existed, a reference built the
way the workflow builds it (the schema's ``qc`` defaults): the training and validation cases'
range (volumes, kidney HU, spacing, field of view), and the uncertainty thresholds from the
validation cases, predicted here first.

For the runs named by ``--corrupt``, each test case is also written three times, spoiled on
purpose (image only; the label follows any change of grid), into ``<out>/data``:

  noise      Gaussian noise of sigma 80 HU added (seeded per case);
  truncated  the field of view cut across the slice axis at the middle of the kidneys, keeping
             the larger part (image and label cropped alike, the affine moved with them);
  shifted    the HU scale shifted by +250 (a wrong rescale intercept).

Out: ``cases.csv`` (one row per case: run, corruption, Dice, uncertainty, flags, seconds),
``summary.json`` and ``summary.md``: Spearman's rho of each uncertainty score against TK and TU
Dice (all cases with a value), the mean Dice of flagged against unflagged cases, how often each
reason fired, and the cost of the uncertainty over the case's whole prediction time: the summary
(:func:`kidney_seg.quality.uncertainty_summary`, always computed) and the optional map on the
scan's grid (:func:`kidney_seg.inference.uncertainty_on_scan_grid`, file writing not included),
both timed on class scores of the case's plan-grid shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kidney_seg.atomic import atomic_path, write_json_atomic  # noqa: E402
from kidney_seg.config import with_defaults  # noqa: E402
from kidney_seg.evaluation import case_metrics  # noqa: E402
from kidney_seg.inference import load_predictor, segment_case, uncertainty_on_scan_grid  # noqa: E402
from kidney_seg.postprocessing import decided_steps, read_decision  # noqa: E402
from kidney_seg.preprocessing import class_volumes_ml  # noqa: E402
from kidney_seg.quality import (  # noqa: E402
    UNCERTAINTY_COLUMNS,
    assess_labels,
    build_reference,
    kidney_intensity,
    read_reference,
    strict_json,
    uncertainty_summary,
)
from kidney_seg.volume import read_image, read_label  # noqa: E402

log = logging.getLogger("qc_evidence")
CORRUPTIONS = ("noise", "truncated", "shifted")
#: Each kind of QC reason and the words that mark it (kidney_seg/quality.py writes them).
REASON_KINDS = (
    ("kidney components not 2", "kidney components"),
    ("at the scan's edge", "scan's edge"),
    ("tumour not touching a kidney", "not touching a kidney"),
    ("kidney HU median out of range", "kidney HU median"),
    ("kidney HU noise out of range", "kidney HU noise"),
    ("kidney volume out of range", "kidney volume"),
    ("tumour volume out of range", "tumour volume"),
    ("spacing out of range", "spacing"),
    ("field of view out of range", "field of view"),
    ("high uncertainty", "high uncertainty"),
)
NOISE_HU, SHIFT_HU = 80.0, 250.0


def parse_set(text: str) -> tuple[str, object]:
    """``inference.KEY=VALUE`` (VALUE as JSON where it parses) -> (KEY, value)."""
    key, _, value = text.partition("=")
    if not key.startswith("inference.") or not value:
        raise argparse.ArgumentTypeError(f"expected inference.KEY=VALUE, got {text!r}")
    try:
        return key.removeprefix("inference."), json.loads(value)
    except json.JSONDecodeError:
        return key.removeprefix("inference."), value


def split_cases(results: Path) -> dict[str, list[str]]:
    """The run's cases by subset (train, val, test) from its split.csv."""
    split = pd.read_csv(results / "split.csv", dtype=str)
    return {s: sorted(split.loc[split["subset"] == s, "case_id"]) for s in ("train", "val", "test")}


def reference_of(results: Path, data: Path, cases: dict[str, list[str]], model: dict, out: Path) -> dict:
    """The run's QC reference: its model/qc_reference.json, else one built as the workflow builds it.

    That is, from the training and validation cases' labels (their volumes, spacing and field of
    view) and, for the uncertainty threshold, the validation cases predicted here.
    """
    existing = results / "model" / "qc_reference.json"
    if existing.is_file():
        return read_reference(existing)
    metas, records = [], []
    for case in cases["train"] + cases["val"]:
        image, geometry = read_image(data / case / "imaging.nii.gz", case)
        label, _ = read_label(data / case / "segmentation.nii.gz", case, (0, 1, 2), geometry)
        meta = {
            "spacing": list(geometry.spacing),
            "original_shape": list(geometry.internal_shape),
            "class_volumes_ml": class_volumes_ml(label, 3, geometry.spacing),
            "kidney_hu": kidney_intensity(image, label),
        }
        del image, label
        metas.append(out / "metas" / f"{case}.json")
        write_json_atomic(metas[-1], meta)
    for case in cases["val"]:
        pred = out / "validation" / f"{case}.nii.gz"
        result = segment_case(
            case, data / case / "imaging.nii.gz", pred, model["predictor"], model["inference"], model["postprocess"]
        )
        records.append(out / "validation" / f"{case}.json")
        write_json_atomic(records[-1], {"case_id": case, **strict_json(result.summary)})
    return build_reference(metas, with_defaults("qc", {}), out / "qc_reference.json", records)


def slice_axis_of(img: nib.Nifti1Image) -> int:
    """The file axis closest to the patient's superior-inferior axis (the internal slice axis)."""
    return int(np.flatnonzero(nib.orientations.io_orientation(img.affine)[:, 0] == 2)[0])


def corrupt(case: str, data: Path, kind: str, out: Path, seed: int) -> Path:
    """Write a spoiled copy of a case (image and label) as ``out/<case>_<kind>/``; return its folder."""
    folder = out / f"{case}_{kind}"
    if (folder / "segmentation.nii.gz").is_file():
        return folder
    image, label = nib.load(data / case / "imaging.nii.gz"), nib.load(data / case / "segmentation.nii.gz")
    pixels = np.asarray(image.dataobj, dtype=np.float32)
    if kind == "noise":
        rng = np.random.default_rng([seed, int(case.split("_")[1])])
        pixels = pixels + rng.normal(0.0, NOISE_HU, pixels.shape).astype(np.float32)
    elif kind == "shifted":
        pixels = pixels + SHIFT_HU
    elif kind == "truncated":
        axis = slice_axis_of(image)
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.asanyarray(label.dataobj).any(axis=other))
        cut = int((present[0] + present[-1]) // 2)
        keep = slice(0, cut) if cut >= image.shape[axis] - cut else slice(cut, image.shape[axis])
        index = tuple(keep if a == axis else slice(None) for a in range(3))
        image, label = image.slicer[index], label.slicer[index]
        pixels = pixels[index]
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    pixels = np.clip(np.rint(pixels), -32768, 32767).astype(np.int16)
    folder.mkdir(parents=True, exist_ok=True)
    for name, img, arr in (
        ("imaging.nii.gz", image, pixels),
        ("segmentation.nii.gz", label, np.asarray(label.dataobj).astype(np.uint8)),
    ):
        header = img.header.copy()
        header.set_data_dtype(arr.dtype)
        header.set_slope_inter(1.0, 0.0)
        with atomic_path(folder / name) as tmp:
            nib.save(nib.Nifti1Image(arr, img.affine, header), str(tmp))
    return folder


def uncertainty_seconds(grid, scan_shape: tuple[int, ...], num_classes: int) -> tuple[float, float]:
    """Seconds of the uncertainty summary and of the optional map on the scan's grid, for a case's grids (best of 2).

    Timed on random class scores of the plan grid's shape: both costs depend on the shapes alone.
    """
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(num_classes, *grid.shape)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    best = [np.inf, np.inf]
    for _ in range(2):
        start = time.perf_counter()
        uncertainty_summary(probs, grid.spacing)
        middle = time.perf_counter()
        uncertainty_on_scan_grid(probs, grid, scan_shape)
        best = [min(best[0], middle - start), min(best[1], time.perf_counter() - middle)]
    return float(best[0]), float(best[1])


def run_case(name: str, case: str, kind: str, folder: Path, model: dict, out: Path) -> dict:
    """Segment, score and flag one case; its row."""
    pred_path = out / "predictions" / name / f"{case}_{kind}.nii.gz"
    start = time.perf_counter()
    result = segment_case(
        case, folder / "imaging.nii.gz", pred_path, model["predictor"], model["inference"], model["postprocess"]
    )
    seconds = time.perf_counter() - start
    truth, geometry = read_label(folder / "segmentation.nii.gz", case, (0, 1, 2))
    pred, _ = read_label(pred_path, case, (0, 1, 2), grid=geometry)
    metrics = case_metrics(pred, truth, geometry.spacing)
    ref = model["reference"]
    qc = assess_labels(pred, geometry.spacing, result.summary, ref)
    summary_s, map_s = uncertainty_seconds(result.plan_grid, truth.shape, model["predictor"][1]["num_classes"])
    row = {
        "run": name,
        "case_id": case,
        "corruption": kind,
        "tk_dice": metrics["tk_dice"],
        "tu_dice": metrics["tu_dice"],
        "tu_missed": metrics["tu_missed"],
        **qc,
        "seconds": seconds,
        "uncertainty_seconds": summary_s,
        "uncertainty_map_seconds": map_s,
    }
    log.info("%s %s %s: TK %.3f TU %.3f %s", name, case, kind, row["tk_dice"], row["tu_dice"], qc["qc_reasons"])
    return row


def load_run(name: str, results: Path, data: Path, inference: dict, out: Path) -> dict:
    """The model, post-processing, inference settings and QC reference of one run."""
    cases = split_cases(results)
    model_dir = results / "model"
    model = {
        "predictor": load_predictor(model_dir),
        "postprocess": decided_steps(read_decision(model_dir / "postprocessing.json")),
        "inference": inference,
        "test": cases["test"],
    }
    model["reference"] = reference_of(results, data, cases, model, out / name)
    log.info("%s: QC reference %s", name, model["reference"])
    return model


def _rho(x: pd.Series, y: pd.Series) -> dict:
    """Spearman's rho of two columns over the rows where both have a value."""
    both = pd.concat([x, y], axis=1).dropna()
    if len(both) < 3:
        return {"rho": None, "p": None, "n": len(both)}
    rho, p = stats.spearmanr(both.iloc[:, 0], both.iloc[:, 1])
    return {"rho": float(rho), "p": float(p), "n": len(both)}


def summarize(table: pd.DataFrame) -> dict:
    """Correlations, flagged against unflagged Dice, reason counts and the uncertainty's cost."""
    correlations = {
        score: {region: _rho(table[score], table[f"{region}_dice"]) for region in ("tk", "tu")}
        for score in UNCERTAINTY_COLUMNS
    }
    by_run = {
        name: {score: {r: _rho(rows[score], rows[f"{r}_dice"]) for r in ("tk", "tu")} for score in UNCERTAINTY_COLUMNS}
        for name, rows in table.groupby("run")
    }
    groups = {}
    for flag, rows in table.groupby(table["qc_flagged"].astype(bool)):
        key = "flagged" if flag else "unflagged"
        groups[key] = {
            "n": len(rows),
            "tk_dice": float(rows["tk_dice"].mean()),
            "tu_dice": float(rows["tu_dice"].mean()),
        }
    reasons: dict[str, int] = {}
    for text in table["qc_reasons"].fillna(""):
        for reason in filter(None, (r.strip() for r in str(text).split(";"))):
            kind = next((name for name, marker in REASON_KINDS if marker in reason), reason)
            reasons[kind] = reasons.get(kind, 0) + 1
    share = table["uncertainty_seconds"] / table["seconds"]
    map_share = table["uncertainty_map_seconds"] / table["seconds"]
    return {
        "n_cases": len(table),
        "by_corruption": table.groupby("corruption")[["tk_dice", "tu_dice"]].mean().to_dict(),
        "correlation": correlations,
        "correlation_by_run": by_run,
        "flagged_by_corruption": table.groupby("corruption")["qc_flagged"].agg(["sum", "count"]).to_dict(),
        "flagged_vs_unflagged": groups,
        "reasons": reasons,
        "uncertainty_cost": {"mean_share": float(share.mean()), "max_share": float(share.max())},
        "uncertainty_map_cost": {"mean_share": float(map_share.mean()), "max_share": float(map_share.max())},
        "mean_seconds_per_case": float(table["seconds"].mean()),
    }


def markdown(summary: dict) -> str:
    """The tables for benchmarks/README.md."""
    lines = ["| uncertainty score | rho with TK Dice | rho with TU Dice | cases |", "|---|---|---|---|"]
    for score, by_region in summary["correlation"].items():
        cells = [f"{v['rho']:.2f}" if v["rho"] is not None else "-" for v in by_region.values()]
        lines.append(f"| {score} | {cells[0]} | {cells[1]} | {by_region['tk']['n']} |")
    lines += ["", "| cases | n | mean TK Dice | mean TU Dice |", "|---|---|---|---|"]
    for key, g in summary["flagged_vs_unflagged"].items():
        lines.append(f"| {key} | {g['n']} | {g['tk_dice']:.3f} | {g['tu_dice']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every case of every run, write the table and the summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs=3, action="append", required=True, metavar=("NAME", "RESULTS", "DATA"))
    p.add_argument("--corrupt", action="append", default=[], help="runs whose test cases are also spoiled")
    p.add_argument("--set", type=parse_set, action="append", default=[], help="inference.KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("results/qc_evidence"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--summarize-only", action="store_true", help="recompute the summary from <out>/cases.csv")
    args = p.parse_args(argv)
    if args.summarize_only:
        return write_summary(pd.read_csv(args.out / "cases.csv"), args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    inference = with_defaults("inference", {"tiling": "whole_slice", **dict(args.set)})
    rows = []
    for name, results, data in args.run:
        model = load_run(name, Path(results), Path(data), inference, args.out)
        for case in model["test"]:
            rows.append(run_case(name, case, "none", Path(data) / case, model, args.out))
            if name in args.corrupt:
                for kind in CORRUPTIONS:
                    folder = corrupt(case, Path(data), kind, args.out / "data", args.seed)
                    rows.append(run_case(name, case, kind, folder, model, args.out))
    table = pd.DataFrame(rows)
    with atomic_path(args.out / "cases.csv") as tmp:
        table.to_csv(tmp, index=False)
    return write_summary(table, args.out)


def write_summary(table: pd.DataFrame, out: Path) -> int:
    """Write summary.json and summary.md of the case table, and print them."""
    summary = summarize(table)
    write_json_atomic(out / "summary.json", summary)
    text = markdown(summary)
    with atomic_path(out / "summary.md") as tmp:
        Path(tmp).write_text(text)
    print(text)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
