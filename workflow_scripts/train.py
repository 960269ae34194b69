"""Snakemake script: train (or resume) the U-Net."""
from pathlib import Path

if snakemake.params.deterministic:  # first: XLA reads XLA_FLAGS once, when JAX starts
    from kidney_seg.determinism import prepare_environment

    prepare_environment()

from kidney_seg.atomic import read_json
from kidney_seg.logs import log_to
from kidney_seg.preprocessing import resolve_preprocessing
from kidney_seg.training import train

with log_to(snakemake.log[0]):
    p = snakemake.params
    settings = resolve_preprocessing(p.preprocessing, read_json(next(iter(snakemake.input.fingerprint), None)))
    train([Path(m).parent for m in snakemake.input.train], [Path(m).parent for m in snakemake.input.val],
          Path(snakemake.output.model).parent, p.model, p.training, settings, tuple(p.labels), p.seed,
          checkpoint_dir=p.checkpoint_dir, threads=snakemake.threads, deterministic=p.deterministic)
