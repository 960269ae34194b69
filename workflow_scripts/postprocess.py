"""Snakemake script: apply the decided post-processing to one raw prediction (an excluded case: its record)."""

from kidney_seg.data.checks import run_unless_excluded
from kidney_seg.logs import log_to
from kidney_seg.postprocessing import postprocess_file, read_decision

with log_to(snakemake.log[0]):
    p = snakemake.params
    run_unless_excluded(
        snakemake.input.check,
        snakemake.output[0],
        {"prediction": p.prediction},
        postprocess_file,
        snakemake.wildcards.case,
        p.raw_prediction,
        p.prediction,
        read_decision(snakemake.input.decision),
        tuple(p.labels),
    )
