"""Tests of the synthetic CT phantom (kidney_seg.data.phantom)."""

from __future__ import annotations

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from kidney_seg.data.phantom import (
    PhantomCase,
    PhantomParams,
    generate_case,
    generate_phantom_case,
    write_case,
)
from kidney_seg.volume import internal_affine

SEED = 0
N_CASES = 12
DEFAULTS = PhantomParams.from_config({})


@pytest.fixture(scope="module")
def cases() -> list[PhantomCase]:
    """The first cases of one phantom set with default parameters."""
    return [generate_case(i, SEED, DEFAULTS) for i in range(N_CASES)]


def voxel_ml(case: PhantomCase) -> float:
    """Volume of one voxel in millilitres."""
    return float(np.prod(case.spacing)) / 1000.0


def assert_same(a: PhantomCase, b: PhantomCase) -> None:
    """Bitwise identical cases."""
    assert a.image.dtype == b.image.dtype and a.label.dtype == b.label.dtype
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.label, b.label)
    assert a.spacing == b.spacing
    assert np.array_equal(a.affine, b.affine)


def best_interval_dice(hu: np.ndarray, target: np.ndarray) -> float:
    """Best Dice any single HU window [lo, hi] reaches when used as the classifier."""
    offset = 1024
    pos = np.bincount(hu[target].astype(np.int64) + offset, minlength=4096)
    neg = np.bincount(hu[~target].astype(np.int64) + offset, minlength=4096)
    cp = np.concatenate([[0], np.cumsum(pos.reshape(-1, 4).sum(1))])  # 4 HU bins
    cn = np.concatenate([[0], np.cumsum(neg.reshape(-1, 4).sum(1))])
    tp = cp[None, :] - cp[:, None]
    fp = cn[None, :] - cn[:, None]
    dice = 2 * tp / np.maximum(2 * tp + fp + (cp[-1] - tp), 1)
    return float(dice.max())


# ----------------------------------------------------------------------------- determinism


def test_same_inputs_give_identical_cases(cases):
    assert_same(generate_case(3, SEED, DEFAULTS), cases[3])
    assert_same(generate_case(3, SEED, DEFAULTS), generate_case(3, SEED, DEFAULTS))


def test_different_index_or_seed_gives_different_case(cases):
    a, b = cases[3], cases[4]
    assert a.image.shape != b.image.shape or not np.array_equal(a.image, b.image)
    c = generate_case(3, SEED + 1, DEFAULTS)
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)


def test_case_does_not_depend_on_call_order_or_global_state(cases):
    np.random.seed(12345)  # the legacy global generator must not matter
    for i in (5, 1):
        generate_case(i + 20, SEED, DEFAULTS)
    assert_same(generate_case(2, SEED, DEFAULTS), cases[2])
    assert_same(generate_case(0, SEED, DEFAULTS), cases[0])


# ----------------------------------------------------------------------------- layout and header


def test_shapes_dtypes_and_label_values(cases):
    for case in cases:
        assert case.image.ndim == 3 and case.image.shape == case.label.shape
        assert case.image.dtype == np.int16
        assert case.label.dtype == np.uint8
        assert set(np.unique(case.label).tolist()) <= {0, 1, 2}
        assert case.image.min() >= -1024 and case.image.max() <= 3071
        assert case.image.min() < -900  # air around the body
        assert np.array_equal(case.affine, internal_affine(case.spacing))
        assert nib.aff2axcodes(case.affine) == ("I", "P", "L")


