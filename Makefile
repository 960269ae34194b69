# The two commands of the README: `make run` (demo) and `make test`.
# Also: `make test-quick` (every test that runs no Snakemake workflow) and `make lint`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := presets/demo.yaml
CORES  ?= 2
# GPU=1: install the `gpu` extra too (tensorflow[and-cuda]: TensorFlow's CUDA libraries from PyPI)
GPU    ?= 0
comma  := ,
EXTRAS := test,lint$(if $(filter 1,$(GPU)),$(comma)gpu)
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install run test test-quick lint dry-run clean readme-figure docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/snakemake --cores $(CORES) --configfile $(DEMO)
	@echo ""
	@echo "Report: $(abspath results/demo/report.html)"

# Tests run on $(TEST_WORKERS) pytest-xdist workers, a file at a time: the tests that share one
# whole-workflow run live in one file (tests/conftest.py), so that run is made once. Files are
# handed out in collection order, whole-workflow tests first (conftest.py), not by test count.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: install
	$(PYTEST)

test-quick: install
	$(PYTEST) -m "not workflow"

# All four checks run; the target fails if any of them does.
lint: install
	@status=0; \
	$(BIN)/snakemake --lint || status=1; \
	$(BIN)/snakefmt --check Snakefile rules || status=1; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	exit $$status

dry-run: install
	$(BIN)/snakemake -n --configfile $(DEMO)

clean:
	rm -rf results .snakemake

# docs/configuration.md, generated from kidney_seg/schemas/config.schema.yaml (rerun after editing the schema).
docs: install
	$(BIN)/python -m kidney_seg.schema_docs --write docs/configuration.md

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
