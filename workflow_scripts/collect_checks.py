"""Snakemake script: gather the case checks into checks.csv and failures.csv."""

from kidney_seg.data.checks import collect_checks
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    collect_checks(snakemake.input.checks, snakemake.output.table, snakemake.output.failures)
