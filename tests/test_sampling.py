import json
from pathlib import Path

import numpy as np
import pytest

from kidney_seg.sampling import (
    batch_stream,
    choose_slices,
    crop_or_pad,
    load_case,
    make_batch,
    make_transform,
    slice_table,
    validation_set,
)


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
    transform = make_transform((32, 32), (0.6, 1.25), 0.1, 1.0)
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
    transform = make_transform((32, 32), (0.6, 1.25), 0.1, 1.0)
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


@pytest.mark.parametrize("start", [0, 4])
def test_worker_stream_matches_in_process_stream(cache, start):
    import multiprocessing as mp

    from kidney_seg.sampling import BatchLoader, StreamSpec

    spec = StreamSpec(tuple(str(c) for c in case_dirs(cache)), (32, 32), (0.6, 1.25), 0.1, 1.0, 3, 2, seed=2, n_tumor=1)
    streams = {}
    for workers in (0, 1, 2):
        with BatchLoader(spec, start=start, num_workers=workers) as loader:
            it = loader.batches()
            streams[workers] = [next(it) for _ in range(6)]
        assert not mp.active_children(), "worker processes outlived the loader"
    transform = make_transform((32, 32), (0.6, 1.25), 0.1, 1.0)
    expected = make_batch(start, cache, slice_table(cache), transform, 3, 2, seed=2, n_tumor=1)
    np.testing.assert_array_equal(streams[0][0][0], expected[0])
    for workers in (1, 2):
        for (x0, y0), (x, y) in zip(streams[0], streams[workers]):
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
    from kidney_seg.sampling import augment

    img = _slice_with_background(-3.0)
    transform = make_transform((32, 32), (1.6, 1.6), p_scale, 0.0)  # patch larger than the slice; zoom out
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
