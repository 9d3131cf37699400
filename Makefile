# bc_pipeline: `make run` trains and evaluates on BloodMNIST, `make test` runs the tests,
# `make dev` opens the Dagster UI. Everything installs into .venv from pyproject.toml.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev
# Run config for `make run`: one process for all steps saves a TensorFlow/Dagster start-up per step.
# Override to change training, e.g. RUN_CONFIG='{"ops": {"trained_model": {"config": {"epochs": 30}}}}'.
RUN_CONFIG ?= {"execution": {"config": {"in_process": {}}}}
export DAGSTER_HOME := $(CURDIR)/data/dagster_home
export TF_CPP_MIN_LOG_LEVEL ?= 2
# pip's global config here lists local index folders that may not exist; hide that noise only.
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: help install data run dev test bench clean

help:
	@echo "make run    install, fetch BloodMNIST, materialize the whole graph, print the report path"
	@echo "make test   install and run the test suite"
	@echo "make dev    start the Dagster UI (dagster dev) with a persistent DAGSTER_HOME in data/"
	@echo "make bench  run the benchmarks in bench/"

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 2>&1 | $(PIP_QUIET)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" 2>&1 | $(PIP_QUIET)
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

data: install
	$(PY) -m bc_pipeline.lib.bloodmnist

run: data
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster asset materialize --select '*' -m bc_pipeline.definitions --config-json '$(RUN_CONFIG)'
	@echo
	@echo "Evaluation report: $(CURDIR)/data/reports/evaluation_report/report.md"
	@$(PY) -c "import json; m = json.load(open('data/reports/evaluation_report/metrics.json')); print(f\"Test accuracy: {m['accuracy']:.4f} on {m['test_images']} images\")"

dev: install
	mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster dev

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/bench_hashing.py
	$(PY) bench/bench_dedup.py
	$(PY) bench/bench_anomalies.py
	$(PY) bench/bench_augmentation.py
	$(PY) bench/bench_smote.py
	$(PY) bench/bench_input_pipeline.py

clean:
	rm -rf data/assets data/reports data/cache
