import json
from pathlib import Path

import numpy as np
import pytest

from kidney_seg.augmentation import Augmentation, augment, make_augmenter
from kidney_seg.config import with_defaults
from kidney_seg.sampling import (
    FOREGROUND_DRAW,
    RANDOM_DRAW,
    TUMOR_DRAW,
    batch_stream,
    choose_slices,
    crop_or_pad,
    draw_kinds,
    load_case,
    make_batch,
    slice_table,
    validation_set,
)
from kidney_seg.vocabulary import TUMOR
from tests.conftest import REPO


@pytest.fixture
def cache(tmp_path):
    dirs = []
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(6, 40, 50), (4, 30, 30)]):
        d = tmp_path / f"case_{i:05d}"
        d.mkdir()
        image = rng.normal(size=shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[2, 10:20, 10:20] = 1
        label[2, 12:15, 12:15] = 2
        np.save(d / "image.npy", image)
        np.save(d / "label.npy", label)
        (d / "meta.json").write_text(json.dumps({"case_id": d.name, "slices": {"foreground": [2], "class_2": [2]}}))
        dirs.append(d)
    return [load_case(d) for d in dirs]


def test_choose_slices_takes_foreground_first(cache):
    tables = slice_table(cache)
    every, fg, tumor = tables
    assert len(every) == 10 and fg.tolist() == [[0, 2], [1, 2]] and tumor.tolist() == [[0, 2], [1, 2]]
    picks = choose_slices(np.random.default_rng(0), tables, 7, 5)
    assert len(picks) == 7 and all(tuple(p) in {(0, 2), (1, 2)} for p in picks[:5])


def test_tumour_oversampling():
    every = np.array([(0, s) for s in range(10)])
    fg, tumor = np.array([(0, 3), (0, 4), (0, 5)]), np.array([(0, 5)])
    picks = choose_slices(np.random.default_rng(1), (every, fg, tumor), 7, 5, n_tumor=2)
    assert picks[:2].tolist() == [[0, 5], [0, 5]]
    assert all(p in fg.tolist() for p in picks[2:5].tolist())
    no_tumour = choose_slices(np.random.default_rng(1), (every, fg, tumor[:0]), 7, 5, n_tumor=2)
    assert all(p in fg.tolist() for p in no_tumour[:5].tolist())


def test_batches_are_reproducible_and_shaped(cache):
    transform = make_augmenter((32, 32), (0.6, 1.25), 0.1, 1.0)
    tables = slice_table(cache)
    x1, y1 = make_batch(5, cache, tables, transform, 7, 5, seed=1)
    x2, y2 = make_batch(5, cache, tables, transform, 7, 5, seed=1)
    x3, _ = make_batch(6, cache, tables, transform, 7, 5, seed=1)
    assert x1.shape == (7, 32, 32, 1) and y1.shape == (7, 32, 32) and x1.dtype == np.float32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert set(np.unique(y1)) <= {0, 1, 2}


def test_stream_resumes_at_the_same_batch(cache):
    transform = make_augmenter((32, 32), (0.6, 1.25), 0.1, 1.0)
    full = batch_stream(cache, transform, 3, 2, seed=2)
    batches = [next(full) for _ in range(4)]
    resumed = batch_stream(cache, transform, 3, 2, seed=2, start=2)
    np.testing.assert_array_equal(next(resumed)[0], batches[2][0])


def test_crop_or_pad():
    a = np.arange(20).reshape(4, 5)
    out = crop_or_pad(a, (6, 3), center=(2, 4), pad_value=-1)
    assert out.shape == (6, 3)
    assert (out[0] == -1).all() and (out[-1] == -1).all()
    np.testing.assert_array_equal(out[1:5], a[:, 2:5])


def test_validation_set_is_fixed(cache):
    x, y = validation_set(cache, 5, (32, 32), seed=0)
    x2, _ = validation_set(cache, 5, (32, 32), seed=0)
    assert x.shape == (5, 32, 32, 1) and y.shape == (5, 32, 32)
    np.testing.assert_array_equal(x, x2)
    assert (y > 0).any()


def nnunet_training(**over) -> dict:
    """The training section with presets/nnunet-augmentation.yaml merged in (and ``over``)."""
    import yaml

    from kidney_seg.config import deep_merge

    preset = yaml.safe_load((REPO / "presets" / "nnunet-augmentation.yaml").read_text())["training"]
    return with_defaults("training", deep_merge(preset, over))


#: the paper's settings with one worker; nnU-Net's, centred crops, with two (the batches of their streams interleave)
@pytest.mark.parametrize("start, nnunet, n_workers", [(0, False, 1), (4, True, 2)])
def test_worker_stream_matches_in_process_stream(cache, start, nnunet, n_workers):
    import multiprocessing as mp

    from kidney_seg.sampling import BatchLoader, StreamSpec

    dirs = tuple(str(c) for c in case_dirs(cache))
    if nnunet:  # noise and blur draw from Python's random, which each spawned worker seeds differently
        cfg = nnunet_training(augmentation={"noise": {"p": 1.0}, "blur": {"p": 1.0}})
        extra = {"crop": "foreground", "augmentation": Augmentation.from_config(cfg["augmentation"])}
        settings = ((32, 32), tuple(cfg["scale_range"]), cfg["p_scale"], cfg["p_mirror"])
    else:
        extra, settings = {}, ((32, 32), (0.6, 1.25), 0.1, 1.0)
    spec = StreamSpec(dirs, *settings, 3, 2, seed=2, n_tumor=1, **extra)
    streams = {}
    for workers in (0, n_workers):
        with BatchLoader(spec, start=start, num_workers=workers) as loader:
            it = loader.batches()
            streams[workers] = [next(it) for _ in range(6)]
        assert not mp.active_children(), "worker processes outlived the loader"
    augmenter = make_augmenter(*settings, extra.get("augmentation"))
    expected = make_batch(start, cache, slice_table(cache), augmenter, 3, 2, 2, 1, extra.get("crop", "paper"))
    np.testing.assert_array_equal(streams[0][0][0], expected[0])
    for (x0, y0), (x, y) in zip(streams[0], streams[n_workers], strict=True):
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, y0)
    assert not np.array_equal(streams[0][0][0], streams[0][1][0])


