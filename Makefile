# The two commands of the README: `make run` (demo) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := presets/demo.yaml
CORES  ?= 2
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install run test lint dry-run clean readme-figure

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

# The picture at the top of the README: the median overlay of the demo's report.
readme-figure: install
	test -f results/demo/report.html || $(MAKE) run
	$(BIN)/python -c "from kidney_seg.report.overlays import write_overlay_png as w; w('results/demo/report.html', 'docs/demo-overlay.png')"

# The pipeline through SLURM (profiles/slurm) on a one-node cluster set up on this machine
# (apt-get slurm-wlm munge, root), compared with a local run: tests/cluster/. Not part of `test`.
CLUSTER_STAMP := $(VENV)/.cluster-installed-stamp
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

$(CLUSTER_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,cluster]"
	touch $(CLUSTER_STAMP)

.PHONY: cluster-test
cluster-test: install $(CLUSTER_STAMP)
	@start=$$(date +%s); $(SUDO) tests/cluster/setup_slurm.sh && echo "[cluster-test] SLURM setup: $$(( $$(date +%s) - start )) s"
	KIDNEY_SEG_CLUSTER_TEST=1 $(BIN)/python -m pytest tests/cluster -v -s
