# The two commands of the README: `make run` (demo) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := presets/demo.yaml
CORES  ?= 2
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install run test lint dry-run clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/snakemake --cores $(CORES) --configfile $(DEMO)
	@echo ""
	@echo "Report: $(abspath results/demo/report.html)"

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/snakemake --lint

dry-run: install
	$(BIN)/snakemake -n --configfile $(DEMO)

clean:
	rm -rf results .snakemake
