"""Data sources: phantom, KiTS downloads, local folders."""
