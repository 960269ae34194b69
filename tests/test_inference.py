import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from kidney_seg.config import with_defaults
from kidney_seg.inference import (
    gaussian_importance_map,
    linear_weights,
    predict_case,
    predict_slice_logits,
    predict_volume,
    probabilities_to_labels,
    resample_linear_slab,
    tile_starts,
)
from kidney_seg.plan import make_plan, read_plan
from kidney_seg.preprocessing import body_box
from tests.conftest import kits_affine, write_nifti


def constant_model(x):
    return np.broadcast_to(np.array([1.0, 3.0, -2.0], np.float32), x.shape[:3] + (3,)).copy()


def passthrough_model(x):
    return np.concatenate([x, -x], axis=-1)


def flip_equivariant_model(x):
    """A symmetric 3x3 box filter: commutes with flips."""
    from scipy import ndimage

    out = ndimage.uniform_filter(x[..., 0], size=(1, 3, 3), mode="nearest")
    return np.stack([out, -out], axis=-1)


def test_tile_starts_cover_and_end_flush():
    assert tile_starts(100, 128, 0.5) == [0]
    starts = tile_starts(300, 128, 0.5)
    assert starts[0] == 0 and starts[-1] == 300 - 128
    assert all(b - a <= 64 for a, b in zip(starts, starts[1:]))


def test_gaussian_map():
    w = gaussian_importance_map((32, 32))
    assert w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[16, 16] == w.max() and w[0, 0] < w[8, 8]


def test_constant_model_gives_constant_output_without_seams():
    image = np.random.default_rng(0).normal(size=(77, 101)).astype(np.float32)
    out = predict_slice_logits(image, constant_model, 3, (32, 32), step=0.5)
    assert out.shape == (77, 101, 3)
    np.testing.assert_allclose(out, np.broadcast_to([1.0, 3.0, -2.0], out.shape), atol=1e-5)


@pytest.mark.parametrize(
    "shape,patch,step,gaussian",
    [((77, 101), (32, 32), 0.5, True), ((50, 50), (16, 32), 0.3, False), ((10, 7), (32, 32), 0.5, True)],
)
def test_passthrough_model_reproduces_input(shape, patch, step, gaussian):
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    out = predict_slice_logits(
        image, passthrough_model, 2, patch, step=step, gaussian=gaussian, mirror_tta=True, batch_size=5
    )
    np.testing.assert_allclose(out[..., 0], image, atol=1e-5)


def test_tta_equals_no_tta_for_flip_equivariant_model():
    image = np.random.default_rng(2).normal(size=(45, 60)).astype(np.float32)
    with_tta = predict_slice_logits(image, flip_equivariant_model, 2, (32, 32), mirror_tta=True)
    without = predict_slice_logits(image, flip_equivariant_model, 2, (32, 32), mirror_tta=False)
    np.testing.assert_allclose(with_tta, without, atol=1e-5)


def test_probabilities_to_labels_resamples_to_shape():
    probs = np.zeros((3, 2, 4, 4), np.float32)
    probs[0] = 1
    probs[:, :, 1:3, 1:3] = 0
    probs[2, :, 1:3, 1:3] = 1
    labels = probabilities_to_labels(probs, (5, 8, 8))
    assert labels.shape == (5, 8, 8) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 2}


def fake_plan(preprocessing: dict, fingerprint: dict | None = None, **training) -> dict:
    """A model's inference.json: the plan of a phantom config with these preprocessing and training settings."""
    return make_plan(
        {
            "dataset": {"source": "phantom"},
            "preprocessing": with_defaults("preprocessing", preprocessing),
            "training": with_defaults("training", {"patch_size": [32, 32], **training}),
        },
        fingerprint,
    )


def fake_settings(**overrides):
    """The plan of the tests' default preprocessing, with some preprocessing settings overridden."""
    return fake_plan({"target_spacing": [3.0, 1.5, 1.5], "clip": [-100, 300], **overrides})


def threshold_model(x):
    """Class 1 where the normalised intensity is high."""
    return np.concatenate([np.zeros_like(x), 4 * (x - 2.0), np.full_like(x, -10)], axis=-1)


