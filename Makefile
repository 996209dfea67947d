# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each builds .venv from the repo's own requirement files first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

.PHONY: demo test
demo: $(VENV)/.runtime
	$(PY) -m ouro_jax.train --config configs/demo.py --workdir runs/demo

test: $(VENV)/.dev
	$(PY) -m pytest -q tests
