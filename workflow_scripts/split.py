"""Snakemake script: write split.csv."""
from kidney_seg.logs import log_to
from kidney_seg.split import make_split, write_split

with log_to(snakemake.log[0]):
    p = snakemake.params
    write_split(make_split(p.cases, p.fractions, p.seed, p.folds), snakemake.output[0])
