"""Snakemake script: download (or generate) one case's label."""
from kidney_seg.data.sources import fetch_label
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    fetch_label(snakemake.wildcards.case, snakemake.params.dataset, snakemake.params.seed, snakemake.output[0])