def layouts(data):
    """The same KiTS-layout volume written three ways: KiTS, RAS slices-last, and an odd oblique-free layout."""
    ras = np.ascontiguousarray(np.flip(np.transpose(data, (2, 1, 0)), axis=(0, 1, 2)))
    odd = np.ascontiguousarray(np.transpose(data, (1, 0, 2))[:, :, ::-1])
    return {
        "kits": (data, kits_affine((2.5, 0.9, 0.8)), lambda a: a),
        "ras": (ras, np.diag([0.8, 0.9, 2.5, 1.0]), lambda a: np.flip(a, axis=(0, 1, 2)).transpose(2, 1, 0)),
        "odd": (
            odd,
            np.array([[0, 0, 0.8, -10], [0.9, 0, 0, 5], [0, 2.5, 0, 100], [0, 0, 0, 1]], float),
            lambda a: np.transpose(a[:, :, ::-1], (1, 0, 2)),
        ),
    }


def test_prediction_lands_on_the_input_grid_in_every_orientation(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.normal(0, 20, (9, 41, 37)).astype(np.float32)
    data[3:6, 10:20, 10:25] = 250
    data[:, :9] = -1000  # an air margin: the body crop is not the whole grid
    box = body_box(data)
    assert box[1].start == 5
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "inference.json").write_text(json.dumps(fake_settings()))
    cfg = with_defaults("inference", {"step": 0.5, "gaussian": True, "mirror_tta": True, "batch_size": 4})
    back_in_kits = {}
    for name, (arr, affine, to_kits) in layouts(data).items():
        path = write_nifti(tmp_path / f"{name}.nii.gz", arr, affine, qcode=1, scode=1)
        predict_case(
            name,
            path,
            tmp_path / "model",
            tmp_path / f"pred_{name}.nii.gz",
            cfg,
            predictor=(threshold_model, fake_settings()),
        )
        out = nib.load(str(tmp_path / f"pred_{name}.nii.gz"))
        assert out.shape == arr.shape and out.get_data_dtype() == np.uint8
        np.testing.assert_allclose(out.affine, affine)
        assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 1
        back_in_kits[name] = to_kits(np.asanyarray(out.dataobj))
    np.testing.assert_array_equal(back_in_kits["ras"], back_in_kits["kits"])
    np.testing.assert_array_equal(back_in_kits["odd"], back_in_kits["kits"])
    pred, bright = back_in_kits["kits"], data > 200
    assert (pred[bright] == 1).mean() > 0.7 and (pred[~bright] == 1).mean() < 0.05
    outside = np.ones(data.shape, bool)
    outside[box] = False
    assert np.all(pred[outside] == 0)


def test_slab_equals_slice_by_slice():
    from kidney_seg.inference import predict_probabilities, predict_slab_logits

    volume = np.random.default_rng(4).normal(size=(5, 40, 52)).astype(np.float32)
    slab = predict_slab_logits(volume, flip_equivariant_model, 2, (32, 32), batch_size=7)
    for z in range(5):
        np.testing.assert_allclose(
            slab[z], predict_slice_logits(volume[z], flip_equivariant_model, 2, (32, 32)), atol=1e-6
        )
    probs = predict_probabilities(volume, passthrough_model, 2, (32, 32), batch_size=64)
    assert probs.shape == (2, 5, 40, 52)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


CFG = with_defaults("inference", {"step": 0.5, "gaussian": True, "mirror_tta": False, "batch_size": 8})


def body_phantom(shape=(7, 60, 70)):
    """Air around an elliptical 40 HU body with a bright 250 HU block inside."""
    image = np.full(shape, -1000.0, np.float32)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    image[:, ((yy - 30) / 20.0) ** 2 + ((xx - 35) / 25.0) ** 2 <= 1] = 40
    image[2:5, 25:35, 30:40] = 250
    return image


def test_crop_is_undone_and_outside_the_body_is_background():
    image = body_phantom()
    labels = predict_volume(image, (2.5, 1.0, 1.0), fake_settings(), constant_model, CFG)  # class 1 everywhere it looks
    box = body_box(image)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert np.all(labels[box] == 1)
    outside = np.ones(image.shape, bool)
    outside[box] = False
    assert outside.any() and np.all(labels[outside] == 0)
    uncropped = predict_volume(image, (2.5, 1.0, 1.0), fake_settings(crop_to_body=False), constant_model, CFG)
    assert np.all(uncropped == 1)


def test_threshold_model_finds_the_block_with_and_without_crop():
    image = body_phantom()
    for crop in (True, False):
        for spacing in ([3.0, 1.5, 1.5], None):
            labels = predict_volume(
                image, (2.5, 1.0, 1.0), fake_settings(crop_to_body=crop, target_spacing=spacing), threshold_model, CFG
            )
            bright = image > 200
            assert labels.shape == image.shape
            assert (labels[bright] == 1).mean() > 0.7 and (labels[~bright] == 1).mean() < 0.05


