import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import kidney_seg.preprocessing as pre
from kidney_seg import volume
from kidney_seg.config import with_defaults
from kidney_seg.errors import CaseDataError
from kidney_seg.preprocessing import (
    body_box,
    clip_hu,
    compute_fingerprint,
    nearest_indices,
    needs_fingerprint,
    normalize,
    preprocess_case,
    preprocess_image,
    resample_image,
    resample_label,
    resampled_shape,
    resolve_preprocessing,
    slice_index,
    zscore_slices,
)
from tests.conftest import kits_affine, write_nifti


def small_chunks(monkeypatch, nbytes: int) -> None:
    """Stream in blocks of ``nbytes``: many chunks, along each layout's slowest axis."""
    monkeypatch.setattr(volume, "CHUNK_BYTES", nbytes)
    monkeypatch.setattr(pre, "CHUNK_BYTES", nbytes)


CFG = {
    "target_spacing": [3.0, 0.7816, 0.7816],
    "clip": [-75.76, 349.49],
    "normalization": "zscore_slice",
    "crop_to_body": True,
}
FP = {"percentile_00_5": -50.0, "percentile_99_5": 300.0, "mean": 100.0, "std": 50.0}


def settings(**overrides):
    return resolve_preprocessing({**CFG, **overrides}, FP)


# ------------------------------------------------------------------ settings


def test_resolve_explicit_settings():
    s = resolve_preprocessing(CFG, None)
    assert s == {
        "target_spacing": [3.0, 0.7816, 0.7816],
        "clip": [-75.76, 349.49],
        "normalization": "zscore_slice",
        "mean": None,
        "std": None,
        "crop_to_body": True,
    }
    assert not needs_fingerprint(CFG)
    json.dumps(s)  # JSON-serialisable


def test_resolve_defaults_and_null_spacing():
    s = resolve_preprocessing(with_defaults("preprocessing", {"target_spacing": None, "clip": [-100, 200]}), None)
    assert s["target_spacing"] is None and s["normalization"] == "zscore_slice" and s["crop_to_body"] is True
    assert s["clip"] == [-100.0, 200.0]


def test_resolve_auto_clip_and_dataset_normalisation_from_fingerprint():
    cfg = {**CFG, "clip": "auto", "normalization": "dataset"}
    assert needs_fingerprint(cfg)
    assert needs_fingerprint({**CFG, "clip": "auto"}) and needs_fingerprint({**CFG, "normalization": "dataset"})
    s = resolve_preprocessing(cfg, FP)
    assert s["clip"] == [-50.0, 300.0] and s["mean"] == 100.0 and s["std"] == 50.0
    # an explicit window with dataset normalisation still takes mean/std from the fingerprint
    s = resolve_preprocessing({**CFG, "normalization": "dataset"}, FP)
    assert s["clip"] == [-75.76, 349.49] and s["mean"] == 100.0


@pytest.mark.parametrize("cfg", [{**CFG, "clip": "auto"}, {**CFG, "normalization": "dataset"}])
def test_resolve_needs_fingerprint(cfg):
    with pytest.raises(ValueError, match="fingerprint"):
        resolve_preprocessing(cfg, None)
    with pytest.raises(ValueError, match="lacks"):
        resolve_preprocessing(cfg, {"n_cases": 3})


@pytest.mark.parametrize(
    "bad",
    [
        {"clip": [300, -50]},
        {"clip": [1, 2, 3]},
        {"clip": "manual"},
        {"normalization": "minmax"},
        {"target_spacing": [1.0, 0.0, 1.0]},
        {"target_spacing": [1.0, 1.0]},
        {"crop_to_body": "yes"},
    ],
)
def test_resolve_rejects_invalid_values(bad):
    with pytest.raises(ValueError):
        resolve_preprocessing({**CFG, **bad}, FP)


# ------------------------------------------------------------------ intensities


def test_clip_hu():
    out = clip_hu(np.array([-1000.0, 0.0, 500.0]), (-75.76, 349.49))
    np.testing.assert_allclose(out, [-75.76, 0.0, 349.49], rtol=1e-6)
    with pytest.raises(ValueError):
        clip_hu(np.zeros(3), (10, 5))


def test_zscore_per_slice_and_constant_slice():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(50, 10, (8, 8)), np.full((8, 8), 7.0)]).astype(np.float32)
    out = zscore_slices(image)
    assert out[0].mean() == pytest.approx(0, abs=1e-5) and out[0].std() == pytest.approx(1, abs=1e-4)
    assert np.all(np.isfinite(out)) and np.all(out[1] == 0)
    assert image[1, 0, 0] == 7.0  # not in place by default


