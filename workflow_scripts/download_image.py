"""Snakemake script: download (or generate) one case's image.

dataset.allow_http comes from the config, not from a param, so that toggling it reruns nothing.
"""
from kidney_seg.data.sources import fetch_image
from kidney_seg.logs import log_to

allow_http = bool(snakemake.config["dataset"].get("allow_http", False))
with log_to(snakemake.log[0]):
    fetch_image(snakemake.wildcards.case, snakemake.params.dataset, snakemake.params.seed, snakemake.output[0],
                allow_http=allow_http)
