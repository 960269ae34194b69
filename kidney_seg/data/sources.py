"""The cases each dataset source offers, the selection the config makes, and fetching one file.

Sources: ``phantom`` (generated on the fly), ``kits19``/``kits21``/``kits23`` (downloaded;
facts in :mod:`kidney_seg.data.kits`) and ``local`` (the user's files;
:mod:`kidney_seg.data.local`). Generated and downloaded cases are stored as
``<root>/<case>/imaging.nii.gz`` and ``<root>/<case>/segmentation.nii.gz``; local cases
point at the user's own files. Every case id is ``case_XXXXX`` (five digits), checked for
every source, so that no case id can act as a path under the dataset root or results_dir.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from kidney_seg import vocabulary
from kidney_seg.data import kits, local
from kidney_seg.errors import CaseDataError
from kidney_seg.vocabulary import IMAGE_NAME, LABEL_NAME, case_id_of, is_case_id
from kidney_seg.volume import save_nifti

KITS19_LABELLED = kits.SOURCES["kits19"].case_ids(kits.SOURCES["kits19"].labelled)


@dataclass(frozen=True)
class Case:
    """One case: its id, where the image is (or will be), and its label (None = imaging-only)."""

    case_id: str
    image: str
    label: str | None


def raw_root(dataset_cfg: dict) -> str:
    """Folder that holds (or receives) the raw cases: ``dataset.root`` or ``data/<source>``."""
    return kits.raw_root(dataset_cfg)


def labels_of(source: str) -> tuple[int, ...]:
    """Valid label values of a source: (0, 1, 2), plus 3 (cyst) for kits21 and kits23."""
    return vocabulary.labels_of(source)


def list_cases(dataset_cfg: dict) -> list[Case]:
    """Every case the source offers, labelled and imaging-only, sorted by id."""
    source = dataset_cfg["source"]
    if source == "local":
        return _checked([Case(c, image, label) for c, image, label in local.list_local(dataset_cfg)])
    if source == "phantom":
        labelled, unlabelled = _phantom_ids(dataset_cfg), []
    elif source in kits.SOURCES:
        src = kits.SOURCES[source]
        labelled, unlabelled = src.case_ids(src.labelled), src.case_ids(src.unlabelled)
    else:
        raise ValueError(f"unknown dataset.source {source!r}")
    root = raw_root(dataset_cfg)
    cases = [_stored(root, c, True) for c in labelled] + [_stored(root, c, False) for c in unlabelled]
    return _checked(sorted(cases, key=lambda c: c.case_id))


def _checked(cases: list[Case]) -> list[Case]:
    """``cases``, after checking that every id is ``case_XXXXX`` (ids become paths under results_dir)."""
    for case in cases:
        kits.check_case_id(case.case_id, case.image)
    return cases


def _stored(root: str, case_id: str, labelled: bool) -> Case:
    """A case kept in KiTS layout under ``root``."""
    folder = os.path.join(root, case_id)
    return Case(case_id, os.path.join(folder, IMAGE_NAME), os.path.join(folder, LABEL_NAME) if labelled else None)


def _phantom_ids(dataset_cfg: dict) -> list[str]:
    """Case ids of the phantom set (``dataset.phantom.n_cases``)."""
    from kidney_seg.data.phantom import phantom_settings

    return [case_id_of(i) for i in range(phantom_settings(dataset_cfg.get("phantom"))["n_cases"])]


# ----------------------------------------------------------------------------- selection


def select(cases: list[Case], dataset_cfg: dict) -> tuple[list[Case], list[Case]]:
    """(labelled cases chosen by ``dataset.cases``, imaging-only cases chosen by ``dataset.unlabelled_cases``)."""
    _checked(cases)
    labelled = [c for c in cases if c.label is not None]
    unlabelled = [c for c in cases if c.label is None]
    chosen = _choose(labelled, unlabelled, dataset_cfg.get("cases", "all"), "dataset.cases", "labelled")
    spec = dataset_cfg.get("unlabelled_cases")
    if spec is None:  # a user's own folder: predict its unlabelled scans; challenge data: train/evaluate only
        spec = "all" if dataset_cfg.get("source") == "local" else "none"
    if spec == "none":
        return chosen, []
    return chosen, _choose(unlabelled, labelled, spec, "dataset.unlabelled_cases", "imaging-only")


def _choose(pool: list[Case], others: list[Case], spec, key: str, kind: str) -> list[Case]:
    """Apply "all", a count N (the first N) or a list of ids to ``pool``; name offending ids."""
    if spec in (None, "all"):
        return list(pool)
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 1 <= spec <= len(pool):
            raise ValueError(f"{key} = {spec} but the source offers {len(pool)} {kind} cases")
        return pool[:spec]
    if isinstance(spec, str) or not isinstance(spec, (list, tuple)):
        raise ValueError(f"{key} must be 'all', a positive integer or a list of case ids, got {spec!r}")
    invalid = [c for c in spec if not is_case_id(c)]
    if invalid:
        raise ValueError(f"{key} names invalid case ids {invalid}: each must be case_XXXXX with five digits")
    wanted, other_ids = set(spec), {c.case_id for c in others}
    wrong_kind = sorted(wanted & other_ids)
    if wrong_kind:
        raise ValueError(f"{key} names cases that are not {kind}: {wrong_kind}")
    unknown = sorted(wanted - {c.case_id for c in pool})
    if unknown:
        raise ValueError(f"{key} names cases the source does not offer: {unknown}")
    return [c for c in pool if c.case_id in wanted]


# ----------------------------------------------------------------------------- fetching


def fetch_image(case_id: str, dataset_cfg: dict, seed: int, out: str, allow_http: bool = False) -> None:
    """Download or generate one case's image file at ``out`` (atomically).

    A download goes to ``<root>/<case>/imaging.nii.gz`` only (``out`` must be that path) and
    uses https; ``allow_http`` (``dataset.allow_http``) admits plain http to a loopback host.
    """
    _fetch("image", case_id, dataset_cfg, seed, out, allow_http)


def fetch_label(case_id: str, dataset_cfg: dict, seed: int, out: str, allow_http: bool = False) -> None:
    """Download or generate one case's label file at ``out`` (atomically); see :func:`fetch_image`."""
    _fetch("label", case_id, dataset_cfg, seed, out, allow_http)


