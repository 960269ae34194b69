"""Snakemake script: download (or generate) one case's image."""
from kidney_seg.data.sources import fetch_image
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    fetch_image(snakemake.wildcards.case, snakemake.params.dataset, snakemake.params.seed, snakemake.output[0])
