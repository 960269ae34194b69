# Helpers shared by the rules: case lists, the split and paths. No rule logic lives here.
import os
import sys

from snakemake.exceptions import WorkflowError

from kidney_seg.config import check_consistency
from kidney_seg.data.checks import failure_message, usable_cases
from kidney_seg.data.sources import labels_of, list_cases, raw_root, select
from kidney_seg.split import cases_in, fold_cases, make_split

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
FOLDS = [str(k) for k in range(config["split"]["folds"])]
# fold -> (training cases, validation cases); one fold = the split's own train/val subsets.
FOLD_CASES = {"0": (TRAIN, VAL)} if len(FOLDS) == 1 else {k: fold_cases(SPLIT, int(k)) for k in FOLDS}
# Validation case -> the fold whose model did not train on it (out-of-fold prediction).
HELD_OUT_BY = {case: k for k, (_, val) in FOLD_CASES.items() for case in val}
# Cases whose predictions decide the post-processing (none when it is switched off).
VALIDATION = sorted(HELD_OUT_BY) if config["postprocessing"]["enabled"] else []
PREPROCESSING = config["preprocessing"]
NEEDS_FINGERPRINT = PREPROCESSING["clip"] == "auto" or PREPROCESSING["normalization"] == "dataset"
# What fetching a case depends on (not the case selection, so choosing more cases reruns nothing).
FETCH = {k: config["dataset"].get(k) for k in ("source", "root", "phantom", "manifest", "kits_imaging_url", "kits_labels_url")}


wildcard_constraints:
    case=r"case_[0-9]{5}",
    fold=r"\d+",


def library(*modules):
    """Library source files a rule depends on, so that editing them triggers a rerun."""
    return [os.path.join(workflow.basedir, "kidney_seg", m) for m in ("__init__.py", "atomic.py", "volume.py", "errors.py") + modules]


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


def label_if_any(wildcards):
    """The raw segmentation of a case, or nothing for an imaging-only case."""
    return [CASE[wildcards.case].label] if CASE[wildcards.case].label else []


def usable(cases):
    """The given cases that passed their input checks (known once the collect_checks checkpoint ran)."""
    passed = usable_cases(checkpoints.collect_checks.get().output.table)
    return [c for c in cases if c in passed]


def usable_training_images(wildcards):
    """Raw CT of the usable training cases."""
    return [CASE[c].image for c in usable(TRAIN)]


def usable_training_labels(wildcards):
    """Raw segmentations of the usable training cases."""
    return [CASE[c].label for c in usable(TRAIN)]


def usable_training_cases(wildcards):
    """Ids of the usable training cases."""
    return usable(TRAIN)


def fold_training(wildcards):
    """Slice caches a fold's model trains on."""
    return preprocessed(usable(FOLD_CASES[wildcards.fold][0]))


def fold_validation(wildcards):
    """Slice caches a fold's model is validated on."""
    return preprocessed(usable(FOLD_CASES[wildcards.fold][1]))


def usable_test_cases(wildcards):
    """Ids of the usable test cases."""
    return usable(TEST)


def usable_test_scans(wildcards):
    """Raw CT, ground truth and prediction of each usable test case, in that order per case."""
    return [path for c in usable(TEST) for path in (CASE[c].image, CASE[c].label, f"{RESULTS}/predictions/{c}.nii.gz")]


def test_metrics(wildcards):
    """Per-case metric files of the usable test cases."""
    return [f"{RESULTS}/metrics/cases/{c}.json" for c in usable(TEST)]


def predict_only_outputs(wildcards):
    """Predictions of the usable imaging-only cases."""
    return [f"{RESULTS}/predictions/{c}.nii.gz" for c in usable(PREDICT_ONLY)]


def model_dir(fold):
    """The published model folder of one fold."""
    return f"{RESULTS}/model/fold_{fold}"


def predicting_models(wildcards):
    """model.keras files that predict a case: its held-out fold's for a validation case, else every fold's (ensemble)."""
    fold = HELD_OUT_BY.get(wildcards.case)
    return [f"{model_dir(k)}/model.keras" for k in ([fold] if fold is not None else FOLDS)]


def validation_cases(wildcards=None):
    """The usable validation cases, on whose predictions post-processing is decided."""
    return usable(VALIDATION)


def validation_predictions(wildcards=None):
    """Raw predictions of the usable validation cases."""
    return [f"{RESULTS}/raw_predictions/{c}.nii.gz" for c in validation_cases()]


def validation_labels(wildcards=None):
    """Ground truth of the usable validation cases."""
    return [CASE[c].label for c in validation_cases()]


def train_threads(wildcards):
    """Cores per train job: all of them, shared between the folds so that they can train side by side.

    Without --cores (e.g. `snakemake --report`) no job runs, and the count is 1.
    """
    try:
        cores = workflow.cores
    except WorkflowError:
        return 1
    return max(1, cores // len(FOLDS))


def report_failures(failures_csv):
    """Print the cases that failed their checks at the end of a run, so that none goes unnoticed."""
    message = failure_message(failures_csv)
    if message:
        print(message, file=sys.stderr)
