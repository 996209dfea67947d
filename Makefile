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

$(VENV)/.dev: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: demo test test-all
demo: $(VENV)/.runtime
	$(VENV)/bin/ouro-train --config configs/demo.py --workdir runs/demo

# The default suite (CI): two workers, tests marked `slow` left out; `make test-all` runs every test.
test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 -m "not slow" tests

test-all: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 tests
