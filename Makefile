# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each first installs ouro_jax (editable) into .venv from the repo's own files, every dependency at the exact
# version of constraints.txt (the lock of the ranges in requirements.txt / pyproject.toml): CI tests exactly that.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

CONSTRAINTS := constraints.txt

$(VENV)/.runtime: pyproject.toml requirements.txt $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime pyproject.toml $(CONSTRAINTS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

.PHONY: demo test test-all constraints
demo: $(VENV)/.runtime
	$(VENV)/bin/ouro-train --config configs/demo.py --workdir runs/demo

# The default suite (CI): two workers, tests marked `slow` left out; `make test-all` runs every test.
test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 -m "not slow" tests

test-all: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 tests

# Re-lock: the versions installed in .venv (after `pip install -U` of what should move) become constraints.txt.
constraints: $(VENV)/.dev
	{ sed -n '1,3p' $(CONSTRAINTS); $(PY) -m pip freeze --exclude-editable | grep -v -i '^ouro' | sed 's/+cpu$$//'; } \
		> $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
