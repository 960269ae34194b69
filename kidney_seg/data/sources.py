"""Case lists and fetching for each dataset source (phantom, kits19, local)."""

from __future__ import annotations

import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from kidney_seg.errors import CaseDataError
from kidney_seg.io import atomic_path, load_nifti

log = logging.getLogger(__name__)

KITS19_LABELLED = [f"case_{i:05d}" for i in range(210)]
IMAGE_NAME, LABEL_NAME = "imaging.nii.gz", "segmentation.nii.gz"


def raw_root(dataset_cfg: dict) -> str:
    """Folder that holds (or receives) the raw cases."""
    return dataset_cfg.get("root") or os.path.join("data", dataset_cfg["source"])


def labelled_cases(dataset_cfg: dict) -> list[str]:
    """All labelled case ids a source offers."""
    source = dataset_cfg["source"]
    if source == "phantom":
        return [f"case_{i:05d}" for i in range((dataset_cfg.get("phantom") or {}).get("n_cases", 40))]
    if source == "kits19":
        return list(KITS19_LABELLED)
    if source == "local":
        root = Path(raw_root(dataset_cfg))
        if not root.is_dir():
            raise FileNotFoundError(f"dataset.root {root} is not a folder")
        return sorted(p.parent.name for p in root.glob(f"case_*/{LABEL_NAME}") if (p.parent / IMAGE_NAME).is_file())
    raise NotImplementedError(f"dataset.source {source!r} is not supported yet (KiTS21/23 support is tracked in issue 3)")


def select_cases(available: list[str], cases) -> list[str]:
    """Apply ``dataset.cases``: 'all', the first N, or an explicit list."""
    if cases in (None, "all"):
        return list(available)
    if isinstance(cases, int):
        if cases > len(available):
            raise ValueError(f"dataset.cases = {cases} but only {len(available)} cases are available")
        return list(available[:cases])
    missing = sorted(set(cases) - set(available))
    if missing:
        raise ValueError(f"dataset.cases names unknown cases: {missing}")
    return sorted(cases)


def case_index(case_id: str) -> int:
    """The number in ``case_XXXXX``."""
    return int(case_id.split("_")[1])


def download(url: str, dest: str | os.PathLike, case_id: str, retries: int = 4, timeout: float = 60.0) -> None:
    """Stream ``url`` to a temporary file, check it is a readable NIfTI, then rename into place."""
    for attempt in range(retries + 1):
        try:
            with atomic_path(dest) as tmp:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as fh:
                    shutil.copyfileobj(resp, fh, length=1 << 20)
                load_nifti(tmp, case_id)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == retries:
                raise CaseDataError(case_id, url, f"download failed: HTTP {exc.code}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if attempt == retries:
                raise CaseDataError(case_id, url, f"download failed: {exc}") from exc
        log.warning("%s: retrying %s (attempt %d)", case_id, url, attempt + 2)
        time.sleep(min(2**attempt, 30))


def fetch_case(case_id: str, dataset_cfg: dict, seed: int, image_out: str | os.PathLike, label_out: str | os.PathLike) -> None:
    """Produce a raw case at the given paths: generate (phantom) or download (kits19)."""
    source = dataset_cfg["source"]
    if source == "phantom":
        from kidney_seg.data.phantom import PhantomParams, generate_case, write_case

        case = generate_case(case_index(case_id), seed, PhantomParams.from_config(dataset_cfg.get("phantom")))
        write_case(Path(image_out).parent, case)
        return
    if source == "kits19":
        download(f"{dataset_cfg['kits_imaging_url']}/{case_id}.nii.gz", image_out, case_id)
        download(f"{dataset_cfg['kits_labels_url']}/{case_id}/{LABEL_NAME}", label_out, case_id)
        return
    if source == "local":
        missing = [p for p in (image_out, label_out) if not Path(p).is_file()]
        raise CaseDataError(case_id, missing[0] if missing else image_out, "file not found in dataset.root")
    raise NotImplementedError(f"dataset.source {source!r} is not supported yet")
