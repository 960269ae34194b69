"""Snakemake script: per-case table and summary statistics."""
from kidney_seg.evaluation import summarize
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    summarize(list(snakemake.input.cases), snakemake.output.per_case, snakemake.output.summary)
