# Every target sets up .venv on first use (once; again only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build where
# a CPU build is wanted. On a GPU machine `pip install torch==2.13.0` from PyPI is the CUDA build;
# `make setup TORCH=torch==X` picks another release.
TORCH ?= torch==2.13.0
RECIPE ?= recipes/shakespeare/tiny.yaml
MODEL ?= runs/shakespeare-tiny
PROMPT ?= ROMEO:
ARGS ?=
# LAUNCH=launch/X.yaml runs `finetune` under `accelerate launch` with that config; NPROC=N sets
# its number of processes. Unset, `finetune` is one plain process.
LAUNCH ?=
NPROC ?=
BIN := $(VENV)/bin

.PHONY: setup prepare finetune validate generate evaluate test test-all test-fast test-latest lock lint bench clean-venv
.DEFAULT_GOAL := finetune

# constraints.txt: the exact versions the whole suite last passed with (`make lock` writes it).
# pyproject.toml keeps ranges, for those who install hftextgen into their own environment.
# LOCK= (empty) installs the newest versions the ranges allow instead.
LOCK ?= constraints.txt
PIP = python -m pip install --quiet --disable-pip-version-check

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/$(PIP) "$(TORCH)"
	$(VENV)/bin/$(PIP) $(if $(LOCK),--constraint $(LOCK)) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# A breaking release of a dependency, found before it reaches a user: a separate environment with
# the newest versions the ranges allow, and the fast tests on it.
LATEST := .venv-latest
$(LATEST)/.installed: pyproject.toml
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/$(PIP) "$(TORCH)"
	$(LATEST)/bin/$(PIP) --upgrade --upgrade-strategy eager -e ".[dev]"
	touch $@

test-latest:
	rm -f $(LATEST)/.installed
	$(MAKE) $(LATEST)/.installed
	$(LATEST)/bin/pip list --disable-pip-version-check --format freeze | grep -v -e '^hftextgen' -e '^-e'
	$(LATEST)/bin/python -m pytest -q $(XDIST) -m "not slow" $(ARGS)

# Refresh the lock: the newest versions the ranges allow, the whole suite on them, and only if it
# passes, those versions into constraints.txt (torch excluded: TORCH pins it, CPU or CUDA build).
lock:
	rm -f $(LATEST)/.installed
	$(MAKE) $(LATEST)/.installed
	$(LATEST)/bin/python -m pytest -q $(XDIST) $(ARGS)
	{ echo "# The versions the whole suite passed with: written by \`make lock\`, read by \`make setup\`."; \
	  $(LATEST)/bin/pip freeze --disable-pip-version-check --exclude-editable \
	  | grep -v -i -e '^torch==' -e '^nvidia-' -e '^triton=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -f $(VENV)/.installed
	@echo "constraints.txt updated; the next make target re-creates .venv from it"

ifneq ($(NPROC),)
ifeq ($(LAUNCH),)
$(error NPROC=$(NPROC) needs a launch config: add LAUNCH=launch/multi_gpu.yaml (CPU processes where there is no GPU))
endif
ifneq ($(NPROC),1)
ifneq ($(shell grep -E "^distributed_type: *'?NO'?$$" $(LAUNCH) 2>/dev/null),)
$(error $(LAUNCH) runs one process whatever NPROC says: use LAUNCH=launch/multi_gpu.yaml (CPU processes where there is no GPU))
endif
endif
endif

finetune: setup
ifeq ($(LAUNCH),)
	$(BIN)/hftextgen finetune --config $(RECIPE) $(ARGS)
else
	$(BIN)/accelerate launch --config_file $(LAUNCH) $(if $(NPROC),--num_processes $(NPROC)) \
		-m hftextgen finetune --config $(RECIPE) $(ARGS)
endif

prepare: setup
	$(BIN)/hftextgen prepare --config $(RECIPE) $(ARGS)

validate: setup
	$(BIN)/hftextgen validate --config $(RECIPE) $(ARGS)

generate: setup
	$(BIN)/hftextgen generate --model $(MODEL) --prompt "$(PROMPT)" $(ARGS)

evaluate: setup
	$(BIN)/hftextgen evaluate --model $(MODEL) $(ARGS)

# The tests run on every core, up to 8 (pytest-xdist; each test uses one thread). `test` is what
# CI runs: every fast test and each feature end to end once. `test-all` adds the extended tests
# (the same paths on other architectures, signals and process counts): before changing training,
# resuming, launching or LoRA, and by `make lock`. TEST_JOBS=1 runs them in this process.
TEST_JOBS ?= $(shell $(PYTHON) -c "import os; print(min(8, len(os.sched_getaffinity(0))))")
XDIST = $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist worksteal)
PYTEST = $(BIN)/python -m pytest -q $(XDIST)

test: setup
	$(PYTEST) -m "not extended" $(ARGS)

test-all: setup
	$(PYTEST) $(ARGS)

test-fast: setup
	$(PYTEST) -m "not slow" $(ARGS)

lint: setup
	$(BIN)/ruff check hftextgen tests bench
	$(BIN)/ruff format --check hftextgen tests bench

# CPU benchmarks, each against its baseline in the same run; tables on stdout, JSON in
# bench/results/. ARGS="--quick" for a smoke run. The GPU one: see bench/RESULTS.md.
bench: setup
	$(BIN)/python -m bench.preprocess $(ARGS)
	$(BIN)/python -m bench.train_cpu $(ARGS)
	$(BIN)/python -m bench.generate $(ARGS)
	$(BIN)/python -m bench.evaluate $(ARGS)
	$(BIN)/python -m bench.scale $(ARGS)
	$(BIN)/python -m bench.packing $(ARGS)
	$(BIN)/python -m bench.cpu_step $(ARGS)
	$(BIN)/python -m bench.trl_sft $(ARGS)

clean-venv:
	rm -rf $(VENV) $(LATEST)
