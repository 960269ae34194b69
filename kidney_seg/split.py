"""The seeded train/validation/test split."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from kidney_seg.atomic import atomic_path

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


def make_split(case_ids: list[str], fractions=(0.8, 0.1, 0.1), seed: int = 42, folds: int = 1) -> pd.DataFrame:
    """Assign cases to train/val/test, independent of the input order; with folds > 1 also to folds."""
    ids = sorted(set(case_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train, n_val, _ = subset_sizes(len(ids), tuple(fractions))
    subset = np.empty(len(ids), dtype=object)
    subset[order[:n_train]] = "train"
    subset[order[n_train : n_train + n_val]] = "val"
    subset[order[n_train + n_val :]] = "test"
    df = pd.DataFrame({"case_id": ids, "subset": subset})
    if folds > 1:
        df["fold"] = assign_folds(order[: n_train + n_val], len(ids), folds)
    return df


def assign_folds(development: np.ndarray, n: int, folds: int) -> list[str]:
    """Deal the (already shuffled) train+val cases into ``folds`` folds; test cases get none."""
    if folds > len(development):
        raise ValueError(f"{folds} folds need at least {folds} train+val cases, got {len(development)}")
    fold = [""] * n
    for rank, index in enumerate(development):
        fold[index] = str(rank % folds)
    return fold


def fold_cases(df: pd.DataFrame, fold: int) -> tuple[list[str], list[str]]:
    """(train, val) case ids of one cross-validation fold: the fold validates, the others train."""
    if "fold" not in df.columns:
        raise ValueError("split.csv has no fold column (set split.folds > 1)")
    dev = df[df["subset"] != "test"]
    val = dev["fold"].astype(str) == str(fold)
    return sorted(dev.loc[~val, "case_id"]), sorted(dev.loc[val, "case_id"])


def write_split(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write split.csv atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_split(path: str | os.PathLike) -> pd.DataFrame:
    """Read split.csv and check its columns and subsets."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns[:2]) != ["case_id", "subset"] or not set(df["subset"]) <= set(SUBSETS):
        raise ValueError(f"{path}: not a split file (columns case_id, subset in {SUBSETS})")
    return df


def cases_in(df: pd.DataFrame, subset: str) -> list[str]:
    """Sorted case ids of one subset."""
    return sorted(df.loc[df["subset"] == subset, "case_id"].tolist())