def test_closed_loader_ends_its_stream(cache):
    import multiprocessing as mp

    from kidney_seg.sampling import BatchLoader, StreamSpec

    spec = StreamSpec(tuple(str(c) for c in case_dirs(cache)), (32, 32), (0.6, 1.25), 0.1, 1.0, 3, 2, seed=2)
    loader = BatchLoader(spec, num_workers=1)
    with pytest.raises(RuntimeError, match="boom"):
        with loader:
            next(loader.batches())
            raise RuntimeError("boom")
    assert loader.pool is None and not mp.active_children()
    assert list(loader.batches()) == []


def case_dirs(cases):
    """The case folders of the fixture's loaded cases (their memory maps know their files)."""
    return [Path(c.image.filename).parent for c in cases]


def _slice_with_background(shift: float) -> np.ndarray:
    """A normalised-looking 20x20 slice whose background (its minimum) reads ``shift - 1``."""
    rng = np.random.default_rng(4)
    img = np.full((20, 20), shift - 1.0, np.float32)
    img[5:15, 5:15] = shift + rng.random((10, 10)).astype(np.float32)
    return img


@pytest.mark.parametrize("p_scale", [0.0, 1.0])  # random-crop path and scaling path of batchgenerators
def test_training_crops_pad_with_the_padding_value(p_scale):
    from kidney_seg.preprocessing import padding_value

    img = _slice_with_background(-3.0)
    transform = make_augmenter((32, 32), (1.6, 1.6), p_scale, 0.0)  # patch larger than the slice; zoom out
    out, lab = augment(transform, img, (img > -3.0).astype(np.uint8), seed=1)
    assert out.shape == (32, 32)
    border = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
    np.testing.assert_allclose(border, padding_value(img), atol=1e-5)
    assert lab[0].max() == 0


def test_validation_crops_pad_with_the_padding_value(tmp_path):
    from kidney_seg.preprocessing import padding_value

    d = tmp_path / "case_00000"
    d.mkdir()
    image = np.stack([_slice_with_background(s) for s in (2.0, -4.0)])
    label = (image > image.min(axis=(1, 2), keepdims=True)).astype(np.uint8)
    np.save(d / "image.npy", image)
    np.save(d / "label.npy", label)
    (d / "meta.json").write_text(json.dumps({"case_id": d.name, "slices": {"foreground": [0, 1], "class_2": []}}))
    x, _ = validation_set([load_case(d)], 2, (32, 32), seed=0)
    for crop in x[..., 0]:
        source = image[0] if crop.max() > 1.0 else image[1]
        assert crop[0, 0] == padding_value(source) and crop[-1, -1] == padding_value(source)


# ------------------------------------------------------------------ the default stream, bitwise

#: SHA-256 of batches 0-11 (images then labels, as bytes) of the fixture's cases with seed 3, taken
#: from the code before training.crop and training.augmentation existed: the defaults reproduce it.
DEFAULT_DIGESTS = {
    "defaults": "f47d4f9e95b2a728911102eb5e79be729c379e7c982c97e9b9277a952732b9e5",
    "patch 32, tumour 1": "43c3fa58190217c0024e80a822082a1fa88cd047361acd73d652c667e9fa770b",
}


@pytest.mark.parametrize(
    "name, over", [("defaults", {}), ("patch 32, tumour 1", {"patch_size": [32, 32], "tumor_per_batch": 1})]
)
def test_default_settings_give_the_batches_they_gave_before(cache, name, over):
    import hashlib

    from kidney_seg.training import stream_spec

    spec = stream_spec([str(d) for d in case_dirs(cache)], with_defaults("training", over), seed=3)
    assert spec.crop == "paper"
    augmenter, tables, digest = spec.augmenter(), slice_table(cache), hashlib.sha256()
    for k in range(12):
        x, y = make_batch(k, cache, tables, augmenter, spec.batch_size, spec.n_fg, spec.seed, spec.n_tumor, spec.crop)
        digest.update(x.tobytes())
        digest.update(y.tobytes())
    assert digest.hexdigest() == DEFAULT_DIGESTS[name]


