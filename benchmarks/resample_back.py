"""Class scores back to a scan's grid: the time of :func:`kidney_seg.inference.probabilities_to_labels`.

    .venv/bin/python benchmarks/resample_back.py [--scores 3 102 212 294] [--scan 611 512 512]
        [--box-share 0.2] [--repeats 2]

Two sets of class scores on the plan's grid (default: case_00000 preprocessed at the demo
spacing, 102 x 212 x 294, three classes, resampled to 611 x 512 x 512):

  dense      softmax scores everywhere (full tiling, or whole slices);
  localised  background 1 and the rest 0 outside a centred box holding ``--box-share`` of the
             volume, softmax scores inside (what localised inference leaves).

Each is resampled ``--repeats`` times in this process and the best time kept. Scores are
seeded random softmax outputs: only the shapes matter for the time. Prints seconds and the
foreground voxel count (equal counts between code versions show equal labels).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kidney_seg.inference import probabilities_to_labels


def dense_scores(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Seeded softmax scores (C, Z, Y, X), float32."""
    logits = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    scores = np.exp(logits)
    scores /= scores.sum(axis=0)
    return scores


def localised_scores(dense: np.ndarray, share: float) -> np.ndarray:
    """``dense`` inside a centred box of ``share`` of the volume, certain background (1, 0, ...) outside."""
    out = np.zeros_like(dense)
    out[0] = 1.0
    side = share ** (1 / 3)
    box = tuple(slice(int(n * (1 - side) / 2), int(n * (1 + side) / 2)) for n in dense.shape[1:])
    out[(slice(None), *box)] = dense[(slice(None), *box)]
    return out


def best_time(scores: np.ndarray, scan: tuple[int, int, int], repeats: int) -> tuple[float, int]:
    """(best seconds of ``repeats`` runs, foreground voxels of the labels)."""
    labels = np.zeros(scan, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        probabilities_to_labels(scores, scan, out=labels)
        best = min(best, time.perf_counter() - start)
    return best, int(np.count_nonzero(labels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=int, nargs=4, default=[3, 102, 212, 294], metavar=("C", "Z", "Y", "X"))
    parser.add_argument("--scan", type=int, nargs=3, default=[611, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--box-share", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    dense = dense_scores(tuple(args.scores))
    scan = tuple(args.scan)
    print(f"scores {tuple(args.scores)} -> scan {scan}, best of {args.repeats}")
    for name, scores in (("dense", dense), ("localised", localised_scores(dense, args.box_share))):
        seconds, foreground = best_time(scores, scan, args.repeats)
        print(f"{name:10s} {seconds:6.2f} s  foreground voxels {foreground}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
