"""The whole Snakemake workflow on the tiny phantom config: lint, outputs, reruns, determinism, resuming, the lock.

Two shared runs of the tiny pipeline with ``deterministic: true`` (tests/workflow_runs.py), made side by
side: ``tiny_run``, uninterrupted on 2 cores, which the read-only checks use; and ``interrupted_run``, on
1 core, killed with SIGKILL (the whole snakemake process group) during training and during prediction and
resumed each time with --rerun-incomplete. While the resumed run trains, an identical second invocation
must stop at once on Snakemake's lock, and the first goes on undisturbed. Every result of the interrupted
run must be bitwise the uninterrupted run's: one comparison covers core counts, interruptions and
repeatability at once.

Every test using the two runs lives in this one file, so that `--dist loadfile` runs them on one
pytest-xdist worker (session fixtures are made once per worker). Runs of other configs:
tests/test_workflow_variants.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from tests.workflow_runs import DETERMINISTIC_EPOCHS as EPOCHS
from tests.workflow_runs import LOCK_ERROR, SNAKEMAKE, differences, planned_jobs, snakemake, snakemake_env

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")


def test_lint_is_clean():
    proc = subprocess.run(
        [SNAKEMAKE, "--lint"], cwd=REPO, env=snakemake_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.workflow
def test_outputs_exist_and_are_well_formed(tiny_run):
    results, data = tiny_run.results, tiny_run.data
    split = pd.read_csv(results / "split.csv")
    assert list(split.columns) == ["case_id", "subset"] and len(split) == 6
    assert split["subset"].value_counts().to_dict() == {"train": 4, "val": 1, "test": 1}
    assert (results / "model" / "fold_0" / "model.keras").stat().st_size > 0
    assert not (results / "model" / "fold_1").exists()
    history = pd.read_csv(results / "model" / "fold_0" / "history.csv")
    assert len(history) == EPOCHS and {"epoch", "lr", "loss", "val_loss", "val_dice_kidney", "val_dice_tumor"} <= set(
        history.columns
    )
    test_cases = split.loc[split.subset == "test", "case_id"].tolist()
    for case in test_cases:
        pred = nib.load(str(results / "predictions" / f"{case}.nii.gz"))
        image = nib.load(str(data / case / "imaging.nii.gz"))
        assert pred.shape == image.shape and pred.get_data_dtype() == np.uint8
        np.testing.assert_allclose(pred.affine, image.affine)
        assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1, 2}
    per_case = pd.read_csv(results / "metrics" / "per_case.csv")
    assert per_case["case_id"].tolist() == test_cases
    assert {
        "tk_dice",
        "tu_dice",
        "kidney_dice",
        "kidney_precision",
        "kidney_recall",
        "tumor_precision",
        "tumor_recall",
    } <= set(per_case.columns)
    assert per_case["tk_dice"].between(0, 1).all()
    summary = pd.read_csv(results / "metrics" / "summary.csv")
    assert list(summary.columns) == ["metric", "n", "mean", "median", "std", "min", "max"]
    decision = json.loads((results / "model" / "postprocessing.json").read_text())
    assert decision["validation_cases"] == split.loc[split.subset == "val", "case_id"].tolist()
    assert [step["name"] for step in decision["steps"]] == ["foreground", "tumor"]
    assert (results / "raw_predictions" / f"{decision['validation_cases'][0]}.nii.gz").is_file()
    for column in ("qc_flagged", "qc_reasons", "kidney_components", "uncertainty_entropy", "uncertainty_tk"):
        assert column in per_case.columns, column
    assert per_case["uncertainty_tk"].between(0, 1).all()
    reference = json.loads((results / "model" / "qc_reference.json").read_text())
    assert reference["n_cases"] == 5  # train + val
    # the threshold: the validation case's uncertainty widened by the margin (the schema's defaults)
    for column in ("uncertainty_entropy", "uncertainty_tu"):
        expected = reference["validation_uncertainty"][column][0] * 1.25
        assert reference["thresholds"][column] == pytest.approx(expected), column
    html = (results / "report.html").read_text()
    assert "Post-processing" in html and "Quality control" in html
    assert html.count('class="case-row"') == len(test_cases)
    assert all(f'data-case="{c}"' in html for c in test_cases)
    rules = (
        "generate_phantom",
        "preprocess",
        "train",
        "predict",
        "decide_postprocessing",
        "qc_reference",
        "postprocess",
    )
    for rule in (*rules, "report"):
        assert any((results / "benchmarks").rglob(f"*{rule}*")), rule
        assert any((results / "logs").rglob(f"*{rule}*")), rule


@pytest.mark.workflow
def test_metrics_on_the_plan_grid_sit_beside_the_scan_grid_ones(tiny_run):
    results = tiny_run.results
    per_case = pd.read_csv(results / "metrics" / "per_case.csv")
    for metric in ("tk_dice", "tu_dice", "kidney_precision", "tk_hd95", "tk_surface_dice", "pred_kidney_ml"):
        assert f"plan_grid_{metric}" in per_case.columns, metric
    assert per_case["plan_grid_tk_dice"].between(0, 1).all()
    summary = pd.read_csv(results / "metrics" / "summary.csv").set_index("metric")
    assert {"plan_grid_tk_dice", "plan_grid_tu_dice"} <= set(summary.index)
    plan = json.loads((results / "plans.json").read_text())
    for case in per_case["case_id"]:
        record = json.loads((results / "predictions" / f"{case}.json").read_text())
        grid = nib.load(record["plan_grid_prediction"])
        assert list(grid.shape) == record["plan_grid"]["shape"] and grid.get_data_dtype() == np.uint8
        target = plan["preprocessing"]["target_spacing"]
        np.testing.assert_allclose(record["plan_grid"]["spacing"], target, rtol=0.1)
        np.testing.assert_allclose(nib.affines.voxel_sizes(grid.affine), record["plan_grid"]["spacing"], rtol=1e-6)


@pytest.mark.workflow
def test_predict_jobs_share_the_cores_and_tensorflow_keeps_to_its_share(tiny_run):
    """On 2 cores a predict job claims one (rules/common.smk predict_threads), so two cases predict side by side,
    and TensorFlow's CPU threads are limited to that claim."""
    logs = sorted((tiny_run.results / "logs" / "predict").glob("*.log"))
    assert logs, "no predict log"
    for log in logs:
        assert "TensorFlow CPU threads: 1 intra-op, 1 inter-op" in log.read_text(), log


