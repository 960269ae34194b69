"""Snakemake script: intensity statistics of the training cases that passed their checks."""

from kidney_seg.data.checks import usable_inputs
from kidney_seg.logs import log_to
from kidney_seg.preprocessing import compute_fingerprint

with log_to(snakemake.log[0]):
    cases = list(
        zip(
            *usable_inputs(
                snakemake.input.checks, snakemake.params.cases, snakemake.input.images, snakemake.input.labels
            )
        )
    )
    compute_fingerprint(cases, snakemake.output[0], seed=snakemake.params.seed)