def fetch_case(
    case_id: str, dataset_cfg: dict, seed: int, image_out: str, label_out: str, allow_http: bool = False
) -> None:
    """Download or generate both files of a labelled case, the image first (a phantom case is generated once)."""
    fetch_image(case_id, dataset_cfg, seed, image_out, allow_http=allow_http)
    fetch_label(case_id, dataset_cfg, seed, label_out, allow_http=allow_http)


def _fetch(kind: str, case_id: str, dataset_cfg: dict, seed: int, out: str, allow_http: bool) -> None:
    """Produce the ``kind`` ("image" or "label") file of a case for any source."""
    source = dataset_cfg["source"]
    kits.check_case_id(case_id, out)
    if source == "phantom":
        case = _phantom_case(case_id, dataset_cfg, seed)
        array, dtype = (case.image, np.int16) if kind == "image" else (case.label, np.uint8)
        save_nifti(out, array, case.affine, dtype=dtype)
    elif source in kits.SOURCES:
        fetch = kits.fetch_kits_image if kind == "image" else kits.fetch_kits_label
        fetch(case_id, dataset_cfg, out, allow_http=allow_http)
    elif source == "local":
        raise local.missing_file(case_id, out, kind)
    else:
        raise ValueError(f"unknown dataset.source {source!r}")


def _phantom_case(case_id: str, dataset_cfg: dict, seed: int):
    """The generated phantom case (cached, so image and label of one case are built once per process)."""
    from kidney_seg.data.phantom import PhantomParams

    known = _phantom_ids(dataset_cfg)
    if case_id not in known:
        raise CaseDataError(case_id, "phantom", f"not a case of the phantom set (n_cases = {len(known)})")
    return _generate(int(case_id.split("_")[1]), int(seed), PhantomParams.from_config(dataset_cfg.get("phantom")))


@functools.lru_cache(maxsize=1)
def _generate(index: int, seed: int, params):
    """Generate one phantom case; depends only on (index, seed, params)."""
    from kidney_seg.data.phantom import generate_case

    return generate_case(index, seed, params)
