"""The seeded train/validation/test split."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from kidney_seg.io import atomic_path

SUBSETS = ("train", "val", "test")


def subset_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Sizes of train/val/test for ``n`` cases; val and test get at least one case when n >= 3."""
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} labelled cases are too few for split fractions {list(fractions)}")
    return n_train, n_val, n_test


def make_split(case_ids: list[str], fractions=(0.8, 0.1, 0.1), seed: int = 42) -> pd.DataFrame:
    """Assign cases to train/val/test, independent of the input order."""
    ids = sorted(set(case_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train, n_val, _ = subset_sizes(len(ids), tuple(fractions))
    subset = np.empty(len(ids), dtype=object)
    subset[order[:n_train]] = "train"
    subset[order[n_train : n_train + n_val]] = "val"
    subset[order[n_train + n_val :]] = "test"
    return pd.DataFrame({"case_id": ids, "subset": subset})


def write_split(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write split.csv atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_split(path: str | os.PathLike) -> pd.DataFrame:
    """Read split.csv and check its columns and subsets."""
    df = pd.read_csv(path, dtype=str)
    if list(df.columns[:2]) != ["case_id", "subset"] or not set(df["subset"]) <= set(SUBSETS):
        raise ValueError(f"{path}: not a split file (columns case_id, subset in {SUBSETS})")
    return df


def cases_in(df: pd.DataFrame, subset: str) -> list[str]:
    """Sorted case ids of one subset."""
    return sorted(df.loc[df["subset"] == subset, "case_id"].tolist())
