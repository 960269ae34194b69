"""The plan (plans.json): what preprocessing, training and inference agree on, resolved once."""

import json

import numpy as np
import pytest

from kidney_seg.config import deep_merge, load_config
from kidney_seg.plan import (
    PLAN_NAME,
    build_plan,
    check_plan,
    make_plan,
    plan_digest,
    plan_inputs,
    read_plan,
    write_plan,
)
from tests.conftest import REPO, kits_affine, write_nifti

FINGERPRINT = {"percentile_00_5": -60.0, "percentile_99_5": 310.0, "mean": 120.0, "std": 80.0}


def paper():
    return load_config(REPO / "config.yaml")


def with_overrides(config: dict, overrides: dict) -> dict:
    from kidney_seg.config import validate_config

    return validate_config(deep_merge(config, overrides))


def test_the_paper_configs_plan(tmp_path):
    plan = build_plan(plan_inputs(paper()), None, tmp_path / PLAN_NAME)
    assert plan == {
        "labels": [0, 1, 2],
        "class_names": ["background", "kidney", "tumor"],
        "num_classes": 3,
        "patch_size": [224, 224],
        "output_activation": "softmax",
        "preprocessing": {
            "target_spacing": [3.0, 0.7816, 0.7816],
            "clip": [-75.76, 349.49],
            "normalization": "zscore_slice",
            "mean": None,
            "std": None,
            "crop_to_body": True,
        },
    }
    assert json.loads((tmp_path / PLAN_NAME).read_text()) == plan == read_plan(tmp_path / PLAN_NAME)
    assert make_plan(paper(), None) == plan, "a whole config and its plan inputs give the same plan"


def test_kits21_plans_four_classes():
    plan = make_plan(
        with_overrides(paper(), {"dataset": {"source": "kits21"}, "training": {"output_activation": "sigmoid"}}), None
    )
    assert plan["labels"] == [0, 1, 2, 3] and plan["class_names"][-1] == "cyst" and plan["num_classes"] == 4
    assert plan["output_activation"] == "sigmoid"


def test_the_fingerprint_is_folded_in_where_the_config_needs_it(tmp_path):
    config = with_overrides(paper(), {"preprocessing": {"clip": "auto", "normalization": "dataset"}})
    (tmp_path / "fingerprint.json").write_text(json.dumps(FINGERPRINT))
    plan = build_plan(plan_inputs(config), tmp_path / "fingerprint.json", tmp_path / PLAN_NAME)
    assert plan["preprocessing"]["clip"] == [-60.0, 310.0]
    assert (plan["preprocessing"]["mean"], plan["preprocessing"]["std"]) == (120.0, 80.0)
    with pytest.raises(ValueError, match="fingerprint"):
        build_plan(plan_inputs(config), None, tmp_path / "other.json")
    assert not (tmp_path / "other.json").exists()
    # a config that does not need it ignores it: the paper's window stays
    assert make_plan(paper(), FINGERPRINT)["preprocessing"]["clip"] == [-75.76, 349.49]


def test_a_plan_is_checked_where_it_is_read(tmp_path):
    plan = make_plan(paper(), None)
    for broken, message in [
        ({**plan, "num_classes": 4}, "num_classes"),
        ({**plan, "output_activation": "tanh"}, "tanh"),
        ({**plan, "extra": 1}, "unknown keys"),
        ({**plan, "patch_size": [224]}, "patch_size"),
        ({**plan, "preprocessing": {**plan["preprocessing"], "clip": "auto"}}, "unresolved"),
    ]:
        (tmp_path / PLAN_NAME).write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            read_plan(tmp_path / PLAN_NAME)
    with pytest.raises(ValueError, match="crop_to_body"):
        write_plan({**plan, "preprocessing": {**plan["preprocessing"], "crop_to_body": "yes"}}, tmp_path / PLAN_NAME)
    assert check_plan(plan) == plan


def test_the_digest_follows_the_plan():
    plan = make_plan(paper(), None)
    assert plan_digest(plan) == plan_digest(json.loads(json.dumps(plan))) and len(plan_digest(plan)) == 64
    assert plan_digest({**plan, "patch_size": [256, 256]}) != plan_digest(plan)


def test_preprocess_and_predict_apply_the_same_plan(tmp_path):
    from kidney_seg.preprocessing import compute_fingerprint, preprocess_case, preprocess_image
    from kidney_seg.volume import read_image

    rng = np.random.default_rng(0)
    image = rng.normal(-800, 30, (8, 40, 36)).astype(np.float32)
    image[:, 6:34, 5:31] = rng.normal(40, 20, (8, 28, 26))  # the body
    label = np.zeros(image.shape, np.uint8)
    label[2:6, 12:24, 10:20] = 1
    label[3:5, 15:19, 12:16] = 2
    image[label > 0] += 150
    affine = kits_affine((2.5, 0.9, 0.9))
    img, lab = write_nifti(tmp_path / "img.nii.gz", image, affine), write_nifti(tmp_path / "lab.nii.gz", label, affine)
    compute_fingerprint([("case_00000", str(img), str(lab))], tmp_path / "fingerprint.json")
    config = with_overrides(
        paper(),
        {
            "dataset": {"source": "phantom"},
            "training": {"patch_size": [32, 32]},
            "model": {"levels": 4},
            "preprocessing": {"clip": "auto", "normalization": "dataset", "target_spacing": [3.0, 1.5, 1.5]},
        },
    )
    plan = build_plan(plan_inputs(config), tmp_path / "fingerprint.json", tmp_path / PLAN_NAME)
    plan = read_plan(tmp_path / PLAN_NAME)
    meta = preprocess_case(
        "case_00000",
        img,
        lab,
        tmp_path / "pre",
        plan["preprocessing"],
        tuple(plan["labels"]),
        plan_digest=plan_digest(plan),
    )
    assert meta["plan_digest"] == plan_digest(plan) and "settings" not in meta
    assert meta["num_classes"] == plan["num_classes"]
    # what predict runs on a scan (inference.predict_volume) is what the slice cache holds
    raw, geometry = read_image(img, "case_00000")
    predicted_input, _ = preprocess_image(raw, geometry.spacing, plan["preprocessing"])
    np.testing.assert_array_equal(np.load(tmp_path / "pre" / "image.npy"), predicted_input)