def test_dataset_normalisation_clips_then_standardises():
    image = np.array([[[-1000.0, 0.0], [100.0, 5000.0]]], np.float32)
    s = settings(normalization="dataset")
    out = normalize(image, s)
    np.testing.assert_allclose(out, (np.clip(image, -75.76, 349.49) - 100.0) / 50.0, rtol=1e-6)
    assert out.dtype == np.float32 and image[0, 0, 0] == -1000.0
    inplace = image.copy()
    assert normalize(inplace, s, inplace=True) is inplace
    np.testing.assert_allclose(inplace, out)
    with pytest.raises(ValueError, match="mean"):
        normalize(image, {**s, "mean": None})


def test_zscore_normalise_clips_first():
    image = np.array([[[-1000.0, 0.0], [100.0, 200.0]]], np.float32)
    np.testing.assert_allclose(normalize(image, settings()), zscore_slices(clip_hu(image, CFG["clip"])), atol=1e-6)


# ------------------------------------------------------------------ fingerprint


def write_case(root, case_id, image, label, spacing=(3.0, 0.8, 0.8), image_dtype=np.int16):
    affine = kits_affine(spacing)
    ip = write_nifti(root / case_id / "imaging.nii.gz", image.astype(image_dtype), affine)
    lp = write_nifti(root / case_id / "segmentation.nii.gz", label.astype(np.uint8), affine)
    return case_id, str(ip), str(lp)


