# slmops: `make demo` runs the offline quickstart, `make test` runs ruff and the test suite.
# Both create .venv on first use (pip; torch==2.13.0 CPU first so no CUDA build is pulled).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slmops-installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/slmops quickstart --workdir slmops-quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf slmops-quickstart .slmops .pytest_cache .ruff_cache
