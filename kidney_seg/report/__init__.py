"""A single self-contained HTML report of a run: metrics, curves and provenance."""

from pathlib import Path

from kidney_seg.report.html import build_report


def find_benchmarks(benchmark_dir: str | Path) -> list[Path]:
    """The Snakemake benchmark TSVs written so far under ``benchmark_dir``."""
    root = Path(benchmark_dir)
    return sorted(root.rglob("*.tsv")) if root.is_dir() else []


__all__ = ["build_report", "find_benchmarks"]
