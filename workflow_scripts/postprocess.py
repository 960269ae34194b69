"""Snakemake script: apply the decided post-processing to one raw prediction."""
from kidney_seg.logs import log_to
from kidney_seg.postprocessing import postprocess_file, read_decision

with log_to(snakemake.log[0]):
    postprocess_file(snakemake.wildcards.case, snakemake.input.prediction, snakemake.output[0],
                     read_decision(snakemake.input.decision), tuple(snakemake.params.labels))
