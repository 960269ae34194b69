"""MirroredStrategy over two logical CPU devices, in a subprocess (devices must be set before TensorFlow starts)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import logging, sys
    from pathlib import Path

    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")

    from tests.test_training import MODEL, TRAIN, make_cache, plan_for
    from kidney_seg.training import train

    tmp = Path(sys.argv[1])
    dirs = make_cache(tmp)
    cfg = {**TRAIN, "epochs": 1, "batch_size": 4, "distribute": "mirrored", "num_workers": 0}
    history = train(dirs[:2], dirs[2:], tmp / "model", MODEL, cfg, plan_for(cfg), seed=1)
    print("EPOCHS", list(history["epoch"]))
""")


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "MirroredStrategy with num_replicas_in_sync == 2" in out, out[-4000:]
    assert "EPOCHS [1]" in out
    history = pd.read_csv(tmp_path / "model" / "history.csv")
    assert list(history["epoch"]) == [1] and history["loss"].notna().all()
    assert (tmp_path / "model" / "model.keras").is_file()
