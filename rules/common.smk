# Helpers shared by the rules: case lists, the split and paths. No rule logic lives here.
import os
from pathlib import Path

from kidney_seg.config import check_consistency, labels_for
from kidney_seg.data.sources import labelled_cases, raw_root, select_cases
from kidney_seg.split import cases_in, make_split

check_consistency(config)

RESULTS = config["results_dir"]
RAW = raw_root(config["dataset"])
LABELS = labels_for(config["dataset"]["source"])
CASES = select_cases(labelled_cases(config["dataset"]), config["dataset"]["cases"])
SPLIT = make_split(CASES, config["split"]["fractions"], config["split"]["seed"])
TRAIN, VAL, TEST = (cases_in(SPLIT, s) for s in ("train", "val", "test"))


wildcard_constraints:
    case=r"case_\d{5}",


def library(*modules):
    """Library source files a rule depends on, so that editing them triggers a rerun."""
    return [os.path.join(workflow.basedir, "kidney_seg", m) for m in ("__init__.py", "io.py", "errors.py") + modules]


def raw_image(wildcards):
    """The raw CT of a case."""
    return f"{RAW}/{wildcards.case}/imaging.nii.gz"


def raw_label(wildcards):
    """The raw segmentation of a case."""
    return f"{RAW}/{wildcards.case}/segmentation.nii.gz"


def preprocessed(cases):
    """Slice-cache metadata files of some cases."""
    return [f"{RESULTS}/preprocessed/{c}/meta.json" for c in cases]
