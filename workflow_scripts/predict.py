"""Snakemake script: segment one test case on its original grid."""
from pathlib import Path

from kidney_seg.inference import predict_case
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    predict_case(snakemake.wildcards.case, snakemake.input.image, Path(snakemake.input.model).parent,
                 snakemake.output[0], snakemake.params.inference)