def fingerprint_cases(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        image = np.full((4, 20, 20), 3000, np.int16)  # background far outside the foreground range
        label = np.zeros((4, 20, 20), np.uint8)
        label[1:3, 5:15, 5:15] = 1
        label[2, 8:11, 8:11] = 2 + (i == 2)  # one case has a cyst (3): still foreground
        image[label > 0] = rng.integers(-100, 400, size=int((label > 0).sum()))
        cases.append(write_case(tmp_path / "raw", f"case_{i:05d}", image, label))
    return cases


def test_fingerprint_uses_only_foreground_and_matches_numpy(tmp_path):
    cases = fingerprint_cases(tmp_path)
    fp = compute_fingerprint(cases, tmp_path / "fp.json", seed=1, samples_per_case=10_000)
    values = []
    for _case_id, ip, lp in cases:
        img, lab = np.asanyarray(nib.load(ip).dataobj), np.asanyarray(nib.load(lp).dataobj)
        values.append(img[lab > 0].astype(np.float64))
    pooled = np.concatenate(values)
    lo, hi = np.percentile(pooled, [0.5, 99.5])
    assert fp["percentile_00_5"] == pytest.approx(lo) and fp["percentile_99_5"] == pytest.approx(hi)
    assert fp["mean"] == pytest.approx(np.clip(pooled, lo, hi).mean())
    assert fp["std"] == pytest.approx(np.clip(pooled, lo, hi).std())
    assert fp["max"] < 3000 and fp["n_cases"] == 3 and fp["n_voxels"] == pooled.size == fp["n_foreground_voxels"]
    assert json.loads((tmp_path / "fp.json").read_text()) == fp


def test_fingerprint_sampling_is_seeded_and_order_independent(tmp_path):
    cases = fingerprint_cases(tmp_path)
    a = compute_fingerprint(cases, tmp_path / "a.json", seed=7, samples_per_case=50)
    b = compute_fingerprint(cases[::-1], tmp_path / "b.json", seed=7, samples_per_case=50)
    c = compute_fingerprint(cases, tmp_path / "c.json", seed=8, samples_per_case=50)
    assert a == b and (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a["n_voxels"] == 150 and a["n_foreground_voxels"] > 150
    assert (a["mean"], a["std"]) != (c["mean"], c["std"])
    resolved = resolve_preprocessing({**CFG, "clip": "auto", "normalization": "dataset"}, a)
    assert resolved["clip"] == [a["percentile_00_5"], a["percentile_99_5"]] and resolved["std"] == a["std"]


def test_fingerprint_errors(tmp_path):
    with pytest.raises(ValueError):
        compute_fingerprint([], tmp_path / "fp.json")
    case = write_case(tmp_path / "raw", "case_00000", np.zeros((3, 8, 8)), np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="foreground"):
        compute_fingerprint([case], tmp_path / "fp.json")
    assert not (tmp_path / "fp.json").exists()


# ------------------------------------------------------------------ body box


def phantom_body(shape=(6, 64, 80)):
    """Air, an elliptical body at 40 HU, a table below it (separated by air), a bright blob in a corner."""
    image = np.full(shape, -1000.0, np.float32)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    body = ((yy - 28) / 18.0) ** 2 + ((xx - 40) / 25.0) ** 2 <= 1
    image[:, body] = 40
    image[:, 55:58, 5:75] = 300  # table: wide, thin, below the body
    image[:, 1:3, 76:78] = 2000  # small bright blob at the edge
    return image, body


def test_body_box_contains_body_and_ignores_table_and_edge_blob():
    image, body = phantom_body()
    box = body_box(image, margin=2)
    rows, cols = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
    assert box[0] == slice(0, 6)
    assert box[1].start == rows[0] - 2 and box[1].stop == rows[-1] + 1 + 2
    assert box[2].start == cols[0] - 2 and box[2].stop == cols[-1] + 1 + 2
    assert box[1].stop < 55 and box[2].stop < 76  # neither the table nor the blob
    assert np.all(image[box][:, :2] == -1000) and np.all(image[box][:, :, -2:] == -1000)  # only margin air


def test_body_box_empty_and_layout_independent(monkeypatch):
    air = np.full((3, 10, 12), -1000.0, np.float32)
    assert body_box(air) == (slice(0, 3), slice(0, 10), slice(0, 12))
    image, _ = phantom_body()
    expected = body_box(image)
    small_chunks(monkeypatch, 512)  # force many chunks, along each layout's slowest axis
    fortran = np.asfortranarray(image.astype(np.int16))
    assert body_box(fortran) == expected == body_box(image[::-1, :, :][::-1])


# ------------------------------------------------------------------ resampling


def test_resampled_shape():
    assert resampled_shape((10, 100, 80), (5.0, 0.8, 0.8), (3.0, 1.6, 1.6)) == (17, 50, 40)
    assert resampled_shape((10, 100, 80), (5.0, 0.8, 0.8), None) == (10, 100, 80)


def test_resample_image_shape_and_constant():
    image = np.full((5, 20, 30), 3.0, np.float32)
    out = resample_image(image, (8, 10, 15))
    assert out.shape == (8, 10, 15) and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.0, atol=1e-5)


def old_zoom(array, shape, order):
    """The former implementation's full-volume zoom."""
    if tuple(array.shape) == tuple(shape):
        return array
    return ndimage.zoom(
        array,
        [n / o for n, o in zip(shape, array.shape)],
        order=order,
        mode="nearest",
        grid_mode=True,
        prefilter=order > 1,
    )


def old_resample_image(image, shape):
    inplane = np.stack([old_zoom(s, shape[1:], 3) for s in image])
    return old_zoom(inplane, (shape[0],) + tuple(inplane.shape[1:]), 0).astype(np.float32)


def old_resample_label(label, shape, num_classes):
    best, out = np.full(shape, -1.0, np.float32), np.zeros(shape, np.uint8)
    for c in range(num_classes):
        onehot = (label == c).astype(np.float32)
        prob = old_zoom(np.stack([old_zoom(s, shape[1:], 1) for s in onehot]), shape, 0)
        better = prob > best
        out[better] = c
        best[better] = prob[better]
    return out


@pytest.mark.parametrize("shape", [(5, 15, 17), (23, 15, 17), (4, 40, 33), (12, 20, 25), (7, 20, 25)])
def test_slice_first_equals_inplane_first(shape):
    rng = np.random.default_rng(5)
    image = rng.normal(size=(12, 20, 25)).astype(np.float32)
    np.testing.assert_allclose(resample_image(image, shape), old_resample_image(image, shape), atol=1e-6)
    label = ndimage.median_filter(rng.integers(0, 3, (12, 20, 25)), size=3).astype(np.uint8)
    np.testing.assert_array_equal(resample_label(label, shape, 3), old_resample_label(label, shape, 3))
    assert list(nearest_indices(12, shape[0])) == list(old_zoom(np.arange(12.0), (shape[0],), 0).astype(int))


def test_resample_label_keeps_values_and_volume():
    label = np.zeros((6, 40, 40), np.uint8)
    label[:, 10:30, 10:30] = 1
    label[:, 16:26, 16:26] = 2
    out = resample_label(label, (6, 20, 20), 3)
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out > 0).sum() * 4 == pytest.approx((label > 0).sum(), rel=0.1)
    assert (out == 2).sum() * 4 == pytest.approx((label == 2).sum(), rel=0.15)


