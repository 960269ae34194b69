"""Snakemake script: post-process one raw prediction on both grids and flag it (an excluded case: its record)."""

from kidney_seg.data.checks import run_unless_excluded
from kidney_seg.logs import log_to
from kidney_seg.postprocessing import postprocess_prediction, read_decision
from kidney_seg.quality import read_reference

with log_to(snakemake.log[0]):
    p = snakemake.params
    run_unless_excluded(
        snakemake.input.check,
        snakemake.output[0],
        {"prediction": p.prediction, "plan_grid_prediction": p.plan_grid_prediction},
        postprocess_prediction,
        snakemake.wildcards.case,
        snakemake.input.prediction,
        p.prediction,
        p.plan_grid_prediction,
        read_decision(snakemake.input.decision),
        tuple(p.labels),
        qc_reference=read_reference(snakemake.input.qc_reference),
    )
