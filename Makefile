# bc_pipeline: `make run` trains and evaluates on BloodMNIST, `make test` runs the tests,
# `make dev` opens the Dagster UI. Everything installs into .venv from pyproject.toml.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev
# Named run config for `make run` (bc_pipeline/recipes/<name>.yaml): quick, robust-cpu, transfer-cpu, lab-cpu, gpu.
RECIPE ?= quick
# Laid over the recipe's config, e.g. RUN_CONFIG='{"ops": {"trained_model": {"config": {"epochs": 30}}}}'.
RUN_CONFIG ?= {}
# Models (partitions of trained_model, see bc_pipeline/models/zoo.py) to train instead of the recipe's.
MODELS ?=
# Every artifact, report and cache, and the Dagster home (bc_pipeline/defs/resources.py reads BC_DATA_DIR too).
BC_DATA_DIR ?= $(CURDIR)/data
export BC_DATA_DIR
export DAGSTER_HOME ?= $(BC_DATA_DIR)/dagster_home
export TF_CPP_MIN_LOG_LEVEL ?= 2
# pip's global config here lists local index folders that may not exist; hide that noise only.
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: help install data run dev test bench bench-env bench-labels bench-recipes bench-ablation bench-transfer-ablation clean

help:
	@echo "make run    install, fetch BloodMNIST, materialize the whole graph, print the report path"
	@echo "            RECIPE=quick|robust-cpu|transfer-cpu|lab-cpu|gpu (bc_pipeline/recipes/), MODELS=..., RUN_CONFIG='{...}'"
	@echo "make test   install and run the test suite"
	@echo "make dev    start the Dagster UI (dg dev) with a persistent DAGSTER_HOME in BC_DATA_DIR (default data/)"
	@echo "make bench  run the benchmarks in bench/"
	@echo "make bench-recipes / bench-ablation   the recipes against their targets / the robustness ablation (long)"
	@echo "make bench-transfer-ablation         what each part of transfer-cpu buys (long)"
	@echo "make bench-labels   planted wrong labels on pbc96 found, side by side with cleanlab (about 15 min)"

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 2>&1 | $(PIP_QUIET)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" 2>&1 | $(PIP_QUIET)
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

data: install
	$(VENV)/bin/bc-fetch-bloodmnist

# The first model's run materializes everything; each further model only trains, evaluates and
# refreshes the leaderboard and the submission (bc_pipeline/run.py).
run: data $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m bc_pipeline.run --recipe $(RECIPE) $(if $(MODELS),--models $(MODELS)) --config-json '$(RUN_CONFIG)'
	@echo
	@echo "Leaderboard: $(BC_DATA_DIR)/reports/model_leaderboard/leaderboard.md"
	@echo "Reports:     $(BC_DATA_DIR)/reports/evaluation_report/<model>/report.md"
	@echo "Submission:  $(BC_DATA_DIR)/submission/ (model.py + model.keras, zipped as submission.zip)"
	@$(PY) -c "import pandas as pd; t = pd.read_parquet('$(BC_DATA_DIR)/reports/model_leaderboard/leaderboard.parquet'); print(t[['rank', 'model', 'accuracy', 'corruption_accuracy', 'mce', 'ece_scaled', 'accuracy_tta', 'train_seconds']].round(4).to_string(index=False))"

# BC_DAGSTER_STORAGE=postgres (with the DAGSTER_PG_* variables) for a team's PostgreSQL instance; see docs/operations.md.
$(DAGSTER_HOME)/dagster.yaml: | install
	$(VENV)/bin/bc-instance init

# dg dev: the UI and the daemon on this project ([tool.dg] in pyproject.toml).
dev: install $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dg dev

test: install
	$(PY) -m pytest

# cleanlab, only for bench/bench_label_issues.py's comparison: into .bench-deps, never a dependency.
bench-env: install
	$(PY) -m pip install --quiet --target .bench-deps --no-deps cleanlab==2.9.0 termcolor==3.3.0

# Issue 31's targets: planted wrong labels on pbc96 (bench/bench_label_issues.py, about 15 min on 2 cores).
bench-labels: bench-env
	$(PY) bench/bench_label_issues.py

bench: install
	$(PY) bench/bench_definitions.py
	$(PY) bench/bench_hashing.py
	$(PY) bench/bench_ingest.py
	$(PY) bench/bench_incremental.py
	$(PY) bench/bench_dedup.py
	$(PY) bench/bench_dedup.py --scale 10000 100000 1000000
	$(PY) bench/bench_anomalies.py
	$(PY) bench/bench_augmentation.py
	$(PY) bench/bench_smote.py
	$(PY) bench/bench_input_pipeline.py
	$(PY) bench/bench_models.py

# Each recipe from scratch, about an hour each on 2 cores (bench/bench_recipes.py).
bench-recipes: install
	$(PY) bench/bench_recipes.py

bench-ablation: install
	$(PY) bench/bench_robust_ablation.py

bench-transfer-ablation: install
	$(PY) bench/bench_transfer_ablation.py

clean:
	rm -rf $(BC_DATA_DIR)/assets $(BC_DATA_DIR)/reports $(BC_DATA_DIR)/cache
