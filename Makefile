# Every target works on a fresh machine: it creates the environments, installs, fetches the default model.
# A second call reuses what is there.
#   .venv      torch 2.14.1 (TorchNeuron's PyTorch): eager, inductor, neuron backends; the main suite
#   .venv-xla  torch 2.9.1 + torch-xla 2.9.0 (the trn1 stack): xla and nxd backends; tests marked xla
PYTHON ?= python3
VENV := .venv
XLA_VENV := .venv-xla
PY := $(VENV)/bin/python
XLA_PY := $(XLA_VENV)/bin/python
STAMP := $(VENV)/.installed
XLA_STAMP := $(XLA_VENV)/.installed
PROMPT ?= Write a Python function that checks whether a number is prime.
# Compiled graphs of `make run` are kept here, so a second run starts without compiling.
RUN_ARTIFACTS ?= artifacts/default-inductor

.PHONY: setup setup-xla setup-neuron run test test-main test-xla bench clean-venv trn-check

export PJRT_DEVICE ?= CPU

# The model lives in a cache folder outside the repo; the fetch returns at once when it is there.
setup: $(STAMP)
	$(PY) -m scripts.fetch_default_model

setup-xla: $(XLA_STAMP) setup

$(STAMP): pyproject.toml requirements/main.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/main.txt -e '.[dev,fetch]'
	touch $@

$(XLA_STAMP): pyproject.toml requirements/xla.txt
	test -x $(XLA_PY) || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_PY) -m pip install --quiet --upgrade pip
	$(XLA_PY) -m pip install --quiet -r requirements/xla.txt -e '.[dev]'
	touch $@

# The first run compiles the default engine's graphs into $(RUN_ARTIFACTS) (about 6 minutes on 2 cores);
# later runs find them up to date (the build compiles only a graph whose interface, weights or versions
# changed: half a minute when nothing did) and load them from there.
run: setup
	$(PY) -m compile.build --backend inductor --out $(RUN_ARTIFACTS) --prefill-buckets 128
	$(VENV)/bin/neuron-peagle generate "$(PROMPT)" --artifacts $(RUN_ARTIFACTS) --max-new-tokens 128

# Two streams side by side, one torch thread each (2 cores; the tests' small ops gain little from a
# second thread): the tests marked xla (in .venv-xla), then two long files of the main suite
# (speculative decoding against transformers token for token, and tensor parallelism under torchrun),
# against the rest of the main suite.
SPLIT := tests/test_speculative_exact.py tests/test_tensor_parallel.py
test: setup setup-xla
	@export OMP_NUM_THREADS=1 NEURON_PEAGLE_TEST_THREADS=1; \
	( $(XLA_PY) -m pytest -q --durations=10 -m xla tests; first=$$?; \
	  $(PY) -m pytest -q --durations=10 -m "not xla" $(SPLIT); exit $$(( first || $$? )) ) > .test-stream.log 2>&1 & \
	stream=$$!; $(PY) -m pytest -q --durations=10 -m "not xla" $(addprefix --ignore=,$(SPLIT)) tests; main=$$?; \
	wait $$stream; stream=$$?; echo "---- tests marked xla (in $(XLA_VENV)), then $(SPLIT):"; \
	cat .test-stream.log; test $$main -eq 0 -a $$stream -eq 0

# The first hour on a trn instance: the neuron tests, a short benchmark and a profiler session, one report
# (scripts/trn_check.py). Elsewhere: one line saying why nothing ran, exit 2. TRN_CHECK_ARGS=--dry-run: the plan.
# It needs no environment of its own (the standard library only); it runs the tests and benchmark in the
# family's: .venv-neuron on trn2/trn3 (make setup-neuron), .venv-xla on trn1.
trn-check:
	@$(PYTHON) -m scripts.trn_check $(TRN_CHECK_ARGS)

# trn2/trn3 only: TorchNeuron's environment, on Python 3.12-3.14 (NEURON_PYTHON), from the Neuron SDK's pip
# repository, whose address NEURON_PIP_INDEX must give (docs/trainium.md); torch comes as TorchNeuron pins it.
NEURON_VENV := .venv-neuron
NEURON_PYTHON ?= python3.12
setup-neuron:
	@test -n "$(NEURON_PIP_INDEX)" || { echo "setup-neuron: set NEURON_PIP_INDEX to the Neuron pip repository (docs/trainium.md)"; exit 2; }
	test -x $(NEURON_VENV)/bin/python || $(NEURON_PYTHON) -m venv $(NEURON_VENV)
	$(NEURON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NEURON_VENV)/bin/python -m pip install --quiet --extra-index-url "$(NEURON_PIP_INDEX)" $(NEURON_PIP_ARGS) -e '.[neuron,dev,fetch]'
	$(NEURON_VENV)/bin/python -m scripts.fetch_default_model

test-main: setup
	$(PY) -m pytest -q -m "not xla" tests

test-xla: setup-xla
	$(XLA_PY) -m pytest -q -m xla tests

bench: setup
	$(PY) -m scripts.benchmark_plain

clean-venv:
	rm -rf $(VENV) $(XLA_VENV)
