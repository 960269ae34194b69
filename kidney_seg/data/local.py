"""Cases the user already has: a folder in KiTS layout, or a CSV manifest of any paths.

KiTS layout: ``<root>/case_XXXXX/imaging.nii.gz`` with an optional
``segmentation.nii.gz`` beside it; a case without it is imaging-only (predicted, never
trained on or evaluated). Manifest: a CSV with columns ``case_id,image,label``; an empty
label means imaging-only, relative paths are taken from the CSV's folder. Case ids must
match ``case_XXXXX`` (five digits), the workflow's ``{case}`` wildcard constraint.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from kidney_seg.errors import CaseDataError

log = logging.getLogger(__name__)

IMAGE_NAME, LABEL_NAME = "imaging.nii.gz", "segmentation.nii.gz"
CASE_ID = re.compile(r"^case_\d{5}$")
MANIFEST_COLUMNS = ("case_id", "image", "label")

#: One case as (case id, image path, label path or None).
Entry = tuple[str, str, str | None]


def list_local(dataset_cfg: dict) -> list[Entry]:
    """The user's cases, from ``dataset.manifest`` when set, else from ``dataset.root``."""
    manifest = dataset_cfg.get("manifest")
    entries = read_manifest(manifest) if manifest else scan_root(dataset_cfg.get("root"))
    return sorted(entries)


def scan_root(root: str | os.PathLike | None) -> list[Entry]:
    """Cases of a folder in KiTS layout; folders without imaging are skipped with a warning."""
    if not root or not Path(root).is_dir():
        raise CaseDataError(None, root, "dataset.root is not a folder (source 'local' needs it, or dataset.manifest)")
    entries = [e for d in sorted(Path(root).iterdir()) if d.is_dir() and (e := _case_dir(d)) is not None]
    if not entries:
        raise CaseDataError(None, root, f"no case_XXXXX/{IMAGE_NAME} found (expected the KiTS layout)")
    return entries


def _case_dir(folder: Path) -> Entry | None:
    """The case held by one sub-folder of the root, or None when it holds no case."""
    image, label = folder / IMAGE_NAME, folder / LABEL_NAME
    if not CASE_ID.match(folder.name):
        if image.exists():
            log.warning("ignoring %s: folder name is not case_XXXXX (five digits)", folder)
        return None
    if not image.is_file():
        if label.exists():
            raise CaseDataError(folder.name, image, f"file not found (the folder has a {LABEL_NAME})")
        log.warning("ignoring %s: no %s", folder, IMAGE_NAME)
        return None
    return folder.name, str(image), str(label) if label.is_file() else None


def read_manifest(manifest: str | os.PathLike) -> list[Entry]:
    """Cases listed in a manifest CSV, checked: columns, ids, duplicates, files."""
    path = Path(manifest)
    if not path.is_file():
        raise CaseDataError(None, path, "dataset.manifest not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        _check_columns(reader.fieldnames, path)
        entries = [_manifest_row(row, reader.line_num, path) for row in reader]
    if not entries:
        raise ValueError(f"manifest {path} lists no cases")
    _check_unique(entries, path)
    return [(case, image, label) for case, image, label, _ in entries]


def _check_columns(fieldnames: list[str] | None, path: Path) -> None:
    """Raise unless the header names case_id, image and label."""
    missing = [c for c in MANIFEST_COLUMNS if c not in [f.strip() for f in fieldnames or []]]
    if missing:
        raise ValueError(f"manifest {path}: missing column(s) {missing}; expected header {','.join(MANIFEST_COLUMNS)}")


def _cell(row: dict, column: str) -> str:
    """A stripped cell, '' when the row is short."""
    for key, value in row.items():
        if key is not None and key.strip() == column:
            return (value or "").strip()
    return ""


def _manifest_row(row: dict, line: int, path: Path) -> tuple[str, str, str | None, int]:
    """(case id, image, label or None, line) of one CSV row, with paths resolved and checked."""
    case_id = _cell(row, "case_id")
    if not CASE_ID.match(case_id):
        raise ValueError(
            f"manifest {path} line {line}: case id {case_id!r} must match case_XXXXX with five digits "
            "(the workflow's {case} wildcard constraint)"
        )
    image, label = _cell(row, "image"), _cell(row, "label")
    if not image:
        raise CaseDataError(case_id, path, f"line {line}: empty image path")
    label_path = _existing(label, path, case_id, line) if label else None
    return case_id, _existing(image, path, case_id, line), label_path, line


def _existing(value: str, manifest: Path, case_id: str, line: int) -> str:
    """A manifest path resolved against the CSV's folder; raise when the file is missing."""
    resolved = Path(os.path.expanduser(value))
    if not resolved.is_absolute():
        resolved = manifest.parent / resolved
    resolved = Path(os.path.normpath(resolved))
    if not resolved.is_file():
        raise CaseDataError(case_id, resolved, f"file not found (manifest {manifest} line {line})")
    return str(resolved)


def _check_unique(entries: list[tuple[str, str, str | None, int]], path: Path) -> None:
    """Raise on a case id listed twice, naming both lines."""
    first: dict[str, int] = {}
    for case_id, _, _, line in entries:
        if case_id in first:
            raise ValueError(f"manifest {path}: case {case_id} listed twice (lines {first[case_id]} and {line})")
        first[case_id] = line


def missing_file(case_id: str, out: str | os.PathLike, what: str) -> CaseDataError:
    """The error for a local file the workflow asked for but the user does not have."""
    return CaseDataError(
        case_id, out, f"{what} file not found; source 'local' only reads existing files (see dataset.root, dataset.manifest)"
    )
