import subprocess
import sys

import numpy as np
import pytest

from kidney_seg.cli import build_parser, case_name, inference_config, main, scan_inputs
from kidney_seg.config import with_defaults
from tests.conftest import kits_affine, write_nifti


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "predict" in out and "evaluate" in out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "kidney_seg.cli", "predict", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "MODEL_DIR" in out.stdout.upper()


def test_wrong_paths_give_one_line_errors(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope"), str(tmp_path), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kidney-seg: error:") and "\n" not in err and "Traceback" not in err
    assert main(["evaluate", str(tmp_path / "a"), str(tmp_path / "b"), "--source", "kits19"]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_input_expansion(tmp_path):
    write_nifti(tmp_path / "case_00001" / "imaging.nii.gz", np.zeros((2, 3, 4), np.int16), kits_affine())
    write_nifti(tmp_path / "scan.nii.gz", np.zeros((2, 3, 4), np.int16), kits_affine())
    found = scan_inputs([str(tmp_path)])
    assert [case_name(p) for p in found] == ["scan", "case_00001"]
    with pytest.raises(FileNotFoundError):
        scan_inputs([str(tmp_path / "missing.nii.gz")])


def test_evaluate_command(tmp_path, capsys):
    label = np.zeros((3, 8, 8), np.uint8)
    label[1, 2:5, 2:5] = 1
    label[1, 3, 3] = 2
    write_nifti(tmp_path / "truth" / "case_00000" / "segmentation.nii.gz", label, kits_affine())
    write_nifti(tmp_path / "pred" / "case_00000.nii.gz", label, kits_affine())
    argv = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "truth"), "-o", str(tmp_path / "m")]
    assert main([*argv, "--source", "kits19"]) == 0
    text = (tmp_path / "m" / "per_case.csv").read_text()
    assert text.startswith("case_id,tk_dice") and "case_00000,1.0" in text
    assert "KiTS23 tolerances (mm): tk 1.0331, masses 1.1329, tu 1.1498" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the source chooses labels and tolerances: no silent default
        build_parser().parse_args(argv)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--source", "kits99"])


def test_parser_requires_output():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "m", "x.nii.gz"])


def test_predict_options_fill_the_inference_section_from_the_schema():
    parser = build_parser()
    defaults = with_defaults("inference", {})
    assert inference_config(parser.parse_args(["predict", "model", "scan.nii.gz", "-o", "out"])) == defaults
    given = inference_config(
        parser.parse_args(
            ["predict", "model", "scan.nii.gz", "-o", "out", "--no-tta", "--step", "0.25", "--batch-size", "4"]
        )
    )
    assert given == {**defaults, "mirror_tta": False, "step": 0.25, "batch_size": 4}
    fast = inference_config(
        parser.parse_args(["predict", "model", "scan.nii.gz", "-o", "out", "--whole-slice", "--localize"])
    )
    assert fast == {**defaults, "tiling": "whole_slice", "localize": True}
    with pytest.raises(ValueError, match="inference.step"):
        inference_config(parser.parse_args(["predict", "model", "scan.nii.gz", "-o", "out", "--step", "2"]))


def _scored_folders(tmp_path):
    """Three cases on a KiTS grid: good, tumour missed, false-positive tumour; (pred dir, truth dir, case ids)."""
    rng = np.random.default_rng(3)
    cases = {}
    for i, kind in enumerate(("good", "missed", "false_positive")):
        truth = np.zeros((6, 16, 16), np.uint8)
        truth[1:5, 3:12, 3:11] = 1
        if kind != "false_positive":
            truth[2:4, 5:8, 5:8] = 2
        pred = truth.copy()
        pred[rng.random(pred.shape) < 0.05] = 0  # speckle
        pred = np.roll(pred, 1, axis=2)
        if kind == "missed":
            pred[pred == 2] = 1
        if kind == "false_positive":
            pred[3, 9, 9] = 2
        case = f"case_0000{i}"
        write_nifti(tmp_path / "truth" / case / "segmentation.nii.gz", truth, kits_affine())
        write_nifti(tmp_path / "pred" / f"{case}.nii.gz", pred, kits_affine())
        cases[case] = pred.shape
    return tmp_path / "pred", tmp_path / "truth", cases


@pytest.mark.parametrize("source", ["kits19", "kits21"])
def test_cli_evaluate_gives_exactly_the_workflows_numbers(tmp_path, source):
    """The workflow's scorer (evaluate_case_on_both_grids per case, then summarize) and the CLI agree exactly.

    The workflow's prediction record names a plan-grid prediction too; here the plan's grid
    is the scan's own (whole crop box, same shape and spacing), so its plan_grid_* columns
    repeat the scan-grid ones, and the CLI (which has no plan grid) is compared on the rest.
    """
    import json

    import pandas as pd

    from kidney_seg.evaluation import evaluate_case_on_both_grids, summarize
    from kidney_seg.volume import read_geometry

    pred_dir, truth_dir, cases = _scored_folders(tmp_path)
    jsons = []
    for case, shape in cases.items():
        spacing = read_geometry(truth_dir / case / "segmentation.nii.gz").spacing
        record = tmp_path / "records" / f"{case}.json"
        record.parent.mkdir(exist_ok=True)
        record.write_text(
            json.dumps(
                {
                    "case_id": case,
                    "prediction": str(pred_dir / f"{case}.nii.gz"),
                    "plan_grid_prediction": str(pred_dir / f"{case}.nii.gz"),
                    "plan_grid": {"crop_box": [[0, n] for n in shape], "shape": list(shape), "spacing": list(spacing)},
                }
            )
        )
        out = tmp_path / "workflow" / "cases" / f"{case}.json"
        evaluate_case_on_both_grids(case, record, truth_dir / case / "segmentation.nii.gz", out, source)
        jsons.append(out)
    summarize(jsons, tmp_path / "workflow" / "per_case.csv", tmp_path / "workflow" / "summary.csv")
    argv = ["evaluate", str(pred_dir), str(truth_dir), "-o", str(tmp_path / "cli"), "--source", source]
    assert main(argv) == 0

    workflow = pd.read_csv(tmp_path / "workflow" / "per_case.csv")
    cli = pd.read_csv(tmp_path / "cli" / "per_case.csv")
    plan_grid = [c for c in workflow.columns if c.startswith("plan_grid_")]
    assert plan_grid and not [c for c in cli.columns if c.startswith("plan_grid_")]
    pd.testing.assert_frame_equal(workflow.drop(columns=plan_grid), cli, check_exact=True)
    for column in plan_grid:  # the plan grid is the scan's here
        pd.testing.assert_series_equal(
            workflow[column], workflow[column.removeprefix("plan_grid_")], check_names=False, check_exact=True
        )
    assert cli["tu_missed"].tolist() == [False, True, False]
    assert cli["tu_false_positive"].tolist() == [False, False, True]
    assert cli["tk_surface_dice"].lt(1.0).all()

    summary_workflow = pd.read_csv(tmp_path / "workflow" / "summary.csv").set_index("metric")
    summary_cli = pd.read_csv(tmp_path / "cli" / "summary.csv").set_index("metric")
    shared = [m for m in summary_workflow.index if not m.startswith("plan_grid_")]
    assert shared == list(summary_cli.index)
    pd.testing.assert_frame_equal(summary_workflow.loc[shared], summary_cli, check_exact=True)
