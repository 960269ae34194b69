"""Round-trip ceiling: what a perfect prediction on the plan's grid scores on each scan's own grid.

    .venv/bin/python benchmarks/round_trip_ceiling.py [--data ../shared/data/kits19-labels]
        [--spacing 3.0 0.7816 0.7816] [--cases case_00000 ...] [--out results/benchmarks/round_trip_ceiling.csv]

For every KiTS19 label file: the truth (internal orientation) resampled nearest to the
target spacing (:func:`kidney_seg.preprocessing.label_on_plan_grid`) is the perfect
plan-grid prediction; its one-hot class scores go back to the scan's grid the way
inference sends its class scores back (:func:`kidney_seg.inference.probabilities_to_labels`:
linear in-plane, and across slices both ways, linear and nearest) and are scored against
the truth (TK and TU Dice, :func:`kidney_seg.evaluation.dice`). The labels come without
their CT scans, so there is no body box: the crop box is the whole scan (the body crop
only shifts the in-plane grid by whole voxels). Prints a Markdown table (per case, then
the mean) and writes it as CSV with ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kidney_seg.evaluation import dice
from kidney_seg.inference import ACROSS_SLICES, probabilities_to_labels
from kidney_seg.preprocessing import label_on_plan_grid, resampled_shape
from kidney_seg.vocabulary import KITS19_LABELS, TUMOR
from kidney_seg.volume import read_label

PAPER_SPACING = (3.0, 0.7816, 0.7816)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class scores (C, Z, Y, X) float32 that are 1 for each voxel's class and 0 elsewhere."""
    return np.stack([(labels == c).astype(np.float32) for c in range(num_classes)])


def ceiling_of_case(case_id: str, label_path: Path, spacing: tuple[float, float, float]) -> dict:
    """TK/TU Dice of one case's perfect plan-grid prediction after the round trip, per way across slices."""
    truth, geometry = read_label(label_path, case_id, KITS19_LABELS)
    truth = np.ascontiguousarray(truth)
    box = tuple(slice(0, n) for n in truth.shape)
    shape = resampled_shape(truth.shape, geometry.spacing, spacing)
    scores = one_hot(label_on_plan_grid(truth, box, shape), len(KITS19_LABELS))
    row = {
        "case_id": case_id,
        "slice_mm": round(geometry.spacing[0], 3),
        "pixel_mm": round(geometry.spacing[1], 3),
        "shape": "x".join(map(str, truth.shape)),
        "plan_grid_shape": "x".join(map(str, shape)),
    }
    for way in ACROSS_SLICES:
        back = probabilities_to_labels(scores, truth.shape, across_slices=way)
        row[f"tk_dice_{way}"] = dice(back > 0, truth > 0)
        row[f"tu_dice_{way}"] = dice(back == TUMOR, truth == TUMOR)
    return row


def main(argv: list[str] | None = None) -> int:
    """Measure every case under ``--data`` (or those named) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/kits19-labels"))
    parser.add_argument("--spacing", type=float, nargs=3, default=PAPER_SPACING, metavar=("Z", "Y", "X"))
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    folders = sorted(p for p in args.data.glob("case_*") if (p / "segmentation.nii.gz").is_file())
    if args.cases:
        folders = [p for p in folders if p.name in set(args.cases)]
    if not folders:
        print(f"no case_*/segmentation.nii.gz under {args.data}", file=sys.stderr)
        return 1
    start, rows = time.perf_counter(), []
    for folder in folders:
        rows.append(ceiling_of_case(folder.name, folder / "segmentation.nii.gz", tuple(args.spacing)))
        print(f"{folder.name}: done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    table = pd.DataFrame(rows)
    scores = [c for c in table.columns if "_dice_" in c]
    mean = {"case_id": f"mean ({len(table)} cases)", **table[scores].mean().to_dict()}
    shown = pd.concat([table, pd.DataFrame([mean])], ignore_index=True).astype(object).fillna("")
    print(f"spacing {list(args.spacing)} mm, {time.perf_counter() - start:.0f} s")
    print(shown.to_markdown(index=False, floatfmt=".4f"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
