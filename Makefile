# Every target works on a fresh machine: it creates .venv, installs, fetches the default model.
# A second call reuses what is there.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= Write a Python function that checks whether a number is prime.

.PHONY: setup run test bench clean-venv

export PJRT_DEVICE ?= CPU

# The model lives in a cache folder outside the repo; the fetch returns at once when it is there.
setup: $(STAMP)
	$(PY) -m scripts.fetch_default_model

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,fetch]'
	touch $@

run: setup
	$(VENV)/bin/neuron-peagle generate "$(PROMPT)" --max-new-tokens 128

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m scripts.benchmark_plain

clean-venv:
	rm -rf $(VENV)
