"""Snakemake script: metrics of one predicted case, on its own grid and on the plan's (an excluded case: its record)."""

from kidney_seg.data.checks import run_unless_excluded
from kidney_seg.evaluation import evaluate_case_on_both_grids
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    out = snakemake.output[0]
    run_unless_excluded(
        snakemake.input.check,
        out,
        {"metrics": out},
        evaluate_case_on_both_grids,
        snakemake.wildcards.case,
        snakemake.input.prediction,
        snakemake.input.label,
        out,
        snakemake.params.source,
    )
