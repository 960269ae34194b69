"""Snakemake script: download one file of a KiTS case: the image or the label, by rule.

dataset.allow_http comes from the config, not from a param, so that toggling it reruns nothing.
"""

from kidney_seg.data.sources import fetch_image, fetch_label
from kidney_seg.logs import log_to

fetch = {"download_image": fetch_image, "download_label": fetch_label}[snakemake.rule]
allow_http = snakemake.config["dataset"]["allow_http"]
with log_to(snakemake.log[0]):
    fetch(
        snakemake.wildcards.case,
        snakemake.params.dataset,
        snakemake.params.seed,
        snakemake.output[0],
        allow_http=allow_http,
    )