# ------------------------------------------------------------------ foreground crops


@pytest.fixture
def sparse(tmp_path):
    """Two 96 x 96 slices with small foreground near an edge (a 5 x 5 tumour in the first): random crops miss it."""
    d = tmp_path / "case_00000"
    d.mkdir()
    image = np.random.default_rng(1).normal(size=(3, 96, 96)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[0, 70:82, 3:15] = 1
    label[0, 74:79, 6:11] = TUMOR
    label[1, 4:12, 80:92] = 1
    np.save(d / "image.npy", image)
    np.save(d / "label.npy", label)
    (d / "meta.json").write_text(json.dumps({"case_id": d.name, "slices": {"foreground": [0, 1], "class_2": [0]}}))
    return [load_case(d)]


def kept(cases, crop: str, augmenter, batches: int = 30) -> dict[int, list[bool]]:
    """Per kind of draw: whether each crop holds its class (tumour draws: tumour; the others: foreground)."""
    tables, out = slice_table(cases), {TUMOR_DRAW: [], FOREGROUND_DRAW: [], RANDOM_DRAW: []}
    kinds = draw_kinds(tables, 7, 5, 2)
    for k in range(batches):
        _, y = make_batch(k, cases, tables, augmenter, 7, 5, seed=0, n_tumor=2, crop=crop)
        for kind, lab in zip(kinds, y):
            out[int(kind)].append(bool((lab == TUMOR).any() if kind == TUMOR_DRAW else (lab > 0).any()))
    return out


@pytest.mark.parametrize("nnunet", [False, True])
def test_foreground_crops_hold_the_class_they_were_drawn_for(sparse, nnunet):
    if nnunet:  # every slice rotated and scaled, label resampled linearly
        cfg = nnunet_training(p_scale=1.0, augmentation={"rotation": {"p": 1.0}})
        aug = Augmentation.from_config(cfg["augmentation"])
        augmenter = make_augmenter((32, 32), cfg["scale_range"], cfg["p_scale"], cfg["p_mirror"], aug)
    else:
        augmenter = make_augmenter((32, 32), (0.6, 1.25), 0.1, 1.0)
    fg = kept(sparse, "foreground", augmenter)
    assert all(fg[TUMOR_DRAW]) and all(fg[FOREGROUND_DRAW])
    paper = kept(sparse, "paper", augmenter)
    assert not all(paper[TUMOR_DRAW]) and not all(paper[FOREGROUND_DRAW])  # random crops lose it


def test_random_draws_keep_random_crops(sparse):
    augmenter, tables = make_augmenter((32, 32), (0.6, 1.25), 0.1, 1.0), slice_table(sparse)
    random_draws = draw_kinds(tables, 7, 5, 2) == RANDOM_DRAW
    for k in range(5):
        x_fg, y_fg = make_batch(k, sparse, tables, augmenter, 7, 5, seed=0, n_tumor=2, crop="foreground")
        x, y = make_batch(k, sparse, tables, augmenter, 7, 5, seed=0, n_tumor=2, crop="paper")
        np.testing.assert_array_equal(x_fg[random_draws], x[random_draws])
        np.testing.assert_array_equal(y_fg[random_draws], y[random_draws])
        assert not np.array_equal(x_fg[~random_draws], x[~random_draws])


def test_centred_crops_put_the_voxel_at_the_centre_and_pad_with_the_padding_value():
    from kidney_seg.preprocessing import padding_value
    from kidney_seg.sampling import centre_voxel, sample_slice

    img = _slice_with_background(-3.0)  # 20 x 20, foreground rows and columns 5-14
    label = (img > -3.0).astype(np.uint8)
    augmenter = make_augmenter((32, 32), (0.6, 1.25), 0.0, 0.0)  # no scaling, no mirroring: a plain crop
    for seed in range(5):
        out, lab = sample_slice(augmenter, img, label, seed, kind=FOREGROUND_DRAW, crop="foreground")
        r, c = centre_voxel(np.random.default_rng(seed), label, FOREGROUND_DRAW) + 32 - 16
        padded_img = np.pad(img, 32, constant_values=padding_value(img))
        np.testing.assert_allclose(out, padded_img[r : r + 32, c : c + 32], atol=1e-6)
        np.testing.assert_array_equal(lab, np.pad(label, 32)[r : r + 32, c : c + 32])
        assert lab[16, 16] == 1 and (out[0] == np.float32(padding_value(img))).all()  # past the slice: padding


def test_unknown_crop_is_refused(cache):
    from kidney_seg.sampling import StreamSpec

    with pytest.raises(ValueError, match="unknown crop"):
        StreamSpec(("x",), (32, 32), (0.6, 1.25), 0.1, 1.0, 3, 2, seed=2, crop="centre")
    with pytest.raises(ValueError, match="unknown crop"):
        make_batch(0, cache, slice_table(cache), make_augmenter((32, 32), (1, 1), 0, 0), 3, 2, 0, crop="centre")