def test_dataset_normalisation_settings_are_used():
    image = body_phantom()
    fp = {"percentile_00_5": -100.0, "percentile_99_5": 300.0, "mean": 40.0, "std": 100.0}
    plan = fake_plan({"target_spacing": None, "clip": "auto", "normalization": "dataset"}, fp)
    assert plan["preprocessing"]["mean"] == 40.0 and plan["preprocessing"]["clip"] == [-100.0, 300.0]
    labels = predict_volume(image, (2.5, 1.0, 1.0), plan, threshold_model, CFG)  # (250-40)/100 = 2.1 > 2
    assert (labels[image > 200] == 1).mean() > 0.7 and (labels[image < 200] == 1).mean() < 0.05


def test_an_inference_json_that_is_not_a_whole_plan_is_refused(tmp_path):
    legacy = {
        "num_classes": 3,
        "labels": [0, 1, 2],
        "patch_size": [32, 32],
        "target_spacing": [3.0, 1.5, 1.5],
        "clip": [-100, 300],
        "normalization": "zscore_slice",
    }  # the flat settings of an unreleased version
    (tmp_path / "inference.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match=r"inference\.json: missing keys \['class_names', 'output_activation'"):
        read_plan(tmp_path / "inference.json")
    unresolved = fake_plan(
        {"target_spacing": None, "clip": "auto", "normalization": "dataset"},
        {"percentile_00_5": -100.0, "percentile_99_5": 300.0, "mean": 40.0, "std": 100.0},
    )
    unresolved["preprocessing"]["mean"] = None
    (tmp_path / "inference.json").write_text(json.dumps(unresolved))
    with pytest.raises(ValueError, match="needs 'mean' and 'std'"):
        read_plan(tmp_path / "inference.json")


@pytest.mark.parametrize("shape", [(9, 25, 31), (3, 8, 8), (4, 12, 10), (13, 12, 10)])
def test_slab_linear_resampling_equals_full_zoom(shape):
    vol = np.random.default_rng(7).random((4, 12, 10)).astype(np.float32)
    ref = ndimage.zoom(vol, [n / o for n, o in zip(shape, vol.shape)], order=1, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(resample_linear_slab(vol, shape, 0, shape[0]), ref, atol=1e-5)
    np.testing.assert_allclose(
        np.concatenate([resample_linear_slab(vol, shape, z, min(z + 2, shape[0])) for z in range(0, shape[0], 2)]),
        ref,
        atol=1e-5,
    )
    lo, hi, w = linear_weights(4, shape[0])
    assert lo.min() >= 0 and hi.max() <= 3 and np.all((w >= 0) & (w <= 1))


def test_probabilities_to_labels_matches_per_class_full_zoom():
    rng = np.random.default_rng(8)
    logits = ndimage.gaussian_filter(rng.normal(size=(3, 5, 16, 14)), sigma=(0, 1, 2, 2)) * 5
    probs = np.exp(logits) / np.exp(logits).sum(0)
    shape = (11, 30, 27)
    full = np.stack(
        [
            ndimage.zoom(p, [n / o for n, o in zip(shape, p.shape)], order=1, mode="nearest", grid_mode=True)
            for p in probs.astype(np.float32)
        ]
    )
    top2 = np.sort(full, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-4
    for slab in (1, 4, 64):
        labels = probabilities_to_labels(probs.astype(np.float32), shape, slab=slab)
        np.testing.assert_array_equal(labels[clear], full.argmax(0)[clear])
    out = np.full(shape, 9, np.uint8)
    assert probabilities_to_labels(probs.astype(np.float32), shape, out=out) is out and out.max() <= 2


@pytest.mark.parametrize("across_slices", ["linear", "nearest"])
def test_certain_background_is_not_resampled_and_the_labels_do_not_change(monkeypatch, across_slices):
    """Localised scores (background 1, the rest 0 outside what was predicted) resample only the windows that read
    a predicted pixel, and give the labels of resampling everything."""
    from kidney_seg import inference

    rng = np.random.default_rng(3)
    probs = np.zeros((3, 12, 9, 10), np.float32)
    probs[0] = 1.0
    probs[:, 5:9, 2:6, 3:8] = np.moveaxis(rng.dirichlet([1.0, 1.0, 1.0], size=(4, 4, 5)), -1, 0)
    probs[0, 2, 4, 4] = 0.999  # not certain: read by its slab (its argmax is still background)
    boxes = inference.uncertain_boxes(probs)
    assert boxes[2] == (4, 5, 4, 5) and boxes[5:9] == [(2, 6, 3, 8)] * 4
    assert [i for i, b in enumerate(boxes) if b is None] == [0, 1, 3, 4, 9, 10, 11]
    shape = (31, 20, 17)
    sizes = []
    real = inference.resample_linear_slab
    monkeypatch.setattr(
        inference, "resample_linear_slab", lambda *a, **k: sizes.append(real(*a, **k).size) or real(*a, **k)
    )
    fast = probabilities_to_labels(probs, shape, slab=4, across_slices=across_slices)
    resampled = sum(sizes)
    everywhere = [(0, 9, 0, 10)] * 12
    monkeypatch.setattr(inference, "uncertain_boxes", lambda p: everywhere)
    sizes.clear()
    full = probabilities_to_labels(probs, shape, slab=4, across_slices=across_slices)
    np.testing.assert_array_equal(fast, full)
    assert sum(sizes) == 3 * 31 * 20 * 17 and resampled < sum(sizes) / 4, (resampled, sum(sizes))
    assert fast.any() and not fast[:4].any() and not fast[-4:].any()


def test_real_kits_header_and_its_ras_copy_give_the_same_prediction(tmp_path, kits_labels_dir):
    """A real KiTS case re-saved in RAS with slices last is segmented identically, voxel for voxel.

    The case is cropped around its kidneys, a tenth of its voxels: the crop keeps the real
    header's orientation and spacing, and its affine is the real one shifted to the crop.
    """
    from kidney_seg.volume import geometry_of

    whole = nib.load(str(kits_labels_dir / "case_00037" / "segmentation.nii.gz"))  # 97 x 512 x 512, 5 mm slices
    crop = (slice(14, 58), slice(190, 345), slice(100, 430))  # kidneys: slices 19-52, rows 202-330, columns 116-418
    src = whole.slicer[crop]
    np.testing.assert_array_equal(src.affine[:3, :3], whole.affine[:3, :3])
    assert nib.aff2axcodes(src.affine) == ("I", "P", "L") and src.header.get_zooms() == whole.header.get_zooms()
    whole_label = np.asanyarray(whole.dataobj)
    label = whole_label[crop].astype(np.uint8)
    assert (label > 0).sum() == (whole_label > 0).sum() > 0  # every kidney and tumour voxel is in the crop
    rng = np.random.default_rng(5)
    ct = np.where(label == 0, -80.0, np.where(label == 1, 180.0, 60.0)) + rng.normal(0, 10, label.shape)
    ct = ct.astype(np.float32)
    kits_path = write_nifti(tmp_path / "kits.nii.gz", ct, src.affine, qcode=1, scode=1)
    ras = np.ascontiguousarray(np.flip(np.transpose(ct, (2, 1, 0)), axis=(0, 1, 2)))
    spacing = geometry_of(src).spacing
    ras_path = write_nifti(tmp_path / "ras.nii.gz", ras, np.diag([spacing[2], spacing[1], spacing[0], 1.0]))
    settings = fake_settings(target_spacing=[5.0, 2.5, 2.5])
    cfg = with_defaults("inference", {"step": 0.5, "gaussian": True, "mirror_tta": False, "batch_size": 16})
    (tmp_path / "model").mkdir()
    a = predict_case(
        "k", kits_path, tmp_path / "model", tmp_path / "a.nii.gz", cfg, predictor=(threshold_model, settings)
    )
    b = predict_case(
        "r", ras_path, tmp_path / "model", tmp_path / "b.nii.gz", cfg, predictor=(threshold_model, settings)
    )
    assert a.shape == label.shape and b.shape == ras.shape
    np.testing.assert_array_equal(np.flip(b, axis=(0, 1, 2)).transpose(2, 1, 0), a)
    assert (a[label == 1] == 1).mean() > 0.5


def sigmoid_constant_model(kidney, tumor):
    """A sigmoid model: one logit per foreground class (kidney, tumour), the same everywhere."""
    return lambda x: np.broadcast_to(np.array([kidney, tumor], np.float32), x.shape[:3] + (2,)).copy()


def sigmoid_threshold_model(x):
    """Sigmoid logits: kidney where the normalised intensity is high, tumour never."""
    return np.concatenate([4 * (x - 2.0), np.full_like(x, -10)], axis=-1)


def test_sigmoid_scores_threshold_and_sum_rule():
    from kidney_seg.inference import class_scores, sigmoid_scores

    logits = np.array(
        [[-3.0, -1.0], [0.5, -1.0], [0.5, 2.0], [3.0, 1.0], [0.0, 0.0], [-0.1, 0.2], [1e-3, -20.0]], np.float32
    )
    scores = sigmoid_scores(logits)
    assert scores.shape == (7, 3) and scores.dtype == np.float32
    fg = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(scores[:, 1:], fg, rtol=1e-6)
    np.testing.assert_allclose(scores[:, 0] + scores[:, 1:].max(1), 1.0, atol=1e-6)  # background = 1 - max foreground
    np.testing.assert_array_equal(scores.argmax(1), [0, 1, 2, 1, 0, 2, 1])  # exactly 0.5 ties to background
    channels_first = sigmoid_scores(np.moveaxis(logits, -1, 0), axis=0)
    np.testing.assert_allclose(channels_first, scores.T)
    np.testing.assert_allclose(class_scores(logits, "sigmoid"), scores)
    with pytest.raises(ValueError):
        class_scores(logits, "tanh")


def test_region_scores_argmax_is_nnunets_region_rule():
    """argmax of region_scores = the highest nested region whose sigmoid exceeds 0.5 (nnU-Net v2's order of writes)."""
    from kidney_seg.inference import class_scores, region_scores

    rng = np.random.default_rng(7)
    logits = np.concatenate([rng.normal(0, 3, size=(500, 3)), [[0.0, 0.0, 0.0], [1.0, -1.0, 2.0]]]).astype(np.float32)
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    rule = np.zeros(len(logits), int)
    for c in range(3):  # regions "label >= 1", ">= 2", ">= 3" of a 4-class problem
        rule[probs[:, c] > 0.5] = c + 1
    scores = region_scores(logits)
    assert scores.shape == (502, 4) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores.argmax(1), rule)
    np.testing.assert_allclose(scores[:, 0], (1 - probs).min(1), atol=1e-6)
    np.testing.assert_allclose(scores[:, 3], probs[:, 2], atol=1e-6)
    np.testing.assert_allclose(region_scores(np.moveaxis(logits, -1, 0), axis=0), scores.T)
    np.testing.assert_allclose(class_scores(logits, "regions"), scores)


@pytest.mark.parametrize("kidney,tumor,expected", [(0.3, -1.0, 1), (-1.0, -2.0, 0), (1.0, 2.0, 2), (0.0, -5.0, 0)])
def test_sigmoid_predict_volume_constant_logits(kidney, tumor, expected):
    image = body_phantom()
    settings = {**fake_settings(), "output_activation": "sigmoid"}
    labels = predict_volume(image, (2.5, 1.0, 1.0), settings, sigmoid_constant_model(kidney, tumor), CFG)
    box = body_box(image)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert np.all(labels[box] == expected)
    outside = np.ones(image.shape, bool)
    outside[box] = False
    assert np.all(labels[outside] == 0)


def test_sigmoid_model_finds_the_block():
    from kidney_seg.inference import predict_probabilities

    image = body_phantom()
    for tta in (False, True):
        labels = predict_volume(
            image,
            (2.5, 1.0, 1.0),
            {**fake_settings(), "output_activation": "sigmoid"},
            sigmoid_threshold_model,
            {**CFG, "mirror_tta": tta},
        )
        bright = image > 200
        assert (labels[bright] == 1).mean() > 0.7 and (labels[~bright] == 1).mean() < 0.05 and not (labels == 2).any()
    probs = predict_probabilities(
        np.zeros((2, 20, 20), np.float32), sigmoid_constant_model(1.0, -1.0), 3, (16, 16), output_activation="sigmoid"
    )
    assert probs.shape == (3, 2, 20, 20)
    np.testing.assert_allclose(
        probs[:, 0, 0, 0], [1 - 1 / (1 + np.exp(-1)), 1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))], rtol=1e-5
    )


def test_unknown_output_activation_is_refused():
    with pytest.raises(ValueError, match="output_activation"):
        predict_volume(
            body_phantom(), (2.5, 1.0, 1.0), {**fake_settings(), "output_activation": "tanh"}, constant_model, CFG
        )


def logit_model(logits):
    """A model that outputs the same logits everywhere."""
    return lambda x: np.broadcast_to(np.asarray(logits, np.float32), x.shape[:3] + (len(logits),)).copy()


def test_ensemble_averages_logits_like_nnunet_v2():
    from kidney_seg.inference import predict_probabilities, softmax

    a, b = [0.0, 5.0, 0.0], [0.0, -5.0, 3.0]
    vol = np.zeros((3, 20, 24), np.float32)
    probs = predict_probabilities(vol, [logit_model(a), logit_model(b)], 3, (16, 16), mirror_tta=False)
    mean_logits = softmax((np.array(a) + np.array(b)) / 2)
    mean_probs = (softmax(np.array(a)) + softmax(np.array(b))) / 2
    np.testing.assert_allclose(probs[:, 1, 5, 7], mean_logits, atol=1e-6)
    # here the two averages even pick different classes: logits say 2, probabilities 1
    assert np.argmax(mean_logits) == 2 and np.argmax(mean_probs) == 1 and np.all(probs.argmax(axis=0) == 2)
    with pytest.raises(ValueError, match="empty ensemble"):
        predict_probabilities(vol, [], 3, (16, 16))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_an_ensemble_of_one_model_twice_is_that_model(activation):
    from kidney_seg.inference import predict_probabilities

    rng = np.random.default_rng(3)
    vol = rng.normal(size=(4, 20, 26)).astype(np.float32)
    weights = rng.normal(size=(3,)).astype(np.float32)

    def model(x):
        return np.concatenate([x * w for w in weights[: 2 if activation == "sigmoid" else 3]], axis=-1)

    kwargs = {"mirror_tta": True, "output_activation": activation}
    single = predict_probabilities(vol, model, 3, (16, 16), **kwargs)
    np.testing.assert_allclose(predict_probabilities(vol, [model, model], 3, (16, 16), **kwargs), single, atol=1e-6)


def test_ensemble_vote_changes_the_label():
    # model 1 is sure of class 1, model 2 mildly prefers class 2: the averaged logits pick class 1
    image = body_phantom()
    sure, mild = logit_model([0.0, 6.0, 0.0]), logit_model([0.0, 0.0, 0.5])
    labels = predict_volume(image, (2.5, 1.0, 1.0), fake_settings(crop_to_body=False), [sure, mild], CFG)
    assert np.all(labels == 1)
    assert np.all(predict_volume(image, (2.5, 1.0, 1.0), fake_settings(crop_to_body=False), [mild], CFG) == 2)


def _model_folder(path, settings):
    path.mkdir(parents=True)
    (path / "model.keras").write_bytes(b"weights")
    (path / "inference.json").write_text(json.dumps(settings))
    return path


def test_model_folders_single_folds_and_errors(tmp_path):
    from kidney_seg.inference import ensemble_plan, model_folders

    single = _model_folder(tmp_path / "single", fake_settings())
    assert model_folders(single) == [single]
    root = tmp_path / "model"
    for k in (0, 1, 10, 2):
        _model_folder(root / f"fold_{k}", fake_settings())
    assert [p.name for p in model_folders(root)] == ["fold_0", "fold_1", "fold_2", "fold_10"]
    assert ensemble_plan(model_folders(root)) == fake_settings()
    assert ensemble_plan(model_folders(root), fake_settings()) == fake_settings()
    with pytest.raises(ValueError, match=r"differs from the plan in \['patch_size'\]"):
        ensemble_plan(model_folders(root), {**fake_settings(), "patch_size": [64, 64]})
    with pytest.raises(FileNotFoundError, match="not a trained model folder"):
        model_folders(tmp_path / "empty")
    (root / "fold_2" / "inference.json").write_text(json.dumps(fake_settings(crop_to_body=False)))
    with pytest.raises(ValueError, match=r"fold_2/inference.json differs .* in \['preprocessing'\]"):
        ensemble_plan(model_folders(root))
    (root / "fold_1" / "inference.json").unlink()
    with pytest.raises(FileNotFoundError, match="inference.json"):
        model_folders(root)


def test_predict_case_applies_a_postprocessing_decision(tmp_path):
    from kidney_seg.postprocessing import decided_steps

    image = body_phantom((7, 60, 70))
    image[3, 10:13, 30:33] = 250  # a small bright speck away from the block: a false positive
    affine = np.diag([-1.0, -1.0, 2.5, 1.0])[[2, 1, 0, 3]]  # KiTS layout: slices first
    affine[:3, 3] = 0
    write_nifti(tmp_path / "scan.nii.gz", image, affine)
    predictor = ([threshold_model], fake_settings(target_spacing=None))
    raw = predict_case("scan", tmp_path / "scan.nii.gz", None, tmp_path / "raw.nii.gz", CFG, predictor=predictor)
    assert raw[3, 10:13, 30:33].any()
    decision = {
        "apply": ["foreground"],
        "settings": {"enabled": True, "keep_largest": 1, "min_component_ml": 0.0, "min_tumor_ml": 0.0},
    }
    kept = predict_case(
        "scan",
        tmp_path / "scan.nii.gz",
        None,
        tmp_path / "pp.nii.gz",
        CFG,
        predictor=predictor,
        postprocess=decided_steps(decision),
    )
    assert decided_steps({**decision, "apply": []}) is None
    assert not kept[3, 10:13, 30:33].any()
    np.testing.assert_array_equal(kept[2:5, 25:35, 30:40], raw[2:5, 25:35, 30:40])
    out = nib.load(str(tmp_path / "pp.nii.gz"))
    np.testing.assert_allclose(out.affine, nib.load(str(tmp_path / "scan.nii.gz")).affine)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), kept)


