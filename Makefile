# securetl — every set-up step lives here, so a fresh machine needs only `make demo` / `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export SECURETL_CACHE_DIR ?= $(CURDIR)/.cache/securetl

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all test-gpu lint format bench data-check clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or: make PY=python3 ...)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install securetl (editable) with dev tools

demo: $(STAMP)  ## run the default 2x2 sweep on the embedded synthetic data and print the ACC/ASR table
	$(BIN)/securetl table=demo
	$(BIN)/securetl-table demo

test: $(STAMP)  ## run the test suite (what CI runs)
	$(BIN)/python -m pytest

test-all: $(STAMP)  ## run every test, including the slow ones
	$(BIN)/python -m pytest -m ""

test-gpu: $(STAMP)  ## the CUDA tests (needs a GPU; the rest of the suite also runs there with device=auto)
	$(BIN)/python -m pytest -m gpu

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check src attacks defenses scripts tests
	$(BIN)/ruff format --check src attacks defenses scripts tests

format: $(STAMP)  ## apply ruff format and fixes
	$(BIN)/ruff format src attacks defenses scripts tests
	$(BIN)/ruff check --fix src attacks defenses scripts tests

bench: $(STAMP)  ## speed ratios vs bare torch loops, one RATIO line each (on CUDA when present)
	$(BIN)/python scripts/bench.py

data-check: $(STAMP)  ## report which real datasets are in $$SECURETL_DATA_DIR (default ./data) and their layouts
	$(BIN)/python scripts/prepare_data.py

clean:  ## remove caches, run outputs and raw results (keeps committed tables)
	rm -rf .cache outputs multirun results/raw .pytest_cache .ruff_cache wandb