@pytest.mark.workflow
def test_forced_evaluate_reruns_only_that_rule_with_same_result(tiny_run):
    results = tiny_run.results
    before = (results / "metrics" / "per_case.csv").read_bytes()
    proc = snakemake(tiny_run.config, "--cores", "2", "-f", "evaluate", snakefile=tiny_run.snakefile)
    assert "evaluate" in proc.stderr and "train" not in proc.stderr.split("Job stats:")[-1]
    assert (results / "metrics" / "per_case.csv").read_bytes() == before


@pytest.mark.workflow
def test_cli_segments_a_phantom_scan_with_the_trained_model(tiny_run, tmp_path):
    results, data = tiny_run.results, tiny_run.data
    split = pd.read_csv(results / "split.csv")
    case = split.loc[split.subset == "test", "case_id"].iloc[0]
    scan = tmp_path / "scans" / "new_scan.nii.gz"  # a scan the CLI has never seen by this name
    scan.parent.mkdir()
    shutil.copyfile(data / case / "imaging.nii.gz", scan)
    kidney_seg = Path(sys.executable).parent / "kidney-seg"
    proc = subprocess.run(
        [str(kidney_seg), "predict", str(results / "model"), str(scan.parent), "-o", str(tmp_path / "out")]
        + ["--uncertainty-map"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "segmenting" in proc.stderr and "1 model(s)" in proc.stderr  # progress bar and what was loaded
    out = nib.load(str(tmp_path / "out" / "new_scan.nii.gz"))
    workflow_pred = nib.load(str(results / "predictions" / f"{case}.nii.gz"))
    np.testing.assert_allclose(out.affine, nib.load(str(scan)).affine)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(workflow_pred.dataobj))
    # the scan's QC row equals the workflow's for the same case: same uncertainty, same reference, same flags
    qc = pd.read_csv(tmp_path / "out" / "qc.csv", keep_default_na=False)
    record = json.loads((results / "predictions" / f"{case}.json").read_text())
    assert qc["case"].tolist() == ["new_scan"] and qc["output"].iloc[0].endswith("new_scan.nii.gz")
    assert qc["qc_reasons"].iloc[0] == record["qc_reasons"]
    assert str(qc["qc_flagged"].iloc[0]) == str(record["qc_flagged"])
    assert float(qc["uncertainty_tk"].iloc[0]) == pytest.approx(record["uncertainty_tk"], rel=1e-6)
    entropy = nib.load(str(tmp_path / "out" / "new_scan.uncertainty.nii.gz"))
    assert entropy.shape == out.shape and entropy.get_data_dtype() == np.float32
    assert 0.0 <= float(np.min(entropy.dataobj)) and float(np.max(entropy.dataobj)) <= 1.0
    bad = subprocess.run(
        [
            str(kidney_seg),
            "predict",
            str(results / "model"),
            str(tmp_path / "missing.nii.gz"),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "missing.nii.gz" in bad.stderr


@pytest.mark.workflow
def test_cli_segments_a_dicom_series_as_it_segments_the_same_nifti(tiny_run, tmp_path):
    """A phantom test scan as a DICOM series and as a NIfTI of the same grid and values: the same prediction; and
    the DICOM SEG output holds it, frames matched to the source slices by their SOP instance UIDs."""
    import highdicom as hd

    from kidney_seg.cli import main
    from kidney_seg.dicom import read_series_header, write_series

    results, data = tiny_run.results, tiny_run.data
    split = pd.read_csv(results / "split.csv")
    case = split.loc[split.subset == "test", "case_id"].iloc[0]
    img = nib.load(str(data / case / "imaging.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("I", "P", "L")
    # slices last and superior-ward, as a DICOM series lays them out; spacings snapped to quarter millimetres, an
    # integer origin: an affine that NIfTI's float32 and DICOM's decimal strings both hold exactly
    array = np.ascontiguousarray(np.transpose(np.asanyarray(img.dataobj), (2, 1, 0))[:, :, ::-1])
    slice_mm, row_mm, col_mm = (round(float(s) * 4) / 4 for s in img.header.get_zooms())
    affine = np.diag([-col_mm, -row_mm, slice_mm, 1.0])
    affine[:3, 3] = [61, 83, -140]
    series = tmp_path / "dicom" / "new_series"
    write_series(array, affine, series, intercept=-1024)
    nifti = tmp_path / "nifti" / "new_series.nii.gz"
    nifti.parent.mkdir()
    nib.save(nib.Nifti1Image(array, affine), str(nifti))
    model = str(results / "model")
    assert main(["predict", model, str(series.parent), "-o", str(tmp_path / "from_dicom")]) == 0  # a folder of series
    assert main(["predict", model, str(nifti), "-o", str(tmp_path / "from_nifti")]) == 0
    from_dicom = nib.load(str(tmp_path / "from_dicom" / "new_series.nii.gz"))
    from_nifti = nib.load(str(tmp_path / "from_nifti" / "new_series.nii.gz"))
    labels = np.asanyarray(from_nifti.dataobj)
    assert set(np.unique(labels)) >= {0, 1}, "the model found no kidney: the comparison would say little"
    np.testing.assert_array_equal(np.asanyarray(from_dicom.dataobj), labels)
    np.testing.assert_array_equal(from_dicom.affine, affine)
    np.testing.assert_array_equal(from_nifti.affine, affine)

    out = tmp_path / "seg"
    assert main(["predict", model, str(series), "-o", str(out), "--output-format", "dicom-seg"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["new_series.dcm", "qc.csv"]  # no NIfTI beside it
    datasets = read_series_header(series).datasets
    seg = hd.seg.segread(out / "new_series.dcm")
    frames = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in datasets], combine_segments=True)
    np.testing.assert_array_equal(np.transpose(frames, (2, 1, 0)), labels)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Kidney", "Kidney tumour"]


@pytest.mark.workflow
def test_snakemake_report_holds_the_tagged_outputs(tiny_run, tmp_path):
    out = tmp_path / "snakemake-report.html"
    snakemake(tiny_run.config, "--report", str(out), snakefile=tiny_run.snakefile)
    page = out.read_text()
    for name in ("per_case.csv", "summary.csv", "curves.png", "report.html"):  # results tagged with report()
        assert name in page, name
    for category in ("Metrics", "Training", "Report"):
        assert category in page, category
    assert "patch-aggregated sliding-window inference" in page  # report/workflow.rst


@pytest.mark.workflow
def test_rerun_train_plans_everything_downstream(tiny_run):
    cfg, snakefile = tiny_run.config, tiny_run.snakefile
    assert planned_jobs(cfg, snakefile=snakefile) == set()
    assert planned_jobs(cfg, "-R", "train", snakefile=snakefile) == {
        "train",
        "predict",
        "decide_postprocessing",
        "qc_reference",  # its uncertainty threshold comes from the validation predictions
        "postprocess",
        "evaluate_case",
        "evaluate",
        "report",
        "all",
    }


@pytest.mark.workflow
def test_editing_a_library_module_triggers_its_rules(tiny_run):
    cfg, snakefile = tiny_run.config, tiny_run.snakefile
    module = snakefile.parent / "kidney_seg" / "evaluation.py"  # the run's own copy, never the working tree
    original, stat = module.read_bytes(), module.stat()
    try:  # Snakemake >= 9.18 compares checksums, so the content must really change
        module.write_bytes(original + b"\n# edited by test_editing_a_library_module_triggers_its_rules\n")
        # post-processing is decided and applied with evaluation's Dice, so it reruns too
        assert planned_jobs(cfg, snakefile=snakefile) == {
            "decide_postprocessing",
            "postprocess",
            "evaluate_case",
            "evaluate",
            "report",
            "all",
        }
    finally:
        module.write_bytes(original)
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned_jobs(cfg, snakefile=snakefile) == set()


# ----------------------------------------------------------------------------- determinism, resuming, the lock


@pytest.mark.workflow
def test_killed_training_resumes_from_its_checkpoint_bitwise(deterministic_reference, interrupted_run):
    run = interrupted_run
    done = run.epoch_at_training_kill
    assert run.epoch_a_second_later == done, "a train job outlived the kill"
    assert done is not None and 1 <= done < EPOCHS and not run.model_after_training_kill
    fold = run.results / "model" / "fold_0"
    log = (run.results / "logs" / "train" / "fold_0.log").read_text()
    assert f"after epoch {done}\n" in log and f"epochs {done + 1}-{EPOCHS} x 3 steps" in log
    assert pd.read_csv(fold / "history.csv")["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert not [p for p in fold.rglob(".*") if p.is_file()], "partial files of the killed run were left behind"
    assert differences(deterministic_reference, run.results) == []


@pytest.mark.workflow
def test_killed_prediction_reruns_to_the_same_result(deterministic_reference, interrupted_run):
    run = interrupted_run
    expected = len(list((deterministic_reference / "raw_predictions").glob("*.nii.gz")))
    assert run.model_after_prediction_kill  # killed after training, during prediction
    assert run.raw_predictions_after_prediction_kill < expected
    assert not run.metrics_after_prediction_kill
    # training was not redone by the final run: its log and model are those of the killed run
    assert (run.results / "logs" / "train" / "fold_0.log").read_text() == run.train_log_before_finish
    assert (run.results / "model" / "fold_0" / "model.keras").read_bytes() == run.model_bytes_before_finish
    assert differences(deterministic_reference, run.results) == []


@pytest.mark.workflow
def test_second_invocation_fails_fast_on_the_lock_and_the_first_completes(interrupted_run):
    run = interrupted_run
    out = run.lock_output
    assert LOCK_ERROR in out, f"the second invocation did not hit the lock (rc {run.lock_rc}):\n{out[-6000:]}"
    assert run.lock_rc not in (0, None)
    assert run.first_running_when_second_ended, "the first invocation had already ended: the test proved nothing"
    assert run.lock_seconds < 120, f"the second invocation took {run.lock_seconds:.0f} s to give up"
    assert "--unlock" in out  # Snakemake's advice in the lock message
    assert "Finished job" not in out and "localrule" not in out, "the second invocation ran jobs"
    # the first went on to prediction (where it was killed on purpose) and the run completed
    assert run.model_after_prediction_kill
    results = run.results
    assert (results / "report.html").stat().st_size > 0 and "</html>" in (results / "report.html").read_text()
    per_case = pd.read_csv(results / "metrics" / "per_case.csv")
    assert len(per_case) >= 1 and per_case["tk_dice"].between(0, 1).all()
    leftovers = [p for p in results.rglob(".*") if p.is_file()]
    assert not leftovers, f"temporary files left in the results: {leftovers}"


@pytest.mark.workflow
def test_two_deterministic_runs_are_bitwise_identical(deterministic_reference, interrupted_run):
    # one core there, two in the reference: deterministic runs use one compute thread whatever --cores says
    results = interrupted_run.results
    assert differences(deterministic_reference, results) == []
    for log in ("train/fold_0.log", *(f"predict/{p.stem}.log" for p in (results / "raw_predictions").glob("*.json"))):
        assert "deterministic: seed 42, backend tensorflow" in (results / "logs" / log).read_text(), log


@pytest.mark.workflow
def test_differences_sees_a_flipped_bit(deterministic_reference, tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(deterministic_reference, copy)
    assert differences(deterministic_reference, copy) == []
    model = copy / "model" / "fold_0" / "model.keras"
    with zipfile.ZipFile(model) as archive:
        members = {item.filename: archive.read(item) for item in archive.infolist()}
    with h5py.File(io.BytesIO(members["model.weights.h5"]), "r") as f:
        name = next(n for n in _h5_datasets(f) if f[n].dtype == np.float32 and f[n].size)
    buffer = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buffer, "r+") as f:
        data = f[name][()]
        data.reshape(-1).view(np.uint32)[0] ^= 1  # the last bit of one weight
        f[name][...] = data
    members["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(model, "w") as archive:
        for filename, content in members.items():
            archive.writestr(filename, content)
    label = next((copy / "preprocessed").glob("*/label.npy"))
    array = np.load(label)
    array.reshape(-1)[0] ^= 1
    np.save(label, array)
    found = differences(deterministic_reference, copy)
    assert len(found) == 2 and found[0].startswith(str(label.relative_to(copy))) and "model.keras: 1 of" in found[1]


def _h5_datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    return names