@pytest.mark.parametrize("shape", [(2, 5, 3), (3, 17, 29), (5, 33, 7), (11, 9, 64)])
@pytest.mark.parametrize("target_spacing", [[3.0, 1.5, 1.5], [1.0, 0.5, 0.7], None])
def test_output_grid_equals_input_grid_for_odd_shapes_and_tiny_slices(shape, target_spacing):
    image = np.full(shape, 40.0, np.float32)  # all body: no crop, every voxel predicted
    settings = fake_settings(target_spacing=target_spacing)
    labels = predict_volume(image, (2.5, 1.1, 0.9), settings, constant_model, {**CFG, "mirror_tta": True})
    assert labels.shape == shape and labels.dtype == np.uint8
    assert np.all(labels == 1)  # class 1 everywhere, no seam or padding left over


def test_pad_to_pads_each_slice_with_its_padding_value():
    from kidney_seg.inference import pad_to
    from kidney_seg.preprocessing import padding_value

    rng = np.random.default_rng(5)
    stack = rng.normal(size=(3, 10, 40)).astype(np.float32)
    stack[1] -= 7.0  # another slice, another background value (per-slice z-score)
    padded, region = pad_to(stack, (16, 16))
    assert padded.shape == (3, 16, 40)
    np.testing.assert_array_equal(padded[(slice(None),) + region], stack)
    for k in range(3):
        outside = np.ones(padded.shape[1:], bool)
        outside[region] = False
        assert np.all(padded[k][outside] == padding_value(stack[k]))


