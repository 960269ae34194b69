"""Snakemake script: metrics of one predicted case."""
from kidney_seg.evaluation import evaluate_case
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    evaluate_case(snakemake.wildcards.case, snakemake.input.prediction, snakemake.input.label, snakemake.output[0],
                  tuple(snakemake.params.labels))
