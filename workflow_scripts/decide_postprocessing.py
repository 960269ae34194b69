"""Snakemake script: decide the post-processing steps on the validation predictions."""
from kidney_seg.logs import log_to
from kidney_seg.postprocessing import decide_from_files

with log_to(snakemake.log[0]):
    decide_from_files(snakemake.params.cases, snakemake.input.predictions, snakemake.input.labels,
                      snakemake.params.settings, snakemake.output[0], tuple(snakemake.params.labels))
