"""The real-geometry evaluation set (benchmarks/real_geometry.py): its CT generator, case files and run config.

Most checks use a small synthetic label; the ones marked with the ``kits_labels_dir``
fixture read real KiTS19 label files from ../shared/data and skip where it is absent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from benchmarks import real_geometry as rg
from kidney_seg.data.local import read_manifest
from kidney_seg.vocabulary import KITS19_LABELS
from kidney_seg.volume import read_image, read_label
from tests.conftest import REPO, kits_affine, write_nifti

SPACING = (3.0, 2.5, 2.5)


def ellipsoid(shape: tuple[int, int, int], centre_mm, radii_mm, spacing=SPACING) -> np.ndarray:
    """A boolean ellipsoid on a grid of ``spacing`` (mm)."""
    z, y, x = (np.arange(n) * s for n, s in zip(shape, spacing))
    return (
        ((z[:, None, None] - centre_mm[0]) / radii_mm[0]) ** 2
        + ((y[None, :, None] - centre_mm[1]) / radii_mm[1]) ** 2
        + ((x[None, None, :] - centre_mm[2]) / radii_mm[2]) ** 2
    ) < 1


def small_label() -> np.ndarray:
    """Two kidneys either side of the midline (internal layout), a 14 mm tumour in the left one."""
    shape = (20, 96, 96)
    label = np.zeros(shape, np.uint8)
    for x in (60.0, 180.0):
        label[ellipsoid(shape, (30, 150, x), (27, 22, 18))] = 1
    label[ellipsoid(shape, (30, 150, 185), (14, 14, 14))] = 2
    return label


def write_label(path: Path, label: np.ndarray, spacing=SPACING, qcode: int = 0, scode: int = 2) -> Path:
    """The label as a KiTS file (axis codes I, P, L; KiTS19's qform/sform codes by default)."""
    return write_nifti(path, label, kits_affine(spacing), qcode=qcode, scode=scode)


def test_same_seed_gives_the_same_ct_another_seed_another():
    """A case is a function of (label, spacing, seed): bit for bit."""
    label = small_label()
    a, pa = rg.synthesize_ct(label, SPACING, rg.case_rng("case_00007", 13))
    b, pb = rg.synthesize_ct(label, SPACING, rg.case_rng("case_00007", 13))
    c, _ = rg.synthesize_ct(label, SPACING, rg.case_rng("case_00008", 13))
    assert a.dtype == np.int16 and a.shape == label.shape
    assert np.array_equal(a, b) and pa == pb
    assert not np.array_equal(a, c)


def test_labels_are_left_unchanged():
    """The generator only reads the label array (a read-only one works and keeps its values)."""
    label = small_label()
    frozen = label.copy()
    frozen.flags.writeable = False
    rg.synthesize_ct(frozen, SPACING, rg.case_rng("case_00001", 13))
    assert np.array_equal(frozen, label)


def test_tumour_mean_is_kidney_mean_plus_the_drawn_contrast():
    """On the clean image the tumour mean is exactly the kidney mean + the contrast; noise and blur keep it close."""
    label = small_label()
    for contrast in (-90.0, -5.0, 40.0):
        hu = dataclasses.replace(rg.draw_intensities(np.random.default_rng(3)), tumour_contrast=contrast)
        canvas, _, _, measured = rg.paint_anatomy(label, SPACING, np.random.default_rng(5), hu)
        kidney, tumour = canvas.img[label == 1].mean(), canvas.img[label == 2].mean()
        assert tumour - kidney == pytest.approx(contrast, abs=0.05)
        assert measured["tumour_contrast_applied"] == pytest.approx(contrast, abs=0.05)
    ct, _ = rg.synthesize_ct(label, SPACING, np.random.default_rng(5), hu)  # contrast 40: blur and noise added
    inner_k, inner_t = (ndimage.binary_erosion(label == v) for v in (1, 2))
    assert ct[inner_t].mean() - ct[inner_k].mean() == pytest.approx(40.0, abs=25)


def test_kidney_has_a_brighter_cortex_and_organs_have_kidney_like_hu():
    """Corticomedullary phase: the outer shell of the kidney is cortex; liver and spleen sit near kidney HU."""
    label = small_label()
    hu = dataclasses.replace(rg.draw_intensities(np.random.default_rng(0)), cortex=250.0, medulla=80.0)
    canvas, _, _, measured = rg.paint_anatomy(label, SPACING, np.random.default_rng(1), hu)
    kidney = label == 1
    shell = kidney & ~ndimage.binary_erosion(label > 0)
    core = kidney & ndimage.binary_erosion(label > 0, iterations=3)
    assert canvas.img[shell].mean() > canvas.img[core].mean() + 40
    organ = canvas.img[canvas.tissue == rg.ORGAN]
    assert organ.size > 0 and np.all(canvas.label[canvas.tissue == rg.ORGAN] == 0)
    assert abs(np.median(organ) - measured["kidney_mean_hu"]) < 120


def test_body_holds_every_label_voxel():
    """Kidneys are never painted outside the body (they lie in the abdominal cavity)."""
    label = small_label()
    for seed in range(3):
        canvas, *_ = rg.paint_anatomy(label, SPACING, np.random.default_rng(seed))
        assert np.all(canvas.tissue[label > 0] != rg.AIR)


def test_intensity_distributions_differ_from_the_phantoms():
    """The draws reach outside kidney_seg/data/phantom.py's ranges (cortex 150-200, tumour 20-90, noise 12)."""
    rng = np.random.default_rng(0)
    draws = pd.DataFrame([vars(rg.draw_intensities(rng)) for _ in range(600)])
    assert draws["cortex"].min() < 140 and draws["cortex"].max() > 220
    assert draws["tumour_contrast"].between(-140, 70).all()
    iso = draws["tumour_contrast"].abs() < 20
    assert 0.15 < iso.mean() < 0.4  # a share of tumours overlaps the kidney
    assert (draws["tumour_contrast"] < -100).any() and (draws["tumour_contrast"] > 50).any()
    assert draws["noise"].min() < 10 and draws["noise"].max() > 25
    assert set(draws["phase"]) == set(rg.PHASES)


def test_written_case_keeps_the_label_header(tmp_path):
    """Image: int16 on the label's affine with its qform/sform codes; the label file is copied byte for byte."""
    src = write_label(tmp_path / "src" / "segmentation.nii.gz", small_label())
    record = rg.write_case(src, tmp_path / "case_00004", "case_00004", seed=13)
    img, ref = nib.load(str(tmp_path / "case_00004" / "imaging.nii.gz")), nib.load(str(src))
    assert img.get_data_dtype() == np.int16 and img.shape == ref.shape
    assert np.allclose(img.affine, ref.affine)
    assert [int(img.header[k]) for k in ("qform_code", "sform_code")] == [0, 2]
    assert (tmp_path / "case_00004" / "segmentation.nii.gz").read_bytes() == src.read_bytes()
    assert record["axcodes"] == "IPL" and record["seed"] == 13


def test_ras_variant_reads_back_to_the_same_voxels(tmp_path):
    """Re-saved in RAS (slices last), image and label read to the same internal arrays and spacing."""
    src = write_label(tmp_path / "src" / "segmentation.nii.gz", small_label())
    rg.write_case(src, tmp_path / "kits" / "case_00002", "case_00002", seed=13)
    record = rg.write_case(src, tmp_path / "ras" / "case_00002", "case_00002", seed=13, orientation="RAS")
    assert record["axcodes"] == "RAS" and record["shape"] == [96, 96, 20]
    (a, ga), (b, gb) = (read_image(tmp_path / d / "case_00002" / "imaging.nii.gz") for d in ("kits", "ras"))
    assert np.array_equal(a, b) and np.allclose(ga.spacing, gb.spacing)
    la, lb = (
        read_label(tmp_path / d / "case_00002" / "segmentation.nii.gz", None, KITS19_LABELS)[0] for d in ("kits", "ras")
    )
    assert np.array_equal(la, lb) and np.array_equal(la, small_label())


def test_dataset_is_reused_and_its_manifest_reads(tmp_path):
    """A second build generates nothing; the manifest is a valid ``dataset.source: local`` manifest."""
    src = write_label(tmp_path / "labels" / "case_00003" / "segmentation.nii.gz", small_label())
    cases = [(0, "case_00003", src)]
    first = rg.build_dataset(cases, tmp_path / "data", seed=13)
    again = rg.build_dataset(cases, tmp_path / "data", seed=13)
    other = rg.build_dataset(cases, tmp_path / "data", seed=14)
    assert [r["cached"] for r in (*first, *again, *other)] == [False, True, False]
    manifest = rg.write_manifest(tmp_path / "data", ["case_00003"])
    assert [e[0] for e in read_manifest(manifest)] == ["case_00003"]
    without = rg.write_manifest(tmp_path / "data", ["case_00003"], left_out=["case_00000"])
    assert without.name == "manifest_1_without_case_00000.csv" and without.read_text() == manifest.read_text()


def test_train_only_stops_the_workflow_after_training():
    config = Path("run/config.yaml")
    assert "--until" not in rg.snakemake_command(config, 2)
    command = rg.snakemake_command(config, 2, train_only=True)
    assert command[command.index("--until") + 1] == "train"


def test_run_config_is_a_valid_local_config(tmp_path):
    """The presets (later ones win) with the local dataset, the split, results under --out and the --set values."""
    manifest = tmp_path / "data" / "manifest_1.csv"
    sets = [rg.parse_set("training.epochs=2"), rg.parse_set("preprocessing.target_spacing=[3.0, 2.0, 2.0]")]
    presets = [REPO / "presets" / "demo.yaml", REPO / "presets" / "beyond-paper-cpu.yaml"]
    cfg = rg.run_config(presets, tmp_path / "run", manifest, (0.6, 0.1, 0.3), sets)
    assert cfg["dataset"] == {
        "source": "local",
        "manifest": str(manifest.resolve()),
        "cases": "all",
        "unlabelled_cases": "none",
    }
    assert cfg["split"]["fractions"] == [0.6, 0.1, 0.3] and cfg["training"]["epochs"] == 2
    assert cfg["preprocessing"]["target_spacing"] == [3.0, 2.0, 2.0]
    assert cfg["training"]["steps_per_epoch"] == 40 and cfg["training"]["lr_schedule"] == "poly"  # both presets
    assert cfg["results_dir"] == str((tmp_path / "run" / "results").resolve())
    with pytest.raises(ValueError):
        rg.run_config([REPO / "presets" / "demo.yaml"], tmp_path, manifest, (0.6, 0.1, 0.1), [])


def test_every_third_real_case_is_stored_in_ras(kits_labels_dir):
    """The 23 KiTS19 labels are all used, a third of them re-saved in RAS."""
    cases = rg.label_cases(kits_labels_dir)
    assert len(cases) == 23 and cases[0][0] == "case_00000"
    assert sum(rg.orientation_of(i) == "RAS" for i in range(len(cases))) == 7


@pytest.mark.parametrize("case_id", ["case_00021", "case_00038"])
def test_real_label_gets_two_kidneys_inside_the_body(kits_labels_dir, case_id):
    """On a real label (subsampled 4x in-plane for speed) both kidneys are found and lie inside the body."""
    label, geometry = read_label(kits_labels_dir / case_id / "segmentation.nii.gz", case_id, KITS19_LABELS)
    small = np.ascontiguousarray(label[:, ::4, ::4])
    spacing = (geometry.spacing[0], geometry.spacing[1] * 4, geometry.spacing[2] * 4)
    canvas, anat, *_ = rg.paint_anatomy(small, spacing, rg.case_rng(case_id, 13))
    assert anat.left is not None and anat.right is not None
    assert np.all(canvas.tissue[small > 0] != rg.AIR)


def test_real_header_survives_both_orientations(kits_labels_dir, tmp_path):
    """case_00037's header (uint16, qform code 1, sform code 0) is kept in both layouts, on a crop of its label."""
    ref = nib.load(str(kits_labels_dir / "case_00037" / "segmentation.nii.gz"))
    crop = np.asarray(ref.dataobj[30:50, 150:310:2, 100:420:2])
    header = ref.header.copy()
    src = tmp_path / "src" / "segmentation.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(crop, ref.affine, header=header), str(src))
    for orientation in ("stored", "RAS"):
        out = tmp_path / orientation / "case_00037"
        rg.write_case(src, out, "case_00037", seed=13, orientation=orientation)
        for name, dtype in (("imaging.nii.gz", np.int16), ("segmentation.nii.gz", np.uint16)):
            img = nib.load(str(out / name))
            assert img.get_data_dtype() == dtype
            assert [int(img.header[k]) for k in ("qform_code", "sform_code")] == [1, 0]
    (a, _), (b, _) = (read_image(tmp_path / o / "case_00037" / "imaging.nii.gz") for o in ("stored", "RAS"))
    assert np.array_equal(a, b)


def test_scores_and_table_from_a_results_folder(tmp_path):
    """The driver's table reads metrics/summary.csv, per_case.csv, history.csv and the benchmark files."""
    metrics, bench = tmp_path / "metrics", tmp_path / "benchmarks"
    for folder in (metrics, bench / "predict", bench / "train", tmp_path / "model" / "fold_0"):
        folder.mkdir(parents=True)
    rows = [("tk_dice", 0.9), ("tu_dice", 0.4), ("tu_dice_with_tumor", 0.5), ("tumor_precision", 0.6)]
    rows += [("tumor_recall", 0.7), ("tu_missed_cases", 1.0)]
    pd.DataFrame([{"metric": m, "n": 3, "mean": v} for m, v in rows]).to_csv(metrics / "summary.csv", index=False)
    per_case = {"case_id": ["case_00001", "case_00002", "case_00003"], "has_tumor": [True, True, False]}
    per_case.update(tk_dice=[0.9] * 3, tu_dice=[0.6, 0.0, 0.6], tu_missed=[False, True, False], true_tumor_ml=[1, 2, 0])
    pd.DataFrame(per_case).to_csv(metrics / "per_case.csv", index=False)
    pd.DataFrame({"epoch": [1, 2, 3]}).to_csv(tmp_path / "model" / "fold_0" / "history.csv", index=False)
    for name, sec in (("predict/case_00001", 10.0), ("predict/case_00002", 20.0), ("train/fold_0", 99.0)):
        (bench / f"{name}.tsv").write_text(f"s\th:m:s\n{sec}\t0:00:10\n")
    s = rg.scores(tmp_path)
    assert (s["with_tumour"], s["tu_missed_share"], s["tk_dice"]) == (2, 0.5, 0.9)
    train = rg.training_record(tmp_path, {"training": {"steps_per_epoch": 40}})
    assert train == {"folds": 1, "epochs": 3, "steps": 120, "train_s": 99.0}
    assert rg.stage_times(tmp_path) == {"predict": {"jobs": 2, "mean_s": 15.0}}
    records = [{"case_id": "case_00001", "seconds": 4.0, "cached": True, "axcodes": "RAS"}]
    table = rg.report(s, train, rg.stage_times(tmp_path), rg._timing(records, 0.5, 300.0))
    assert "| tumour missed entirely | 1 of 2 (0.50) |" in table and "predict 15.0 s (x2)" in table
    assert rg.case_rows(tmp_path, records)["stored"].tolist() == ["RAS", "", ""]