def anisotropic_truth() -> np.ndarray:
    """A kidney-with-tumour label on a 1 mm grid whose slice spacing (1 mm) the plan coarsens to 3 mm."""
    zz, yy, xx = np.mgrid[:31, :24, :24]
    truth = np.zeros((31, 24, 24), np.uint8)
    truth[((zz - 15) / 11.0) ** 2 + ((yy - 12) / 8.0) ** 2 + ((xx - 11) / 7.0) ** 2 <= 1] = 1
    truth[((zz - 18) / 5.0) ** 2 + ((yy - 13) / 4.0) ** 2 + ((xx - 12) / 4.0) ** 2 <= 1] = 2
    return truth


def test_a_perfect_plan_grid_prediction_scores_1_there_and_less_after_the_round_trip():
    from kidney_seg.evaluation import case_metrics
    from kidney_seg.inference import plan_grid_of, scores_to_labels
    from kidney_seg.preprocessing import label_on_plan_grid, resampled_shape

    truth, spacing = anisotropic_truth(), (1.0, 1.0, 1.0)
    box = tuple(slice(0, n) for n in truth.shape)
    grid = plan_grid_of(box, resampled_shape(truth.shape, spacing, (3.0, 1.0, 1.0)), spacing)
    on_plan = label_on_plan_grid(truth, box, grid.shape)
    scores = np.stack([(on_plan == c).astype(np.float32) for c in range(3)])
    plan_metrics = case_metrics(scores_to_labels(scores), on_plan, grid.spacing)
    assert plan_metrics["tk_dice"] == 1.0 and plan_metrics["tu_dice"] == 1.0
    for way in ("linear", "nearest"):
        back = probabilities_to_labels(scores, truth.shape, across_slices=way)
        round_trip = case_metrics(back, truth, spacing)
        assert 0.5 < round_trip["tk_dice"] < 1.0 and round_trip["tu_dice"] < 1.0, way


