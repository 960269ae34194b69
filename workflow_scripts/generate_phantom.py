"""Snakemake script: generate one phantom case, its image and its label in one job (one generation)."""

from kidney_seg.data.sources import fetch_case
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    fetch_case(
        snakemake.wildcards.case,
        snakemake.params.dataset,
        snakemake.params.seed,
        snakemake.output.image,
        snakemake.output.label,
    )
