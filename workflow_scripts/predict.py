"""Snakemake script: segment a case on its own grid and on the plan's; excluded: its record."""

from pathlib import Path

if snakemake.params.deterministic:  # first: XLA reads XLA_FLAGS once, when JAX starts
    from kidney_seg.determinism import prepare_environment

    prepare_environment()

from kidney_seg.data.checks import run_unless_excluded
from kidney_seg.environment import require_device
from kidney_seg.inference import predict_case_on_both_grids
from kidney_seg.logs import log_to
from kidney_seg.plan import read_plan

with log_to(snakemake.log[0]):
    require_device("predict", snakemake.params.allow_cpu)  # a GPU job without a GPU stops here, unless allowed
    if snakemake.params.deterministic:
        from kidney_seg.determinism import enable

        enable(snakemake.params.seed)
    run_unless_excluded(
        snakemake.input.check,
        snakemake.output[0],
        {"prediction": snakemake.params.prediction, "plan_grid_prediction": snakemake.params.plan_grid_prediction},
        predict_case_on_both_grids,
        snakemake.wildcards.case,
        snakemake.input.image,
        [Path(m).parent for m in snakemake.input.models],
        snakemake.params.prediction,
        snakemake.params.plan_grid_prediction,
        snakemake.params.inference,
        plan=read_plan(snakemake.input.plan),
    )
