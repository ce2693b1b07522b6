# Every target sets up .venv on first use (once; again only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build where
# a CPU build is wanted. On a GPU machine `pip install torch==2.13.0` from PyPI is the CUDA build;
# `make setup TORCH=torch==X` picks another release.
TORCH ?= torch==2.13.0
RECIPE ?= recipes/shakespeare/tiny.yaml
ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup finetune test lint bench clean-venv
.DEFAULT_GOAL := finetune

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

finetune: setup
	$(BIN)/hftextgen finetune --config $(RECIPE) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check hftextgen tests
	$(BIN)/ruff format --check hftextgen tests

# CPU benchmarks, each against its baseline in the same run; tables on stdout, JSON in
# bench/results/. ARGS="--quick" for a smoke run. The GPU one: see bench/RESULTS.md.
bench: setup
	$(BIN)/python -m bench.preprocess $(ARGS)
	$(BIN)/python -m bench.train_cpu $(ARGS)

clean-venv:
	rm -rf $(VENV)
