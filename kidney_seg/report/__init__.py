"""A single self-contained HTML report of a run: metrics, distributions, overlays, curves, failures and provenance."""

from kidney_seg.report.html import build_report, scans_by_case
from kidney_seg.report.provenance import find_benchmarks

__all__ = ["build_report", "find_benchmarks", "scans_by_case"]
