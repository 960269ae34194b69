"""Snakemake script: write split.csv."""
from kidney_seg.logs import log_to
from kidney_seg.split import make_split, write_split

with log_to(snakemake.log[0]):
    write_split(make_split(snakemake.params.cases, snakemake.params.fractions, snakemake.params.seed), snakemake.output[0])
