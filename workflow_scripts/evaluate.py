"""Snakemake script: per-case table and summary statistics of the cases not excluded."""

from kidney_seg.data.checks import usable_records
from kidney_seg.evaluation import summarize
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    summarize(usable_records(snakemake.input.cases), snakemake.output.per_case, snakemake.output.summary)
