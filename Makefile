# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each first installs ouro_jax (editable, with its pinned dependencies) into .venv from the repo's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.runtime: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: demo test lint
demo: $(VENV)/.runtime
	$(VENV)/bin/ouro-train --config configs/demo.py --workdir runs/demo

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
