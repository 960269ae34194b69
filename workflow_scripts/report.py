"""Snakemake script: the self-contained HTML report."""

from kidney_seg.data.checks import usable_scans
from kidney_seg.logs import log_to
from kidney_seg.report import build_report, scans_by_case

with log_to(snakemake.log[0]):
    build_report(
        snakemake.output[0],
        snakemake.input.per_case,
        snakemake.input.summary,
        list(snakemake.input.history),
        snakemake.input.split,
        snakemake.params.config,
        snakemake.params.benchmark_dir,
        postprocessing_json=snakemake.input.postprocessing,
        scans=usable_scans(scans_by_case(snakemake.params.cases, snakemake.input.scans)),
        label_values=tuple(snakemake.params.labels),
        environment_files=list(snakemake.input.environments),
        workflow_dir=snakemake.params.workflow_dir,
        failures=snakemake.input.failures,
    )
