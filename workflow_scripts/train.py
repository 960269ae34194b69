"""Snakemake script: train (or resume) the U-Net."""

from pathlib import Path

if snakemake.params.deterministic:  # first: XLA reads XLA_FLAGS once, when JAX starts
    from kidney_seg.determinism import prepare_environment

    prepare_environment()

from kidney_seg.data.checks import usable_records
from kidney_seg.environment import import_framework, require_device
from kidney_seg.logs import log_to
from kidney_seg.plan import read_plan
from kidney_seg.training import train

import_framework()  # before the framework's objects exist: fewer garbage collections over them

with log_to(snakemake.log[0]):
    p = snakemake.params
    require_device("train", p.allow_cpu)  # a GPU job without a GPU stops here, unless the config allows the CPU
    train(
        [Path(m).parent for m in usable_records(snakemake.input.train)],
        [Path(m).parent for m in usable_records(snakemake.input.val)],
        Path(snakemake.output.model).parent,
        p.model,
        p.training,
        read_plan(snakemake.input.plan),
        p.seed,
        checkpoint_dir=p.checkpoint_dir,
        threads=snakemake.threads,
        deterministic=p.deterministic,
    )