def test_nearest_across_slices_repeats_the_nearest_source_slice():
    from kidney_seg.preprocessing import nearest_indices

    rng = np.random.default_rng(2)
    probs = rng.random((3, 4, 5, 6)).astype(np.float32)
    labels = probabilities_to_labels(probs, (11, 5, 6), across_slices="nearest")
    np.testing.assert_array_equal(labels, probs.argmax(axis=0)[nearest_indices(4, 11)])
    with pytest.raises(ValueError, match="across_slices"):
        probabilities_to_labels(probs, (11, 5, 6), across_slices="cubic")


def test_plan_grid_file_holds_the_argmax_there_with_the_grid_affine(tmp_path, monkeypatch):
    import kidney_seg.inference as inference
    from kidney_seg.inference import predict_case_on_both_grids, predict_scores, scores_to_labels
    from kidney_seg.volume import read_image, read_label

    rng = np.random.default_rng(3)
    data = rng.normal(0, 20, (9, 41, 37)).astype(np.float32)
    data[3:6, 10:20, 10:25] = 250
    data[:, :9] = -1000  # an air margin: the crop box is not the whole grid
    model = tmp_path / "model"
    model.mkdir()
    (model / "inference.json").write_text(json.dumps(fake_settings()))
    (model / "model.keras").write_bytes(b"weights")
    on_plan = {}
    monkeypatch.setattr(inference, "load_predictor", lambda _dirs, _plan: ([threshold_model], fake_settings()))
    for name, (arr, affine, _) in layouts(data).items():
        path = write_nifti(tmp_path / f"{name}.nii.gz", arr, affine, qcode=1, scode=1)
        details = predict_case_on_both_grids(
            name, path, [model], tmp_path / f"{name}_pred.nii.gz", tmp_path / f"{name}_plan.nii.gz", CFG
        )
        grid = details["plan_grid"]
        labels, geometry = read_label(tmp_path / f"{name}_plan.nii.gz", name, (0, 1, 2))
        assert list(labels.shape) == grid["shape"] and list(geometry.spacing) == pytest.approx(grid["spacing"])
        image, scan = read_image(path, name)
        probs, _ = predict_scores(image, scan.spacing, fake_settings(), threshold_model, CFG)
        np.testing.assert_array_equal(labels, scores_to_labels(probs))
        # the plan grid's centre is the crop box's centre, in world coordinates (nibabel's reorientation)
        internal_affine = nib.load(str(path)).as_reoriented(np.asarray(scan.transform)).affine
        box_centre = [(a + b - 1) / 2 for a, b in grid["crop_box"]] + [1]
        grid_centre = [(n - 1) / 2 for n in grid["shape"]] + [1]
        plan_affine = nib.load(str(tmp_path / f"{name}_plan.nii.gz")).affine
        np.testing.assert_allclose(plan_affine @ grid_centre, internal_affine @ box_centre, atol=1e-6)
        on_plan[name] = labels
    np.testing.assert_array_equal(on_plan["ras"], on_plan["kits"])  # the same internal volume, the same labels


