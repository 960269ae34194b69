"""Input checks per case, exclusion records, and the filters that keep excluded cases out.

Every case is read once up front (the ``check_case`` rule) with the same readers and checks
the later stages use (:func:`kidney_seg.volume.read_image` and :func:`read_label`): a
complete gzip stream, a readable 3D NIfTI with at least two slices, finite intensities,
label values from the expected set, and image and label on the same grid. Its check record
says ok, or why not (the :class:`CaseDataError` message: case, file and reason). With
``dataset.on_bad_case: fail`` the check raises instead, and that case's job fails.

The workflow's DAG is static (no checkpoint), so that ``snakemake -n`` shows every stage.
A case that failed its check therefore still has jobs in every per-case rule: each such
job takes the case's check record and, through :func:`run_unless_excluded`, either runs
its step or writes an **exclusion record** (``"excluded": true``, with the check's stage,
file, reason and log) at its record output, and no data file (a stale one from an earlier
run is removed). Aggregate steps read the records and keep the usable cases
(:func:`usable_records`, :func:`usable_inputs`, :func:`usable_predictions`,
:func:`usable_scans`); ``checks.csv`` and ``failures.csv`` list every case and the failed
ones for the report and the end-of-run message (:func:`failure_message`).
Only :class:`CaseDataError` (bad data) is recorded; any other exception is a bug and
propagates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kidney_seg.atomic import atomic_path, read_json, write_json_atomic
from kidney_seg.errors import CaseDataError
from kidney_seg.volume import read_image, read_label

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: Columns of the per-run check table (checks.csv).
CHECK_COLUMNS: tuple[str, ...] = ("case_id", "ok", "stage", "file", "reason", "log")
#: Columns of failures.csv, the table the report renders.
FAILURE_COLUMNS: tuple[str, ...] = ("case_id", "stage", "reason", "log")
#: What ``dataset.on_bad_case`` may say.
ON_BAD_CASE: tuple[str, ...] = ("skip", "fail")


def check_case(
    case_id: str, image_path: str | os.PathLike, label_path: str | os.PathLike | None, labels: tuple[int, ...]
) -> dict:
    """Read a case as the pipeline will and return its check record (ok, or the failure and its reason)."""
    try:
        image, geometry = read_image(image_path, case_id)
        del image
        if label_path is not None:
            read_label(label_path, case_id, tuple(labels), geometry)
    except CaseDataError as exc:
        log.error("%s", exc)
        return {"case_id": case_id, "ok": False, "stage": "check", "file": exc.path, "reason": exc.reason}
    return {"case_id": case_id, "ok": True, "stage": "check", "file": "", "reason": ""}


def run_check(
    case_id: str,
    image_path,
    label_path,
    labels: tuple[int, ...],
    out_json: str | os.PathLike,
    log_path: str | os.PathLike | None,
    on_bad_case: str,
) -> dict:
    """Check one case and write its record atomically; with ``on_bad_case='fail'`` a bad case raises."""
    if on_bad_case not in ON_BAD_CASE:
        raise ValueError(f"on_bad_case must be one of {ON_BAD_CASE}, got {on_bad_case!r}")
    record = {**check_case(case_id, image_path, label_path, labels), "log": str(log_path or "")}
    if not record["ok"] and on_bad_case == "fail":
        raise CaseDataError(case_id, record["file"], record["reason"])
    write_json_atomic(out_json, record)
    return record


def read_record(path: str | os.PathLike) -> dict:
    """One per-case record (a check, an exclusion, a slice-cache meta, metrics, a prediction), validated."""
    record = read_json(path)
    if not isinstance(record, dict) or "case_id" not in record:
        raise ValueError(f"{path}: not a per-case record (needs case_id)")
    return record


def read_check(path: str | os.PathLike) -> dict:
    """One check record, validated."""
    record = read_json(path)
    if not isinstance(record, dict) or not {"case_id", "ok"} <= set(record):
        raise ValueError(f"{path}: not a case check record (needs case_id and ok)")
    return record


def is_excluded(record: Mapping) -> bool:
    """Whether a per-case record leaves its case out: a failed check, or an exclusion record."""
    return record.get("ok") is False or record.get("excluded") is True


def exclusion_record(check: Mapping) -> dict:
    """The record a per-case step writes instead of its result for a case that failed its check."""
    return {
        "case_id": check["case_id"],
        "excluded": True,
        **{key: check.get(key, "") for key in ("stage", "file", "reason", "log")},
    }


def run_unless_excluded(
    check_json: str | os.PathLike,
    record_json: str | os.PathLike,
    outputs: Mapping[str, str | os.PathLike],
    step: Callable,
    *args,
    **kwargs,
) -> dict:
    """Run one per-case step for a case that passed its check; record its exclusion for one that failed.

    ``outputs`` names the files ``step(*args, **kwargs)`` writes. For a usable case the step
    runs, and ``record_json`` is then written as ``{"case_id", "excluded": false, **outputs}``
    plus, when the step returns a dict, its items (e.g. a prediction's plan grid), unless
    ``record_json`` is itself one of the outputs (a slice cache's meta.json, a metrics file:
    the step writes it). For an excluded case the step does not run, none of the outputs is
    left behind (stale ones from an earlier run are removed) and ``record_json`` gets the
    :func:`exclusion_record`. Returns the record.
    """
    check = read_check(check_json)
    record_json = Path(record_json)
    outputs = {name: Path(path) for name, path in outputs.items()}
    if is_excluded(check):
        for path in outputs.values():
            if path != record_json:
                path.unlink(missing_ok=True)
        record = exclusion_record(check)
        log.warning(
            "%s: left out: it failed its input check (%s: %s)", record["case_id"], record["file"], record["reason"]
        )
        write_json_atomic(record_json, record)
        return record
    details = step(*args, **kwargs)
    if record_json in outputs.values():
        return read_record(record_json)
    record = {"case_id": check["case_id"], "excluded": False, **{name: str(p) for name, p in outputs.items()}}
    if isinstance(details, Mapping):
        clash = sorted(set(details) & set(record))
        if clash:
            raise ValueError(f"{record_json}: the step's details {clash} would overwrite the record's own keys")
        record.update(details)
    write_json_atomic(record_json, record)
    return record


def usable_inputs(record_jsons: Sequence, *columns: Sequence) -> tuple[list, ...]:
    """The items of each list parallel to ``record_jsons`` whose case's record is not an exclusion."""
    if any(len(column) != len(record_jsons) for column in columns):
        raise ValueError(
            f"usable_inputs: {len(record_jsons)} records but lists of lengths "
            f"{[len(c) for c in columns]}; they must run parallel"
        )
    keep = [not is_excluded(read_record(p)) for p in record_jsons]
    return tuple([item for item, k in zip(column, keep) if k] for column in columns)


def usable_records(record_jsons: Sequence) -> list[str]:
    """The record files (slice-cache metas, metrics) of the cases not excluded."""
    (kept,) = usable_inputs(record_jsons, [str(p) for p in record_jsons])
    return kept


def usable_predictions(record_jsons: Sequence, label_paths: Sequence) -> tuple[list[str], list[str], list[str]]:
    """(case ids, prediction files, label files) of the cases whose prediction record is not an exclusion."""
    records, labels = usable_inputs(record_jsons, [read_record(p) for p in record_jsons], list(label_paths))
    return [r["case_id"] for r in records], [r["prediction"] for r in records], [str(p) for p in labels]


def usable_scans(scans: Mapping[str, Sequence]) -> dict[str, tuple[str, str, str]]:
    """{case: (image, label, prediction file)} from {case: (image, label, prediction record)}, minus excluded cases."""
    kept = {}
    for case, (image, label, record_json) in scans.items():
        record = read_record(record_json)
        if not is_excluded(record):
            kept[case] = (str(image), str(label), record["prediction"])
    return kept


def collect_checks(check_jsons: list, out_csv: str | os.PathLike, failures_csv: str | os.PathLike) -> pd.DataFrame:
    """Gather the per-case records into checks.csv and the failed ones into failures.csv (both atomic)."""
    import pandas as pd  # here: a case's check job, which imports this module, never needs pandas

    table = pd.DataFrame([read_check(p) for p in check_jsons], columns=list(CHECK_COLUMNS))
    table = table.sort_values("case_id", kind="stable").reset_index(drop=True)
    table["ok"] = table["ok"].astype(bool)
    failed = table.loc[~table["ok"], list(FAILURE_COLUMNS)]
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(failures_csv) as tmp:
        failed.to_csv(tmp, index=False)
    if len(failed):
        log.warning(
            "%d of %d cases failed their input checks and are left out: %s",
            len(failed),
            len(table),
            ", ".join(failed["case_id"]),
        )
    return table


def failure_message(failures_csv: str | os.PathLike) -> str | None:
    """A console message listing the failed cases and why, or None when every case passed."""
    path = Path(failures_csv)
    if not path.is_file():
        return None
    import pandas as pd

    failed = pd.read_csv(path, dtype=str, keep_default_na=False)
    if failed.empty:
        return None
    lines = [f"WARNING: {len(failed)} case(s) failed and were left out of training, prediction and evaluation:"]
    lines += [f"  {r.case_id} ({r.stage}): {r.reason}  [log: {r.log}]" for r in failed.itertuples()]
    lines.append(f"  The list is in {path} and in the report's Failures section.")
    return "\n".join(lines)
