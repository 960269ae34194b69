"""The model, losses, training and inference on Keras 3's JAX backend (the GPU machines' backend).

TensorFlow stays the default, tested backend. The subprocess also runs tests/test_schedules.py's checks of
torch-style SGD and the poly schedule (one JAX start-up for both files). This runs in a subprocess with
KERAS_BACKEND=jax, TensorFlow made unimportable and the steps jit-compiled (as on the GPU machines),
and skips where JAX is not installed (`pip install "jax[cpu]"`).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
sys.modules["tensorflow"] = None  # as on a JAX-only install (keras.utils.set_random_seed would import it)
from pathlib import Path
import numpy as np
from kidney_seg.environment import import_framework
import_framework()  # Keras and JAX, as a job imports them
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
from kidney_seg.losses import DiceCELoss, SigmoidDiceBCELoss
from kidney_seg.training import train
from kidney_seg.config import with_defaults
from kidney_seg.inference import load_predictor, predict_case
from tests.conftest import kits_affine, write_nifti
from tests.test_training import MODEL, TRAIN, make_cache, plan_for

tmp = Path(sys.argv[1])
rng = np.random.default_rng(0)
labels = rng.integers(0, 3, size=(2, 8, 8))
logits = (rng.normal(size=(2, 8, 8, 3)) * 3).astype(np.float32)
import jax  # each loss one jitted program (op by op, every op compiles alone: about 1.3 s more)
out = {"softmax_loss": float(jax.jit(DiceCELoss(3))(labels, logits)),
       "sigmoid_loss": float(jax.jit(SigmoidDiceBCELoss(3))(labels, logits[..., :2]))}
cache = make_cache(tmp / "cache")
cfg = {**TRAIN, "epochs": 1, "jit_compile": True}  # jax.jit steps, as on the GPUs (false: op-by-op eager, ~3x the CPU)
history = train(cache[:2], cache[2:], tmp / "model", MODEL, cfg, plan_for(cfg), seed=1, threads=1)
out["epochs"] = int(len(history))
image = rng.normal(40, 20, (6, 24, 24)).astype(np.float32)
path = write_nifti(tmp / "scan.nii.gz", image, kits_affine((3.0, 1.0, 1.0)))
fast = {"mirror_tta": True, "batch_size": 4, "tiling": "whole_slice", "localize": True}
pred = predict_case("case_00000", path, tmp / "model", tmp / "pred.nii.gz", with_defaults("inference", fast),
                    predictor=load_predictor(tmp / "model"))
out["pred_shape"] = list(pred.shape)
from tests.test_schedules import check_poly_in_fit, check_torch_sgd
check_torch_sgd()  # torch-style SGD and the poly callback under JAX too (they raise on a mismatch)
check_poly_in_fit()
out["schedules"] = "checked"
print("RESULT", json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed (pip install 'jax[cpu]')")
def test_jax_backend_trains_and_predicts(tmp_path):
    from kidney_seg.losses import DiceCELoss, SigmoidDiceBCELoss

    # XLA's CPU code generation unoptimised: this checks results, not speed, and compiles in about 4 s less
    unoptimised = "--xla_backend_optimization_level=0"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": unoptimised}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(2, 8, 8))
    logits = (rng.normal(size=(2, 8, 8, 3)) * 3).astype(np.float32)
    assert result["softmax_loss"] == pytest.approx(float(DiceCELoss(3)(labels, logits)), rel=1e-4)
    assert result["sigmoid_loss"] == pytest.approx(float(SigmoidDiceBCELoss(3)(labels, logits[..., :2])), rel=1e-4)
    assert result["epochs"] == 1 and result["pred_shape"] == [6, 24, 24]
    assert result["schedules"] == "checked"  # tests/test_schedules.py's optimizer and schedule checks
