# Helpers shared by the rules: case lists, the split and paths. No rule logic lives here.
import os

from kidney_seg.config import check_consistency
from kidney_seg.data.sources import labels_of, list_cases, raw_root, select
from kidney_seg.split import cases_in, make_split

check_consistency(config)

RESULTS = config["results_dir"]
RAW = raw_root(config["dataset"])
LABELS = labels_of(config["dataset"]["source"])
LABELLED, UNLABELLED = select(list_cases(config["dataset"]), config["dataset"])
CASE = {c.case_id: c for c in LABELLED + UNLABELLED}
CASES = [c.case_id for c in LABELLED]
PREDICT_ONLY = [c.case_id for c in UNLABELLED]
SPLIT = make_split(CASES, config["split"]["fractions"], config["split"]["seed"], config["split"]["folds"])
TRAIN, VAL, TEST = (cases_in(SPLIT, s) for s in ("train", "val", "test"))
PREPROCESSING = config["preprocessing"]
NEEDS_FINGERPRINT = PREPROCESSING["clip"] == "auto" or PREPROCESSING["normalization"] == "dataset"
# What fetching a case depends on (not the case selection, so choosing more cases reruns nothing).
FETCH = {k: config["dataset"].get(k) for k in ("source", "root", "phantom", "manifest", "kits_imaging_url", "kits_labels_url")}


wildcard_constraints:
    case=r"case_\d{5}",


def library(*modules):
    """Library source files a rule depends on, so that editing them triggers a rerun."""
    return [os.path.join(workflow.basedir, "kidney_seg", m) for m in ("__init__.py", "io.py", "errors.py") + modules]


def raw_image(wildcards):
    """The raw CT of a case."""
    return CASE[wildcards.case].image


def raw_label(wildcards):
    """The raw segmentation of a case."""
    return CASE[wildcards.case].label


def preprocessed(cases):
    """Slice-cache metadata files of some cases."""
    return [f"{RESULTS}/preprocessed/{c}/meta.json" for c in cases]


def fingerprint(wildcards=None):
    """The training-set intensity statistics, where the config needs them."""
    return [f"{RESULTS}/fingerprint.json"] if NEEDS_FINGERPRINT else []
