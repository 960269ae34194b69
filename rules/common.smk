# Helpers shared by the rules: case lists, the split and paths. No rule logic lives here.
import os
import sys

from snakemake.exceptions import WorkflowError

from kidney_seg.code_inputs import workflow_script_code
from kidney_seg.config import check_consistency
from kidney_seg.data.checks import failure_message
from kidney_seg.data.sources import list_cases, raw_root, select
from kidney_seg.plan import PLAN_NAME, plan_inputs
from kidney_seg.preprocessing import needs_fingerprint
from kidney_seg.split import cases_in, fold_cases, make_split
from kidney_seg.vocabulary import labels_of

check_consistency(config)

RESULTS = config["results_dir"]
RAW = raw_root(config["dataset"])
LABELS = labels_of(config["dataset"]["source"])
LABELLED, UNLABELLED = select(list_cases(config["dataset"]), config["dataset"])
CASE = {c.case_id: c for c in LABELLED + UNLABELLED}
CASES = [c.case_id for c in LABELLED]
PREDICT_ONLY = [c.case_id for c in UNLABELLED]
# The split is made here, once, because the DAG needs it (which cases each fold trains on,
# which model predicts a case); the split rule only writes this table to split.csv.
SPLIT = make_split(CASES, config["split"]["fractions"], config["split"]["seed"], config["split"]["folds"])
TRAIN, VAL, TEST = (cases_in(SPLIT, s) for s in ("train", "val", "test"))
FOLDS = [str(k) for k in range(config["split"]["folds"])]
# fold -> (training cases, validation cases); one fold = the split's own train/val subsets.
FOLD_CASES = {"0": (TRAIN, VAL)} if len(FOLDS) == 1 else {k: fold_cases(SPLIT, int(k)) for k in FOLDS}
# Validation case -> the fold whose model did not train on it (out-of-fold prediction).
HELD_OUT_BY = {case: k for k, (_, val) in FOLD_CASES.items() for case in val}
# Cases whose predictions decide the post-processing (none when it is switched off).
VALIDATION = sorted(HELD_OUT_BY) if config["postprocessing"]["enabled"] else []
# The plan: the settings preprocess, train and predict share (written by the plan rule).
PLAN = f"{RESULTS}/{PLAN_NAME}"
PLAN_INPUTS = plan_inputs(config)
# What fetching a case depends on (not the case selection, so choosing more cases reruns nothing).
DOWNLOAD_SETTINGS = {
    k: config["dataset"].get(k)
    for k in ("source", "root", "phantom", "manifest", "kits_imaging_url", "kits_labels_url")
}


wildcard_constraints:
    case=r"case_[0-9]{5}",
    fold=r"\d+",


def code_of(script):
    """The library files workflow_scripts/<script>.py runs (its kidney_seg imports, transitively): a rule's code inputs."""
    return workflow_script_code(workflow.basedir, script)


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
    return [f"{RESULTS}/fingerprint.json"] if needs_fingerprint(config["preprocessing"]) else []


def label_if_any(wildcards):
    """The raw segmentation of a case, or nothing for an imaging-only case."""
    return [CASE[wildcards.case].label] if CASE[wildcards.case].label else []


def checks_of(cases):
    """Input-check records of some cases: every per-case rule and the aggregates filter on them."""
    return [f"{RESULTS}/checks/{c}.json" for c in cases]


def training_checks(wildcards):
    """Check records of the training cases (the fingerprint keeps those that passed)."""
    return checks_of(TRAIN)


def training_images(wildcards):
    """Raw CT of the training cases."""
    return [CASE[c].image for c in TRAIN]


def training_labels(wildcards):
    """Raw segmentations of the training cases."""
    return [CASE[c].label for c in TRAIN]


def fold_training(wildcards):
    """Slice-cache records a fold's model trains on (excluded cases' records say so)."""
    return preprocessed(FOLD_CASES[wildcards.fold][0])


def fold_validation(wildcards):
    """Slice-cache records a fold's model is validated on."""
    return preprocessed(FOLD_CASES[wildcards.fold][1])


def test_scans(wildcards):
    """Raw CT, ground truth and prediction record of each test case, in that order per case."""
    return [path for c in TEST for path in (CASE[c].image, CASE[c].label, f"{RESULTS}/predictions/{c}.json")]


def test_metrics(wildcards):
    """Per-case metric records of the test cases."""
    return [f"{RESULTS}/metrics/cases/{c}.json" for c in TEST]


def predict_only_outputs(wildcards):
    """Prediction records of the imaging-only cases (the NIfTI lies beside each usable case's record)."""
    return [f"{RESULTS}/predictions/{c}.json" for c in PREDICT_ONLY]


def model_dir(fold):
    """The published model folder of one fold."""
    return f"{RESULTS}/model/fold_{fold}"


def predicting_models(wildcards):
    """model.keras files that predict a case: its held-out fold's for a validation case, else every fold's (ensemble)."""
    fold = HELD_OUT_BY.get(wildcards.case)
    return [f"{model_dir(k)}/model.keras" for k in ([fold] if fold is not None else FOLDS)]


def validation_predictions(wildcards=None):
    """Raw prediction records of the validation cases."""
    return [f"{RESULTS}/raw_predictions/{c}.json" for c in VALIDATION]


def validation_labels(wildcards=None):
    """Ground truth of the validation cases."""
    return [CASE[c].label for c in VALIDATION]


def cores_shared_by(jobs):
    """Cores per job when ``jobs`` jobs share the run's cores; 1 without --cores (e.g. `snakemake --report`)."""
    try:
        cores = workflow.cores
    except WorkflowError:
        return 1
    return max(1, cores // jobs)


def train_threads(wildcards):
    """Cores per train job: all of them, shared between the folds so that they can train side by side."""
    return cores_shared_by(len(FOLDS))


def predict_threads(wildcards):
    """Cores per predict job: half of them, so that two cases predict side by side.

    A predict job spends about half its time on one core starting TensorFlow and loading the
    model: on 2 cores, two jobs of one thread each predicted the demo's 12 cases in 110 s where
    one job of two threads at a time took 188 s (benchmarks/README.md).
    """
    return cores_shared_by(2)


def report_failures(failures_csv):
    """Print the cases that failed their checks at the end of a run, so that none goes unnoticed."""
    message = failure_message(failures_csv)
    if message:
        print(message, file=sys.stderr)
