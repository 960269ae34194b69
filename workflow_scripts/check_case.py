"""Snakemake script: read one case as the pipeline will and record whether it is usable."""

from kidney_seg.data.checks import run_check
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    run_check(
        snakemake.wildcards.case,
        snakemake.input.image,
        next(iter(snakemake.input.label), None),
        tuple(snakemake.params.labels),
        snakemake.output[0],
        snakemake.log[0],
        snakemake.params.on_bad_case,
    )
