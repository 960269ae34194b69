"""Cases the user already has: a folder in KiTS layout, or a CSV manifest of paths inside a data folder.

KiTS layout: ``<root>/case_XXXXX/imaging.nii.gz`` with an optional
``segmentation.nii.gz`` beside it; a case without it is imaging-only (predicted, never
trained on or evaluated). Manifest: a CSV with columns ``case_id,image,label``; an empty
label means imaging-only, relative paths are taken from the CSV's folder. Case ids must
match ``case_XXXXX`` (five digits), the workflow's ``{case}`` wildcard constraint.

DICOM: an image may be a folder holding one CT series (:mod:`kidney_seg.dicom`), the
manifest's image cell naming the folder, or, in KiTS layout, ``case_XXXXX/imaging/``
standing in for ``imaging.nii.gz``. Labels are NIfTI files.

Containment: every image and label must resolve (symlinks followed) inside the data
folder: ``dataset.root`` when set, else the manifest's own folder. A ``..`` path, an
absolute path elsewhere or a symlink leading out of it is refused with an error naming
the case, the manifest line and the path; so is a file of a series folder that leads out.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from kidney_seg.dicom import is_series_folder, series_files
from kidney_seg.errors import CaseDataError
from kidney_seg.vocabulary import IMAGE_NAME, LABEL_NAME, is_case_id

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("case_id", "image", "label")

#: The folder of a KiTS-layout case that may hold its CT as a DICOM series instead of imaging.nii.gz.
SERIES_FOLDER = "imaging"

#: One case as (case id, image path, label path or None).
Entry = tuple[str, str, str | None]


def list_local(dataset_cfg: dict) -> list[Entry]:
    """The user's cases, from ``dataset.manifest`` when set, else from ``dataset.root``."""
    manifest = dataset_cfg.get("manifest")
    entries = read_manifest(manifest, dataset_cfg.get("root")) if manifest else scan_root(dataset_cfg.get("root"))
    return sorted(entries)


def scan_root(root: str | os.PathLike | None) -> list[Entry]:
    """Cases of a folder in KiTS layout; folders without imaging are skipped with a warning."""
    if not root or not Path(root).is_dir():
        raise CaseDataError(None, root, "dataset.root is not a folder (source 'local' needs it, or dataset.manifest)")
    entries = [e for d in sorted(Path(root).iterdir()) if d.is_dir() and (e := _case_dir(d, Path(root))) is not None]
    if not entries:
        raise CaseDataError(None, root, f"no case_XXXXX/{IMAGE_NAME} found (expected the KiTS layout)")
    return entries


def _case_dir(folder: Path, root: Path) -> Entry | None:
    """The case held by one sub-folder of the root, or None when it holds no case."""
    image, label = folder / IMAGE_NAME, folder / LABEL_NAME
    if not image.is_file() and is_series_folder(folder / SERIES_FOLDER):
        image = folder / SERIES_FOLDER
    if not is_case_id(folder.name):
        if image.exists():
            log.warning("ignoring %s: folder name is not case_XXXXX (five digits)", folder)
        return None
    if not (image.is_file() or image.is_dir()):
        if label.exists():
            raise CaseDataError(folder.name, image, f"file not found (the folder has a {LABEL_NAME})")
        log.warning("ignoring %s: no %s", folder, IMAGE_NAME)
        return None
    label_path = label if label.is_file() else None
    for path in (image, label_path):
        if path is not None:
            _check_inside(path, root, folder.name, f"dataset.root {root}")
    if image.is_dir():
        _check_series_inside(image, root, folder.name, f"dataset.root {root}")
    return folder.name, str(image), str(label) if label_path else None


def read_manifest(manifest: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Entry]:
    """Cases listed in a manifest CSV, checked: columns, ids, duplicates, files and containment.

    Every file must resolve inside ``root`` (``dataset.root``) when given, else inside the
    manifest's folder.
    """
    path = Path(manifest)
    if not path.is_file():
        raise CaseDataError(None, path, "dataset.manifest not found")
    base = Path(root) if root else path.parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        _check_columns(reader.fieldnames, path)
        entries = [_manifest_row(row, reader.line_num, path, base, bool(root)) for row in reader]
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


def _manifest_row(row: dict, line: int, path: Path, base: Path, is_root: bool) -> tuple[str, str, str | None, int]:
    """(case id, image, label or None, line) of one CSV row, with paths resolved and checked."""
    case_id = _cell(row, "case_id")
    if not is_case_id(case_id):
        raise ValueError(
            f"manifest {path} line {line}: case id {case_id!r} must match case_XXXXX with five digits "
            "(the workflow's {case} wildcard constraint)"
        )
    image, label = _cell(row, "image"), _cell(row, "label")
    if not image:
        raise CaseDataError(case_id, path, f"line {line}: empty image path")
    where = f"{'dataset.root' if is_root else 'the manifest folder'} {base}"
    image_path = _existing(image, path, case_id, line, base, where, series=True)
    label_path = _existing(label, path, case_id, line, base, where) if label else None
    return case_id, image_path, label_path, line


def _existing(value: str, manifest: Path, case_id: str, line: int, base: Path, where: str, series: bool = False) -> str:
    """A manifest path resolved against the CSV's folder; raise when it leaves ``base`` or the file is missing.

    With ``series``, a DICOM series folder is accepted too (each of its files checked to lie inside ``base``).
    """
    resolved = Path(os.path.expanduser(value))
    if not resolved.is_absolute():
        resolved = manifest.parent / resolved
    resolved = Path(os.path.normpath(resolved))
    what = f"manifest {manifest} line {line} (path {value!r})"
    _check_inside(resolved, base, case_id, where, what)
    if series and is_series_folder(resolved):
        _check_series_inside(resolved, base, case_id, where, what)
        return str(resolved)
    if resolved.is_dir():
        reason = "holds no DICOM files" if series else "is a folder, not a file"
        raise CaseDataError(case_id, resolved, f"{reason} (manifest {manifest} line {line})")
    if not resolved.is_file():
        raise CaseDataError(case_id, resolved, f"file not found (manifest {manifest} line {line})")
    return str(resolved)


def _check_inside(path: Path, base: Path, case_id: str, where: str, what: str | None = None) -> None:
    """Raise unless ``path`` resolves (symlinks followed) inside ``base``; the error names the case and the path."""
    real, real_base = Path(path).resolve(), Path(base).resolve()
    if real.is_relative_to(real_base) and real != real_base:
        return
    via = f" (it resolves to {real})" if real != Path(os.path.abspath(path)) else ""
    raise CaseDataError(
        case_id,
        path,
        f"{what + ': ' if what else ''}outside {where}{via}; refused: files must lie inside the data folder",
    )


def _check_series_inside(folder: Path, base: Path, case_id: str, where: str, what: str | None = None) -> None:
    """Raise unless every file of a DICOM series folder resolves inside ``base`` (a symlink may lead out)."""
    for path in series_files(folder):
        _check_inside(path, base, case_id, where, what)


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
        case_id,
        out,
        f"{what} file not found; source 'local' only reads existing files (see dataset.root, dataset.manifest)",
    )
