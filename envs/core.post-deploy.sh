#!/usr/bin/env bash
# Runs once after Snakemake creates this conda env (--sdm conda), from the workflow's
# working directory: install the kidney_seg library itself without touching its deps.
set -euo pipefail
python -m pip install --no-deps -e .