def test_phantom_affine_matches_kits19_case_00000():
    expected = np.array([[0, 0, -0.92, 0], [0, -0.92, 0, 0], [-0.5, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    assert np.allclose(internal_affine((0.5, 0.92, 0.92)), expected)
    assert nib.aff2axcodes(expected) == ("I", "P", "L")


def test_spacing_and_extent_follow_the_ranges(cases):
    p = DEFAULTS
    for case in cases:
        s0, s1, s2 = case.spacing
        assert p.slice_spacing_mm[0] <= s0 <= p.slice_spacing_mm[1]
        assert p.inplane_spacing_mm[0] <= s1 <= p.inplane_spacing_mm[1]
        assert s1 == s2
        nz, ny, nx = case.image.shape
        assert p.z_extent_mm[0] - s0 <= nz * s0 <= p.z_extent_mm[1] + s0
        assert p.field_of_view_mm[0] - s2 <= nx * s2 <= p.field_of_view_mm[1] + s2
        assert 0.9 * nx <= ny <= nx + 1  # the AP field of view is 92-100 % of the LR one
    assert len({c.image.shape[1:] for c in cases}) > N_CASES // 2  # the in-plane size varies
    assert any(c.image.shape[1] != c.image.shape[2] for c in cases)
    assert len({c.spacing for c in cases}) == N_CASES


def test_fixed_ranges_are_honoured():
    p = replace(DEFAULTS, slice_spacing_mm=(2.0, 2.0), inplane_spacing_mm=(0.8, 0.8), z_extent_mm=(100, 100))
    case = generate_case(0, SEED, p)
    assert case.spacing == (2.0, 0.8, 0.8)
    assert case.image.shape[0] == 50


def test_anatomy_is_built_in_mm_independent_of_spacing():
    fine = replace(DEFAULTS, slice_spacing_mm=(2.5, 2.5), inplane_spacing_mm=(0.7, 0.7))
    coarse = replace(DEFAULTS, slice_spacing_mm=(5.0, 5.0), inplane_spacing_mm=(0.95, 0.95))
    for index in (0, 4):
        a, b = generate_case(index, SEED, fine), generate_case(index, SEED, coarse)
        kid_a, kid_b = (a.label == 1).sum() * voxel_ml(a), (b.label == 1).sum() * voxel_ml(b)
        assert kid_b == pytest.approx(kid_a, rel=0.05)
        tum_a, tum_b = (a.label == 2).sum() * voxel_ml(a), (b.label == 2).sum() * voxel_ml(b)
        assert tum_b == pytest.approx(tum_a, rel=0.2, abs=0.1)


# ----------------------------------------------------------------------------- parameters


def test_params_have_no_defaults_of_their_own():
    """The schema is the only source of the generator's defaults."""
    from kidney_seg.config import load_schema

    schema = load_schema()["properties"]["dataset"]["properties"]["phantom"]["properties"]
    with pytest.raises(TypeError):
        PhantomParams()  # every field is required
    for name, value in DEFAULTS.__dict__.items():
        default = schema[name]["default"]
        assert value == (tuple(default) if isinstance(default, list) else default), name


def test_params_from_config():
    assert PhantomParams.from_config(None) == DEFAULTS
    assert PhantomParams.from_config({}) == DEFAULTS
    p = PhantomParams.from_config({"n_cases": 40, "field_of_view_mm": [200, 250], "noise_hu": 5})
    assert p.field_of_view_mm == (200.0, 250.0)
    assert p.noise_hu == 5.0
    assert p.z_extent_mm == DEFAULTS.z_extent_mm


@pytest.mark.parametrize(
    "cfg",
    [
        {"fov": [200, 250]},
        {"slice_spacing_mm": [5.0, 2.5]},
        {"slice_spacing_mm": [0.0, 2.5]},
        {"z_extent_mm": [20, 30]},
        {"inplane_spacing_mm": [0.7]},
        {"inplane_spacing_mm": "wide"},
        {"inplane_spacing_mm": "12"},
        {"p_tiny_tumor": None},
        {"p_no_tumor": 1.5},
        {"p_no_tumor": 0.6, "p_tiny_tumor": 0.6},
        {"noise_hu": -1},
        {"noise_hu": "loud"},
    ],
)
def test_bad_config_is_rejected(cfg):
    with pytest.raises(ValueError):
        PhantomParams.from_config(cfg)


def test_tumour_probabilities_are_honoured():
    none = replace(DEFAULTS, p_no_tumor=1.0, p_tiny_tumor=0.0)
    tiny = replace(DEFAULTS, p_no_tumor=0.0, p_tiny_tumor=1.0)
    for i in range(3):
        assert not (generate_case(i, SEED, none).label == 2).any()
        case = generate_case(i, SEED, tiny)
        ml = (case.label == 2).sum() * voxel_ml(case)
        assert 0 < ml < 2.5  # radius 4-8 mm


def test_noise_parameter():
    quiet = generate_case(1, SEED, replace(DEFAULTS, noise_hu=0.0))
    noisy = generate_case(1, SEED, replace(DEFAULTS, noise_hu=30.0))
    assert np.array_equal(quiet.label, noisy.label)
    tissue = (quiet.image > -300) & (quiet.image < 300)  # away from the clipping at -1024
    assert np.std(noisy.image[tissue].astype(float) - quiet.image[tissue]) == pytest.approx(30.0, rel=0.05)


# ----------------------------------------------------------------------------- files


def test_write_case_round_trip(tmp_path, cases):
    case = cases[1]
    write_case(tmp_path / "case_00001", case)
    assert sorted(p.name for p in (tmp_path / "case_00001").iterdir()) == ["imaging.nii.gz", "segmentation.nii.gz"]
    img = nib.load(str(tmp_path / "case_00001" / "imaging.nii.gz"))
    seg = nib.load(str(tmp_path / "case_00001" / "segmentation.nii.gz"))
    for f in (img, seg):
        assert nib.aff2axcodes(f.affine) == ("I", "P", "L")
        assert np.allclose(f.header.get_zooms(), case.spacing, atol=1e-5)
        assert np.allclose(f.affine, case.affine, atol=1e-5)
        assert f.shape == case.image.shape
        assert int(f.header["sform_code"]) == 1 and int(f.header["qform_code"]) == 1
    assert img.get_data_dtype() == np.int16
    assert seg.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(img.dataobj), case.image)
    assert np.array_equal(np.asanyarray(seg.dataobj), case.label)


def test_generate_phantom_case_writes_the_generated_case(tmp_path, cases):
    generate_phantom_case(tmp_path / "c", 2, SEED, {"n_cases": 5})
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "c" / "imaging.nii.gz")).dataobj), cases[2].image)
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "c" / "segmentation.nii.gz")).dataobj), cases[2].label)


