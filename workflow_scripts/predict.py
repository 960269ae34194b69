"""Snakemake script: segment one case on its original grid (one model, or the folds' ensemble)."""
from pathlib import Path

if snakemake.params.deterministic:  # first: XLA reads XLA_FLAGS once, when JAX starts
    from kidney_seg.determinism import prepare_environment

    prepare_environment()

from kidney_seg.inference import predict_case
from kidney_seg.logs import log_to

with log_to(snakemake.log[0]):
    if snakemake.params.deterministic:
        from kidney_seg.determinism import enable

        enable(snakemake.params.seed)
    predict_case(snakemake.wildcards.case, snakemake.input.image, [Path(m).parent for m in snakemake.input.models],
                 snakemake.output[0], snakemake.params.inference)
