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

.PHONY: setup prepare finetune validate generate evaluate test test-fast lint bench clean-venv
.DEFAULT_GOAL := finetune

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

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

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

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

clean-venv:
	rm -rf $(VENV)
