"""Snakemake script: preprocess one case into the slice cache, as the plan says (an excluded case: its record)."""

from pathlib import Path

from kidney_seg.data.checks import run_unless_excluded
from kidney_seg.logs import log_to
from kidney_seg.plan import plan_digest, read_plan
from kidney_seg.preprocessing import preprocess_case

with log_to(snakemake.log[0]):
    plan = read_plan(snakemake.input.plan)
    outputs = {"image": snakemake.params.image, "label": snakemake.params.label, "meta": snakemake.output.meta}
    run_unless_excluded(
        snakemake.input.check,
        snakemake.output.meta,
        outputs,
        preprocess_case,
        snakemake.wildcards.case,
        snakemake.input.image,
        snakemake.input.label,
        Path(snakemake.output.meta).parent,
        plan["preprocessing"],
        tuple(plan["labels"]),
        plan_digest=plan_digest(plan),
    )
