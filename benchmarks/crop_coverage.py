"""Crop coverage: how often a training crop keeps the class its slice was drawn for, per crop mode.

    .venv/bin/python benchmarks/crop_coverage.py [--data ../shared/data/kits19-labels] [--cases case_00000 ...]
        [--batches 300] [--seed 0] [--out results/benchmarks/crop_coverage.csv]

Every KiTS19 label file under ``--data`` is read (internal orientation) and resampled to
the paper's spacing, 3.0 x 0.7816 x 0.7816 mm, with the project's own label resampling
(:func:`kidney_seg.preprocessing.resample_label`). The labels come without their CT
scans, so there is no body box: each slice is the whole scan's field of view (the body
crop of the real caches makes slices smaller, which helps random crops). The sampler
itself draws the crops (:func:`kidney_seg.sampling.make_batch`, batches 0 to
``--batches`` - 1): batch 7, 5 foreground draws of which 2 tumour draws (tumor_per_batch 2:
the paper's 0 draws no slice for its tumour), patch 224 x 224, with each crop mode
(``paper``, ``foreground``) and each augmentation (the paper's; nnU-Net's,
presets/nnunet-augmentation.yaml). The image it augments is the label itself (only the
labels are measured). Per setting it reports:

- foreground draws (tumour draws included) whose crop holds foreground, overall and in
  the worst case (the case with the lowest fraction);
- tumour draws whose crop holds tumour, overall and in the worst case;
- centred crops whose window (before scaling and rotation) reaches past the slice, where
  they read the padding value.

Targets for ``crop: foreground``: 100 % foreground, at least 95 % tumour. Prints a Markdown
table; ``--out`` writes it as CSV. Without ``--data`` the benchmark is skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from kidney_seg.augmentation import Augmentation, make_augmenter
from kidney_seg.config import deep_merge, with_defaults
from kidney_seg.preprocessing import resample_label, resampled_shape, slice_index
from kidney_seg.sampling import (
    RANDOM_DRAW,
    TUMOR_DRAW,
    CaseSlices,
    batch_plan,
    centre_voxel,
    make_batch,
    slice_table,
)
from kidney_seg.vocabulary import KITS19_LABELS, TUMOR
from kidney_seg.volume import read_label

ROOT = Path(__file__).resolve().parents[1]
PAPER_SPACING = (3.0, 0.7816, 0.7816)
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "kits19-labels"
BATCH, N_FG, N_TUMOR = 7, 5, 2


def load_case(case_id: str, path: Path, spacing) -> CaseSlices:
    """One label volume at ``spacing`` as the sampler's case (the label doubles as the image)."""
    label, geometry = read_label(path, case_id, KITS19_LABELS)
    shape = resampled_shape(label.shape, geometry.spacing, spacing)
    seg = resample_label(np.ascontiguousarray(label), shape, len(KITS19_LABELS))
    index = slice_index(seg, len(KITS19_LABELS))
    return CaseSlices(case_id, seg, seg, np.asarray(index["foreground"]), np.asarray(index[f"class_{TUMOR}"]))


def training_settings(augmentation: str) -> dict:
    """The training section with the paper's augmentation or nnU-Net's, patch 224 and tumour draws."""
    over = {"tumor_per_batch": N_TUMOR, "batch_size": BATCH, "foreground_per_batch": N_FG}
    if augmentation == "nnunet":
        preset = yaml.safe_load((ROOT / "presets" / "nnunet-augmentation.yaml").read_text())["training"]
        over = deep_merge(preset, over)
    return with_defaults("training", over)


def past_the_slice(label: np.ndarray, seed: int, kind: int, patch) -> bool:
    """Whether the centred crop of one draw reaches past its slice (before scaling and rotation)."""
    centre = centre_voxel(np.random.default_rng(seed), label, kind)
    starts = [int(c) - p // 2 for c, p in zip(centre, patch)]
    return any(s < 0 or s + p > n for s, p, n in zip(starts, patch, label.shape))


def coverage(cases: list[CaseSlices], crop: str, augmentation: str, batches: int, seed: int) -> dict:
    """One setting's fractions of crops that keep their class, overall and in the worst case."""
    cfg = training_settings(augmentation)
    patch = tuple(cfg["patch_size"])
    aug = Augmentation.from_config(cfg["augmentation"])
    augmenter = make_augmenter(patch, cfg["scale_range"], cfg["p_scale"], cfg["p_mirror"], aug)
    tables = slice_table(cases)
    held = {"fg": defaultdict(list), "tumor": defaultdict(list)}
    past = []
    for k in range(batches):
        picks, kinds, seeds = batch_plan(k, tables, BATCH, N_FG, seed, N_TUMOR)
        _, labels = make_batch(k, cases, tables, augmenter, BATCH, N_FG, seed, N_TUMOR, crop)
        for (c, s), kind, sd, lab in zip(picks, kinds, seeds, labels):
            if kind == RANDOM_DRAW:
                continue
            held["fg"][c].append(bool((lab > 0).any()))
            if kind == TUMOR_DRAW:
                held["tumor"][c].append(bool((lab == TUMOR).any()))
            if crop == "foreground":
                past.append(past_the_slice(np.asarray(cases[c].label[s]), int(sd), int(kind), patch))
    row = {"crop": crop, "augmentation": augmentation}
    for name, per_case in held.items():
        every = [v for values in per_case.values() for v in values]
        worst = min(per_case, key=lambda c: np.mean(per_case[c]))
        row[f"{name}_draws"] = len(every)
        row[f"{name}_kept"] = float(np.mean(every))
        row[f"{name}_worst"] = float(np.mean(per_case[worst]))
        row[f"{name}_worst_case"] = f"{cases[worst].case_id} ({len(per_case[worst])} draws)"
    row["past_the_slice"] = float(np.mean(past)) if past else float("nan")
    return row


def main(argv: list[str] | None = None) -> int:
    """Measure both crop modes with both augmentations and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    folders = sorted(p for p in args.data.glob("case_*") if (p / "segmentation.nii.gz").is_file())
    if args.cases:
        folders = [p for p in folders if p.name in set(args.cases)]
    if not folders:
        print(f"skipped: no case_*/segmentation.nii.gz under {args.data} (the shared KiTS19 labels)")
        return 0
    start = time.perf_counter()
    cases = [load_case(p.name, p / "segmentation.nii.gz", PAPER_SPACING) for p in folders]
    print(
        f"{len(cases)} cases resampled to {list(PAPER_SPACING)} mm ({time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
    )
    rows = []
    for augmentation in ("paper", "nnunet"):
        for crop in ("paper", "foreground"):
            rows.append(coverage(cases, crop, augmentation, args.batches, args.seed))
            print(f"crop {crop}, augmentation {augmentation}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    table = pd.DataFrame(rows)
    print(f"{len(cases)} cases, batches 0-{args.batches - 1}, seed {args.seed}, {time.perf_counter() - start:.0f} s")
    print(table.to_markdown(index=False, floatfmt=".4f"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
