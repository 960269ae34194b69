"""Snakemake script: segment a case on its own grid and on the plan's; excluded: its record."""

from pathlib import Path

if snakemake.params.deterministic:  # first: XLA reads XLA_FLAGS once, when JAX starts
    from kidney_seg.determinism import prepare_environment

    prepare_environment()

from kidney_seg.data.checks import run_unless_excluded
from kidney_seg.environment import configure_threads, import_framework, require_device
from kidney_seg.inference import predict_case_on_both_grids
from kidney_seg.logs import log_to
from kidney_seg.plan import read_plan

import_framework()  # before the framework's objects exist: fewer garbage collections over them

with log_to(snakemake.log[0]):
    require_device("predict", snakemake.params.allow_cpu)  # a GPU job without a GPU stops here, unless allowed
    configure_threads(snakemake.threads)  # TensorFlow's CPU threads: what the scheduler granted the job
    if snakemake.params.deterministic:
        from kidney_seg.determinism import enable

        enable(snakemake.params.seed)
    p = snakemake.params
    outputs = {"prediction": p.prediction, "plan_grid_prediction": p.plan_grid_prediction}
    if p.inference["uncertainty_map"]:
        outputs["uncertainty_map"] = p.uncertainty_map
    else:
        Path(p.uncertainty_map).unlink(missing_ok=True)  # a stale map from a run that wrote one
    run_unless_excluded(
        snakemake.input.check,
        snakemake.output[0],
        outputs,
        predict_case_on_both_grids,
        snakemake.wildcards.case,
        snakemake.input.image,
        [Path(m).parent for m in snakemake.input.models],
        p.prediction,
        p.plan_grid_prediction,
        p.inference,
        plan=read_plan(snakemake.input.plan),
        uncertainty_path=outputs.get("uncertainty_map"),
    )