def test_segment_case_writes_the_uncertainty_map_on_the_scan_grid(tmp_path):
    from kidney_seg.inference import segment_case
    from kidney_seg.quality import SUMMARY_COLUMNS

    image = body_phantom((7, 60, 70))
    affine = np.diag([-1.0, -1.0, 2.5, 1.0])[[2, 1, 0, 3]]  # KiTS layout: slices first
    write_nifti(tmp_path / "scan.nii.gz", image, affine)
    predictor = ([threshold_model], fake_settings(target_spacing=None))
    result = segment_case(
        "scan",
        tmp_path / "scan.nii.gz",
        tmp_path / "pred.nii.gz",
        predictor,
        CFG,
        uncertainty_path=tmp_path / "u.nii.gz",
    )
    assert set(result.summary) == set(SUMMARY_COLUMNS)
    assert result.summary["kidney_hu_median"] == 250.0  # the bright block the threshold model calls kidney
    assert 0.0 <= result.summary["uncertainty_tk"] < 0.5
    written = nib.load(str(tmp_path / "u.nii.gz"))
    np.testing.assert_allclose(written.affine, nib.load(str(tmp_path / "scan.nii.gz")).affine)
    entropy = np.asanyarray(written.dataobj)
    assert written.get_data_dtype() == np.float32 and entropy.shape == image.shape
    assert 0.0 <= entropy.min() and entropy.max() <= 1.0
    pred = np.asanyarray(nib.load(str(tmp_path / "pred.nii.gz")).dataobj)
    edge = ndimage.binary_dilation(pred > 0) ^ ndimage.binary_erosion(pred > 0)
    assert entropy[edge].mean() > entropy[~ndimage.binary_dilation(pred > 0, iterations=3)].mean()  # unsure at edges
