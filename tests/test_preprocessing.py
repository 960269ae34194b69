import json

import numpy as np
import pytest

from kidney_seg.preprocessing import (clip_hu, preprocess_case, resample_image, resample_label, resampled_shape,
                                      slice_index, zscore_slices)
from tests.conftest import kits_affine, write_nifti


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


def test_resampled_shape():
    assert resampled_shape((10, 100, 80), (5.0, 0.8, 0.8), (3.0, 1.6, 1.6)) == (17, 50, 40)


def test_resample_image_shape_and_constant():
    image = np.full((5, 20, 30), 3.0, np.float32)
    out = resample_image(image, (8, 10, 15))
    assert out.shape == (8, 10, 15) and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.0, atol=1e-5)


def test_resample_label_keeps_values_and_volume():
    label = np.zeros((6, 40, 40), np.uint8)
    label[:, 10:30, 10:30] = 1
    label[:, 16:26, 16:26] = 2
    out = resample_label(label, (6, 20, 20), 3)
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out > 0).sum() * 4 == pytest.approx((label > 0).sum(), rel=0.1)
    assert (out == 2).sum() * 4 == pytest.approx((label == 2).sum(), rel=0.15)


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
    meta = preprocess_case("case_00004", ip, lp, tmp_path / "pre", (2.0, 1.6, 1.6), (-75.76, 349.49), "zscore_slice", (0, 1, 2))
    img, lab = np.load(tmp_path / "pre" / "image.npy"), np.load(tmp_path / "pre" / "label.npy")
    assert img.shape == lab.shape == (12, 16, 20) == tuple(meta["shape"])
    assert img.dtype == np.float32 and lab.dtype == np.uint8
    saved = json.loads((tmp_path / "pre" / "meta.json").read_text())
    assert saved["slices"]["class_2"] and set(saved["slices"]["foreground"]) <= set(range(12))
    assert saved["geometry"]["spacing"] == [4.0, pytest.approx(0.8), pytest.approx(0.8)]
