"""Input checks per case, and the list of cases the rest of the workflow can use.

Every case is read once up front with the same readers and checks the later stages use
(:func:`kidney_seg.preprocessing.read_image` and :func:`read_label`): a complete gzip
stream, a readable 3D NIfTI with at least two slices, finite intensities, label values
from the expected set, and image and label on the same grid. A case that fails is not a
crash of the whole run: its check record says why (the :class:`CaseDataError` message,
naming the case and the file), the workflow leaves it out of training, prediction and
evaluation, and the report and the end-of-run message list it. With
``dataset.on_bad_case: fail`` the check raises instead and the run stops there.
Only :class:`CaseDataError` (bad data) is recorded; any other exception is a bug and
propagates.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from kidney_seg.errors import CaseDataError
from kidney_seg.atomic import atomic_path, read_json, write_json_atomic

log = logging.getLogger(__name__)

#: Columns of the per-run check table (checks.csv).
CHECK_COLUMNS: tuple[str, ...] = ("case_id", "ok", "stage", "file", "reason", "log")
#: Columns of failures.csv, the table the report renders.
FAILURE_COLUMNS: tuple[str, ...] = ("case_id", "stage", "reason", "log")


def check_case(case_id: str, image_path: str | os.PathLike, label_path: str | os.PathLike | None,
               labels: tuple[int, ...]) -> dict:
    """Read a case as the pipeline will and return its check record (ok, or the failure and its reason)."""
    from kidney_seg.preprocessing import check_extent, read_image, read_label

    try:
        image, geometry = read_image(image_path, case_id)
        check_extent(image.shape, case_id, image_path)
        del image
        if label_path is not None:
            read_label(label_path, case_id, tuple(labels), geometry)
    except CaseDataError as exc:
        log.error("%s", exc)
        return {"case_id": case_id, "ok": False, "stage": "check", "file": exc.path, "reason": exc.reason}
    return {"case_id": case_id, "ok": True, "stage": "check", "file": "", "reason": ""}


def run_check(case_id: str, image_path, label_path, labels: tuple[int, ...], out_json: str | os.PathLike,
              log_path: str | os.PathLike | None = None, on_bad_case: str = "skip") -> dict:
    """Check one case and write its record atomically; with ``on_bad_case='fail'`` a bad case raises."""
    if on_bad_case not in ("skip", "fail"):
        raise ValueError(f"on_bad_case must be 'skip' or 'fail', got {on_bad_case!r}")
    record = {**check_case(case_id, image_path, label_path, labels), "log": str(log_path or "")}
    if not record["ok"] and on_bad_case == "fail":
        raise CaseDataError(case_id, record["file"], record["reason"])
    write_json_atomic(out_json, record)
    return record


def read_check(path: str | os.PathLike) -> dict:
    """One check record, validated."""
    record = read_json(path)
    if not isinstance(record, dict) or not {"case_id", "ok"} <= set(record):
        raise ValueError(f"{path}: not a case check record (needs case_id and ok)")
    return record


def collect_checks(check_jsons: list, out_csv: str | os.PathLike, failures_csv: str | os.PathLike) -> pd.DataFrame:
    """Gather the per-case records into checks.csv and the failed ones into failures.csv (both atomic)."""
    table = pd.DataFrame([read_check(p) for p in check_jsons], columns=list(CHECK_COLUMNS))
    table = table.sort_values("case_id", kind="stable").reset_index(drop=True)
    table["ok"] = table["ok"].astype(bool)
    failed = table.loc[~table["ok"], list(FAILURE_COLUMNS)]
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(failures_csv) as tmp:
        failed.to_csv(tmp, index=False)
    if len(failed):
        log.warning("%d of %d cases failed their input checks and are left out: %s", len(failed), len(table),
                    ", ".join(failed["case_id"]))
    return table


def usable_cases(checks_csv: str | os.PathLike) -> set[str]:
    """Ids of the cases that passed their checks."""
    table = pd.read_csv(checks_csv, dtype={"case_id": str}, keep_default_na=False)
    ok = table["ok"].astype(str).str.lower() == "true"
    return set(table.loc[ok, "case_id"])


def failure_message(failures_csv: str | os.PathLike) -> str | None:
    """A console message listing the failed cases and why, or None when every case passed."""
    path = Path(failures_csv)
    if not path.is_file():
        return None
    failed = pd.read_csv(path, dtype=str, keep_default_na=False)
    if failed.empty:
        return None
    lines = [f"WARNING: {len(failed)} case(s) failed and were left out of training, prediction and evaluation:"]
    lines += [f"  {r.case_id} ({r.stage}): {r.reason}  [log: {r.log}]" for r in failed.itertuples()]
    lines.append(f"  The list is in {path} and in the report's Failures section.")
    return "\n".join(lines)

