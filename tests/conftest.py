"""Shared fixtures: small synthetic volumes and the real KiTS label headers."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def kits_affine(spacing=(3.0, 0.8, 0.8)) -> np.ndarray:
    """The KiTS19 header convention: axis codes (I, P, L), slices on axis 0."""
    s0, s1, s2 = spacing
    return np.array([[0, 0, -s2, 0], [0, -s1, 0, 0], [-s0, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 1) -> Path:
    """Write a NIfTI file with given qform/sform codes."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, qcode)
    img.set_sform(affine, scode)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def dotted_name(node) -> str:
    """``a.b.c`` of an ast Name/Attribute chain, '' for anything else (for the static source audits)."""
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


@pytest.fixture
def kits_labels_dir() -> Path:
    """The real KiTS19 label files in ../shared/data, or skip."""
    d = SHARED_DATA / "kits19-labels"
    if not d.is_dir():
        pytest.skip(f"real KiTS labels not found at {d} (../shared/data is absent)")
    return d
