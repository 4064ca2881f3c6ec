# asyncload developer tasks. Override the interpreter with e.g. `make test PYTHON=python3.12`.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=

.DEFAULT_GOAL := test
.PHONY: venv venv-bench venv-dev demo test lint bench clean

# Create the virtual environment once.
$(VPY):
	$(PYTHON) -m venv $(VENV)

# One stamp per installed extra; re-installs only when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(VPY)
	$(VPY) -m pip install -e '.[$*]'
	touch $@

venv: $(VENV)/.stamp-test
venv-bench: $(VENV)/.stamp-bench
venv-dev: $(VENV)/.stamp-dev

demo: venv
	$(VENV)/bin/asyncload demo

test: venv
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: venv-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy asyncload

bench: venv venv-bench
	$(VPY) bench/bench_load.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