@pytest.mark.parametrize("shape", [(3, 7, 9), (10, 41, 37), (5, 20, 20), (9, 13, 60)])
def test_resample_label_never_invents_classes(shape):
    rng = np.random.default_rng(6)
    label = np.where(rng.random((5, 20, 20)) < 0.4, 2, 0).astype(np.uint8)  # speckled tumour, no kidney
    label[:, 5:9, 5:9] = 2
    out = resample_label(label, shape, 3)
    assert set(np.unique(out)) <= {0, 2} and (out == 2).any()


def test_preprocess_image_crops_and_handles_any_layout(monkeypatch):
    image, body = phantom_body((6, 64, 80))
    image[:, 20:30, 30:50] = 200
    s = settings(target_spacing=[2.0, 1.5, 1.5])
    out, box = preprocess_image(image, (3.0, 1.0, 1.0), s)
    assert box == body_box(image)
    cropped = tuple(b.stop - b.start for b in box)
    assert out.shape == resampled_shape(cropped, (3.0, 1.0, 1.0), [2.0, 1.5, 1.5]) and out.dtype == np.float32
    small_chunks(monkeypatch, 1024)
    for variant in (np.asfortranarray(image.astype(np.int16)), np.flip(np.flip(image, 1).copy(), 1)):
        out2, box2 = preprocess_image(variant, (3.0, 1.0, 1.0), s)
        assert box2 == box
        np.testing.assert_allclose(out2, out, atol=1e-5)
    assert image[0, 0, 0] == -1000  # input untouched


def test_a_resampled_scan_resamples_each_slice_once_and_equals_preprocess_image(monkeypatch):
    from kidney_seg import preprocessing

    image, _ = phantom_body((9, 64, 80))
    s = settings(target_spacing=[3.0, 1.5, 1.5])
    whole, box = preprocess_image(image, (3.0, 1.0, 1.0), s)
    zoomed = []
    real = preprocessing._zoom2d
    monkeypatch.setattr(preprocessing, "_zoom2d", lambda plane, *a, **k: zoomed.append(1) or real(plane, *a, **k))
    scan, box2 = preprocessing.prepare_image(image, (3.0, 1.0, 1.0), s)
    assert box2 == box and scan.shape == whole.shape and len(scan) == 9 and not zoomed
    np.testing.assert_array_equal(scan.slices([6, 2]), whole[[6, 2]])
    np.testing.assert_array_equal(scan.slices(slice(2, 5)), whole[2:5])
    assert len(zoomed) == 4  # 6, 2, then 3 and 4
    np.testing.assert_array_equal(scan.volume(), whole)
    assert len(zoomed) == 9


def test_preprocess_image_without_resampling_or_crop_keeps_shape():
    image = np.random.default_rng(0).normal(40, 30, (4, 16, 18)).astype(np.float32)
    out, box = preprocess_image(image, (5.0, 0.7, 0.7), settings(target_spacing=None, crop_to_body=False))
    assert out.shape == image.shape and box == (slice(0, 4), slice(0, 16), slice(0, 18))
    np.testing.assert_allclose(out, zscore_slices(clip_hu(image, CFG["clip"])), atol=1e-5)


# ------------------------------------------------------------------ cases


def test_slice_index():
    label = np.zeros((4, 3, 3), np.uint8)
    label[1, 0, 0] = 1
    label[2, 1, 1] = 2
    idx = slice_index(label, 3)
    assert idx == {"foreground": [1, 2], "class_1": [1], "class_2": [2]}


