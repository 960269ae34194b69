import subprocess
import sys

import numpy as np
import pytest

from kidney_seg.cli import build_parser, case_name, inference_config, main, nifti_inputs
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
    assert main(["evaluate", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_input_expansion(tmp_path):
    write_nifti(tmp_path / "case_00001" / "imaging.nii.gz", np.zeros((2, 3, 4), np.int16), kits_affine())
    write_nifti(tmp_path / "scan.nii.gz", np.zeros((2, 3, 4), np.int16), kits_affine())
    found = nifti_inputs([str(tmp_path)])
    assert [case_name(p) for p in found] == ["scan", "case_00001"]
    with pytest.raises(FileNotFoundError):
        nifti_inputs([str(tmp_path / "missing.nii.gz")])


def test_evaluate_command(tmp_path, capsys):
    label = np.zeros((3, 8, 8), np.uint8)
    label[1, 2:5, 2:5] = 1
    label[1, 3, 3] = 2
    write_nifti(tmp_path / "truth" / "case_00000" / "segmentation.nii.gz", label, kits_affine())
    write_nifti(tmp_path / "pred" / "case_00000.nii.gz", label, kits_affine())
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "truth"), "-o", str(tmp_path / "m")]) == 0
    text = (tmp_path / "m" / "per_case.csv").read_text()
    assert text.startswith("case_id,tk_dice") and "case_00000,1.0" in text


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
    with pytest.raises(ValueError, match="inference.step"):
        inference_config(parser.parse_args(["predict", "model", "scan.nii.gz", "-o", "out", "--step", "2"]))