# ----------------------------------------------------------------------------- anatomy


def test_two_kidneys_one_on_each_side(cases):
    for case in cases:
        comp, n = ndimage.label(case.label == 1)
        sizes = np.bincount(comp.ravel())[1:] * voxel_ml(case)
        largest = np.argsort(sizes)[::-1][:2]
        assert n >= 2 and sizes[largest[1]] > 3.0, sizes
        cols = [np.nonzero(comp == k + 1)[2].mean() for k in largest]
        bone_col = np.nonzero(case.image > 400)[2].mean()  # the spine, mid-body
        assert min(cols) < bone_col < max(cols)
        assert not (case.label[[0, -1]] == 1).any()  # both kidneys lie inside the slab


def test_spine_is_posterior_and_central(cases):
    for case in cases:
        body = case.image > -500
        rows, cols = np.nonzero(body.any(axis=0))
        bone = np.nonzero((case.image > 400).any(axis=0))
        assert bone[0].mean() > rows.mean()  # rows run towards posterior
        assert abs(bone[1].mean() - cols.mean()) < 0.1 * case.image.shape[2]


def test_tumours_touch_kidney_tissue(cases):
    n_tumours = 0
    for case in cases:
        comp, n = ndimage.label(case.label == 2)
        for k, box in enumerate(ndimage.find_objects(comp), start=1):
            box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # room for the dilation
            grown = ndimage.binary_dilation(comp[box] == k, structure=np.ones((3, 3, 3), bool))
            assert (case.label[box][grown] == 1).any()
            n_tumours += 1
    assert n_tumours >= N_CASES // 2


def test_tumour_burden_varies(cases):
    ml = np.array([(c.label == 2).sum() * voxel_ml(c) for c in cases])
    assert (ml == 0).any()  # some cases have no tumour
    assert ((ml > 0) & (ml < 2.5)).any()  # some only a tiny one
    assert (ml > 10.0).any()  # and some a large one


def test_hu_ranges_per_class(cases):
    hu = {k: np.concatenate([c.image[c.label == k] for c in cases]).astype(float) for k in (1, 2)}
    assert 120 < np.median(hu[1]) < 200  # enhancing cortex dominates the kidney
    assert 20 < np.median(hu[2]) < 90
    bone = np.concatenate([c.image[c.image > 400] for c in cases])
    assert bone.size > 0 and np.percentile(bone, 50) > 500


def test_no_single_threshold_separates_the_classes(cases):
    n_tumour_cases = 0
    for case in cases:
        inside = case.image > -500
        other = inside & (case.label == 0)
        hu, lab = case.image[inside], case.label[inside]
        kidney = case.image[case.label == 1]
        k_lo, k_hi = np.percentile(kidney, [5, 95])
        # many non-kidney voxels (aorta, bone, IVC, bowel contrast) fall in the kidney's HU range
        assert ((case.image[other] >= k_lo) & (case.image[other] <= k_hi)).sum() > 0.2 * kidney.size
        assert best_interval_dice(hu, lab > 0) < 0.9
        if (lab == 2).any():
            n_tumour_cases += 1
            t_lo, t_hi = np.percentile(case.image[case.label == 2], [5, 95])
            soft = case.image[other & (case.image > -50) & (case.image < 150)]
            s_lo, s_hi = np.percentile(soft, [5, 95])
            assert max(t_lo, s_lo) < min(t_hi, s_hi)  # the tumour's HU interval overlaps soft tissue
            assert best_interval_dice(hu, lab == 2) < 0.6
    assert n_tumour_cases > 0
