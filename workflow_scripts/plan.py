"""Snakemake script: write the plan (plans.json) that preprocess, train and predict share."""

from kidney_seg.logs import log_to
from kidney_seg.plan import build_plan

with log_to(snakemake.log[0]):
    build_plan(snakemake.params.config, next(iter(snakemake.input.fingerprint), None), snakemake.output[0])
