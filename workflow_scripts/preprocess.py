"""Snakemake script: preprocess one case into the slice cache."""
from pathlib import Path

from kidney_seg.logs import log_to
from kidney_seg.preprocessing import preprocess_case

with log_to(snakemake.log[0]):
    cfg = snakemake.params.preprocessing
    preprocess_case(snakemake.wildcards.case, snakemake.input.image, snakemake.input.label,
                    Path(snakemake.output.meta).parent, cfg["target_spacing"], cfg["clip"], cfg["normalization"],
                    tuple(snakemake.params.labels))
