"""Snakemake script: the self-contained HTML report."""
from kidney_seg.logs import log_to
from kidney_seg.report import build_report, find_benchmarks

with log_to(snakemake.log[0]):
    build_report(snakemake.output[0], snakemake.input.per_case, snakemake.input.summary, list(snakemake.input.history),
                 snakemake.input.split, snakemake.params.config, find_benchmarks(snakemake.params.benchmark_dir),
                 postprocessing_json=snakemake.input.postprocessing)
