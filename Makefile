# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv inside the project, installs the pinned dependencies
# (torch==2.13.0, CPU build) and the package, and is quick on a second call.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements/lock.txt pyproject.toml | sha256sum | cut -c1-12)

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: demo test test-fast lint docs flwr-config bench install clean

install: $(STAMP)

$(STAMP): requirements/lock.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check setuptools wheel -r requirements/lock.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/scfedvi demo --out scfedvi-demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: everything but the slow tests and those that start Flower processes.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not flower" $(PYTEST_ARGS)

# The documentation site; warnings are errors, every page re-read (-E: an incremental build
# would not repeat the warnings of unchanged pages). Notebooks are not executed here (tests do).
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -E $(SPHINXOPTS) -b html docs docs/_build/html

# [tool.flwr.app.config] of pyproject.toml, regenerated from RunConfig's defaults.
flwr-config: $(STAMP)
	$(PY) -m scfedvi.flower.settings --write pyproject.toml

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache docs/_build
