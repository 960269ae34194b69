"""The plan: every setting that preprocessing, training and inference must agree on, resolved once.

The workflow's ``plan`` rule writes ``{results_dir}/plans.json`` from the validated config
and, where the config needs it (``clip: auto``, ``normalization: dataset``), the
training-set intensity fingerprint. ``preprocess``,
``train`` and ``predict`` read it; a trained model carries a copy as ``inference.json``.
A plan holds::

    labels             label values of the data, e.g. [0, 1, 2]
    class_names        their names, e.g. ["background", "kidney", "tumor"]
    num_classes        the model's classes (len(labels))
    patch_size         training crop and inference tile [rows, cols]
    output_activation  softmax | sigmoid | regions
    preprocessing      resolved settings: target_spacing, clip, normalization, mean, std, crop_to_body

Every plan is checked where it is made (:func:`make_plan`) and where it is read
(:func:`read_plan`), and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kidney_seg.atomic import read_json, write_json_atomic
from kidney_seg.preprocessing import check_settings, needs_fingerprint, resolve_preprocessing
from kidney_seg.vocabulary import class_names, labels_of

PLAN_NAME = "plans.json"
PLAN_KEYS = ("labels", "class_names", "num_classes", "patch_size", "output_activation", "preprocessing")
#: softmax: a logit per class; sigmoid: a logit per foreground class; regions: a logit per nested region.
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid", "regions")


def plan_inputs(config: dict) -> dict:
    """The parts of a validated config a plan is made from (config-shaped: a valid argument of :func:`make_plan`)."""
    return {
        "dataset": {"source": config["dataset"]["source"]},
        "preprocessing": config["preprocessing"],
        "training": {k: config["training"][k] for k in ("patch_size", "output_activation")},
    }


def make_plan(config: dict, fingerprint: dict | None) -> dict:
    """Plan of a validated config (or its :func:`plan_inputs`) and the training-set fingerprint (None if not needed)."""
    labels = labels_of(config["dataset"]["source"])
    training = config["training"]
    return check_plan(
        {
            "labels": list(labels),
            "class_names": list(class_names(labels)),
            "num_classes": len(labels),
            "patch_size": list(training["patch_size"]),
            "output_activation": training["output_activation"],
            "preprocessing": resolve_preprocessing(config["preprocessing"], fingerprint),
        }
    )


def check_plan(plan: dict, where: str = "plan") -> dict:
    """Validate a plan (``where`` names it in errors); return it with the preprocessing settings normalised."""
    if not isinstance(plan, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(plan).__name__}")
    missing = [k for k in PLAN_KEYS if k not in plan]
    unknown = sorted(set(plan) - set(PLAN_KEYS))
    if missing or unknown:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    labels = [int(v) for v in plan["labels"]]
    if labels != list(range(len(labels))) or len(labels) < 2:
        raise ValueError(f"{where}: labels must be 0, 1, ..., n-1 with n >= 2, got {plan['labels']}")
    if plan["num_classes"] != len(labels) or list(plan["class_names"]) != list(class_names(tuple(labels))):
        raise ValueError(
            f"{where}: num_classes {plan['num_classes']} and class_names {plan['class_names']} "
            f"do not match labels {labels}"
        )
    if plan["output_activation"] not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"{where}: unknown output_activation {plan['output_activation']!r}")
    patch = plan["patch_size"]
    if len(patch) != 2 or not all(isinstance(p, int) and p > 0 for p in patch):
        raise ValueError(f"{where}: patch_size must be two positive integers, got {patch}")
    try:
        preprocessing = check_settings(plan["preprocessing"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return {**plan, "labels": labels, "patch_size": list(patch), "preprocessing": preprocessing}


def read_plan(path: str | os.PathLike) -> dict:
    """A plan file (plans.json, or a model's inference.json), checked."""
    return check_plan(read_json(path), where=str(path))


def write_plan(plan: dict, path: str | os.PathLike) -> None:
    """Write a plan atomically."""
    write_json_atomic(Path(path), check_plan(plan))


def plan_digest(plan: dict) -> str:
    """SHA-256 of a plan's canonical JSON: what a slice cache records about the plan it was made with."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_plan(config: dict, fingerprint_path: str | os.PathLike | None, out_path: str | os.PathLike) -> dict:
    """Make the plan of a config (reading the fingerprint file when the config needs one) and write it."""
    if needs_fingerprint(config["preprocessing"]) and fingerprint_path is None:
        raise ValueError(
            "the preprocessing config needs the training-set fingerprint (fingerprint.json), but none was given"
        )
    fingerprint = read_json(fingerprint_path) if fingerprint_path is not None else None
    plan = make_plan(config, fingerprint)
    write_plan(plan, out_path)
    return plan


def check_training_agrees(plan: dict, train_cfg: dict) -> None:
    """Raise if the training config disagrees with the plan on the patch size or the output activation."""
    for key in ("patch_size", "output_activation"):
        value = list(train_cfg[key]) if key == "patch_size" else train_cfg[key]
        if value != plan[key]:
            raise ValueError(f"training.{key} {value!r} differs from the plan's {plan[key]!r}: rebuild the plan")
