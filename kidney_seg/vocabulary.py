"""The KiTS vocabulary, in one place: label values, class names, regions, case ids and file names.

KiTS19 labels a CT with 0 background, 1 kidney and 2 tumour; KiTS21 and KiTS23 add 3 cyst.
The challenges score hierarchical regions (HEC) built from those labels:
kidney and masses (tk: 1, 2, 3), masses (tumour and cyst: 2, 3) and tumour (tu: 2).
On 3-label data the masses region is the tumour. The surface-Dice tolerances of each
challenge, per region, live here too. Every module that needs one of these names imports
it from here.
"""

from __future__ import annotations

import re

BACKGROUND, KIDNEY, TUMOR, CYST = 0, 1, 2, 3
#: Class names by label value.
CLASS_NAMES: tuple[str, ...] = ("background", "kidney", "tumor", "cyst")

#: Valid label values of each dataset source.
SOURCE_LABELS: dict[str, tuple[int, ...]] = {
    "kits19": (0, 1, 2),
    "kits21": (0, 1, 2, 3),
    "kits23": (0, 1, 2, 3),
    "phantom": (0, 1, 2),
    "local": (0, 1, 2),
}
#: The labels of the KiTS19 task (and of the phantom and local data).
KITS19_LABELS: tuple[int, ...] = SOURCE_LABELS["kits19"]
#: Every label value any source may hold.
ALL_LABELS: tuple[int, ...] = (BACKGROUND, KIDNEY, TUMOR, CYST)

#: The HEC regions: name -> the label values it joins.
REGIONS: dict[str, tuple[int, ...]] = {"tk": (KIDNEY, TUMOR, CYST), "masses": (TUMOR, CYST), "tu": (TUMOR,)}
#: The challenges' names of the HEC regions (their evaluation.csv columns say kidney, masses, tumor).
REGION_NAMES: dict[str, str] = {"tk": "kidney and masses", "masses": "masses", "tu": "tumour"}

#: Surface-Dice tolerances (mm) per HEC region, as each challenge's scorer sets them.
#: KiTS21: neheller/kits21, kits21/configuration/labels.py, ``HEC_SD_TOLERANCES_MM`` (the final
#: version, which kits21/evaluation/metrics.py imports; an earlier version named
#: ``HEC_NSD_TOLERANCES_MM`` held 2.178 / 1.393 / 1.536 mm and was replaced by these values).
#: KiTS23: neheller/kits23, kits23/configuration/labels.py, ``HEC_SD_TOLERANCES_MM`` ("values are
#: determined by kits21/evaluation/compute_tolerances.py"): the same numbers.
SURFACE_TOLERANCES_MM: dict[str, dict[str, float]] = {
    "kits21": {"tk": 1.0330772532390826, "masses": 1.1328796488598762, "tu": 1.1498198361434828},
    "kits23": {"tk": 1.0330772532390826, "masses": 1.1328796488598762, "tu": 1.1498198361434828},
}
#: Whose tolerances score each dataset source: KiTS21's for kits21, KiTS23's for every other source.
TOLERANCES_OF_SOURCE: dict[str, str] = {
    "kits19": "kits23",
    "kits21": "kits21",
    "kits23": "kits23",
    "phantom": "kits23",
    "local": "kits23",
}

#: A case id: ``case_`` and five ASCII digits (also the workflow's ``{case}`` wildcard constraint).
CASE_ID_PATTERN = r"case_[0-9]{5}"
CASE_ID = re.compile(CASE_ID_PATTERN)
#: File names of a case folder in the KiTS layout (``<root>/case_XXXXX/imaging.nii.gz``).
IMAGE_NAME, LABEL_NAME = "imaging.nii.gz", "segmentation.nii.gz"


def labels_of(source: str) -> tuple[int, ...]:
    """Valid label values of a dataset source."""
    try:
        return SOURCE_LABELS[source]
    except KeyError:
        raise ValueError(f"unknown dataset.source {source!r}") from None


def tolerance_challenge(source: str) -> str:
    """The challenge whose surface-Dice tolerances score a dataset source (``kits21`` or ``kits23``)."""
    try:
        return TOLERANCES_OF_SOURCE[source]
    except KeyError:
        raise ValueError(f"unknown dataset.source {source!r}") from None


def challenge_title(challenge: str) -> str:
    """A challenge id as its organisers write it: ``kits23`` -> ``KiTS23``."""
    return challenge.replace("kits", "KiTS")


def surface_tolerances(source: str) -> dict[str, float]:
    """Surface-Dice tolerances (mm) per HEC region for a dataset source."""
    return SURFACE_TOLERANCES_MM[tolerance_challenge(source)]


def class_names(labels: tuple[int, ...]) -> tuple[str, ...]:
    """Names of the classes a label set holds (the model's output classes)."""
    return tuple(CLASS_NAMES[value] for value in labels)


def case_id_of(index: int) -> str:
    """The case id of a case number (``7`` -> ``case_00007``)."""
    return f"case_{index:05d}"


def is_case_id(value: object) -> bool:
    """Whether ``value`` is a case id ``case_XXXXX`` (five ASCII digits, nothing else)."""
    return isinstance(value, str) and CASE_ID.fullmatch(value) is not None
