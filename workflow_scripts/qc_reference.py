"""Snakemake script: the QC reference: the usable training cases' range, the settings, the uncertainty threshold."""

from kidney_seg.data.checks import usable_records
from kidney_seg.logs import log_to
from kidney_seg.quality import build_reference

with log_to(snakemake.log[0]):
    build_reference(
        usable_records(snakemake.input.metas),
        snakemake.params.settings,
        snakemake.output[0],
        usable_records(snakemake.input.validation),
    )
