"""Snakemake script: preprocess one case into the slice cache."""
from pathlib import Path

from kidney_seg.atomic import read_json
from kidney_seg.logs import log_to
from kidney_seg.preprocessing import preprocess_case, resolve_preprocessing

with log_to(snakemake.log[0]):
    settings = resolve_preprocessing(snakemake.params.preprocessing, read_json(next(iter(snakemake.input.fingerprint), None)))
    preprocess_case(snakemake.wildcards.case, snakemake.input.image, snakemake.input.label,
                    Path(snakemake.output.meta).parent, settings, tuple(snakemake.params.labels))