def test_preprocess_case_writes_cache(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(40, 30, (6, 32, 40)).astype(np.float32)
    label = np.zeros((6, 32, 40), np.uint8)
    label[2:4, 10:20, 10:20] = 1
    label[3, 12:15, 12:15] = 2
    affine = kits_affine((4.0, 0.8, 0.8))
    ip = write_nifti(tmp_path / "raw" / "imaging.nii.gz", image, affine)
    lp = write_nifti(tmp_path / "raw" / "segmentation.nii.gz", label, affine)
    s = resolve_preprocessing(
        with_defaults(
            "preprocessing", {"target_spacing": [2.0, 1.6, 1.6], "clip": [-75.76, 349.49], "crop_to_body": False}
        ),
        None,
    )
    meta = preprocess_case("case_00004", ip, lp, tmp_path / "pre", s, (0, 1, 2))
    img, lab = np.load(tmp_path / "pre" / "image.npy"), np.load(tmp_path / "pre" / "label.npy")
    assert img.shape == lab.shape == (12, 16, 20) == tuple(meta["shape"])
    assert img.dtype == np.float32 and lab.dtype == np.uint8
    saved = json.loads((tmp_path / "pre" / "meta.json").read_text())
    assert saved == json.loads(json.dumps(meta))
    assert saved["slices"]["class_2"] and set(saved["slices"]["foreground"]) <= set(range(12))
    assert set(saved["slices"]) == {"foreground", "class_1", "class_2"}
    assert saved["geometry"]["spacing"] == [4.0, pytest.approx(0.8), pytest.approx(0.8)]
    assert saved["crop_box"] == [[0, 6], [0, 32], [0, 40]] and "settings" not in saved
    assert saved["original_shape"] == [6, 32, 40] and saved["output_spacing"] == pytest.approx([2.0, 1.6, 1.6])


def test_preprocess_case_saves_crop_box(tmp_path):
    image, body = phantom_body((6, 64, 80))
    label = np.zeros(image.shape, np.uint8)
    label[:, 22:30, 30:40] = 1
    label[2:4, 24:27, 33:36] = 2
    case = write_case(tmp_path / "raw", "case_00005", image, label, spacing=(3.0, 1.0, 1.0))
    s = resolve_preprocessing({**CFG, "target_spacing": None}, None)
    meta = preprocess_case(case[0], case[1], case[2], tmp_path / "pre", s, (0, 1, 2))
    box = body_box(image)
    assert meta["crop_box"] == [[b.start, b.stop] for b in box]
    lab = np.load(tmp_path / "pre" / "label.npy")
    np.testing.assert_array_equal(lab, label[box])  # no resampling: the label is just cropped
    assert meta["shape"] == list(lab.shape) and meta["slices"]["class_2"] == [2, 3]


@pytest.mark.parametrize("shape", [(1, 16, 16), (4, 1, 16), (0, 16, 16)])
def test_preprocess_case_rejects_single_slice(tmp_path, shape):
    case = write_case(tmp_path / "raw", "case_00009", np.zeros(shape), np.zeros(shape))
    with pytest.raises(CaseDataError, match=r"case_00009.*imaging\.nii\.gz.*single slice"):
        preprocess_case(*case, tmp_path / "pre", resolve_preprocessing(CFG, None), (0, 1, 2))
    assert not (tmp_path / "pre").exists()


def test_preprocess_case_bad_label_writes_nothing(tmp_path):
    image, _ = phantom_body((4, 64, 80))
    label = np.zeros(image.shape, np.uint8)
    label[1, 30, 40] = 5
    case = write_case(tmp_path / "raw", "case_00006", image, label)
    with pytest.raises(CaseDataError, match=r"case_00006.*segmentation\.nii\.gz.*\[5\]"):
        preprocess_case(*case, tmp_path / "pre", resolve_preprocessing(CFG, None), (0, 1, 2))
    assert not (tmp_path / "pre").exists()


def test_padding_value_is_what_normalised_background_reads_as():
    from kidney_seg.preprocessing import normalize, padding_value

    rng = np.random.default_rng(0)
    scan = np.full((3, 30, 30), -1000.0, np.float32)  # air around a body
    scan[:, 5:25, 5:25] = rng.normal(60, 40, (3, 20, 20))
    settings = {"clip": [-75.76, 349.49], "normalization": "dataset", "mean": 80.0, "std": 50.0}
    dataset = normalize(scan, settings)
    assert all(padding_value(s) == pytest.approx((-75.76 - 80.0) / 50.0) for s in dataset)
    per_slice = normalize(scan, {**settings, "normalization": "zscore_slice"})
    for s in per_slice:
        assert padding_value(s) == s[0, 0]  # the air: the normalised lower clip bound of that slice
    with pytest.raises(ValueError, match="empty"):
        padding_value(np.zeros((0, 3)))


def test_label_on_plan_grid_is_nearest_and_keeps_the_image_slices():
    from kidney_seg.preprocessing import label_on_plan_grid, nearest_indices

    label = np.zeros((12, 10, 8), np.uint8)
    label[:, 2:6, 3:5] = 1
    label[5:8, 3:5, 3:4] = 2
    box = (slice(1, 11), slice(0, 10), slice(2, 8))
    out = label_on_plan_grid(label, box, (4, 5, 3))
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1, 2}
    cropped = label[box]
    expected = cropped[nearest_indices(10, 4)][:, nearest_indices(10, 5)][:, :, nearest_indices(6, 3)]
    np.testing.assert_array_equal(out, expected)
    same = label_on_plan_grid(label, tuple(slice(0, n) for n in label.shape), label.shape)
    np.testing.assert_array_equal(same, label)
