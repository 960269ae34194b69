"""Snakemake script: decide the post-processing steps on the validation predictions of the cases not excluded."""

from kidney_seg.data.checks import usable_predictions
from kidney_seg.logs import log_to
from kidney_seg.postprocessing import decide_from_files

with log_to(snakemake.log[0]):
    decide_from_files(
        *usable_predictions(snakemake.input.predictions, snakemake.input.labels),
        snakemake.params.settings,
        snakemake.output[0],
        tuple(snakemake.params.labels),
    )
