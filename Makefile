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

.PHONY: setup setup-xla run test test-main test-xla bench clean-venv

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

# The first run compiles the default engine's graphs into $(RUN_ARTIFACTS) (a few minutes on 2 cores);
# later runs load them from there.
run: setup
	test -f $(RUN_ARTIFACTS)/manifest.json || $(PY) -m compile.build --backend inductor --out $(RUN_ARTIFACTS) --buckets 128
	$(VENV)/bin/neuron-peagle generate "$(PROMPT)" --artifacts $(RUN_ARTIFACTS) --max-new-tokens 128

# The two suites run side by side, one torch thread each (2 cores): the tests' small ops gain little
# from a second thread, and each suite compiles (gcc, torch-xla) in its own process.
test: setup setup-xla
	@export OMP_NUM_THREADS=1 NEURON_PEAGLE_TEST_THREADS=1; $(XLA_PY) -m pytest -q -m xla tests > .test-xla.log 2>&1 & xla=$$!; \
	$(PY) -m pytest -q -m "not xla" tests; main=$$?; \
	wait $$xla; xla=$$?; echo "---- tests marked xla, in $(XLA_VENV):"; cat .test-xla.log; \
	test $$main -eq 0 -a $$xla -eq 0

test-main: setup
	$(PY) -m pytest -q -m "not xla" tests

test-xla: setup-xla
	$(XLA_PY) -m pytest -q -m xla tests

bench: setup
	$(PY) -m scripts.benchmark_plain

clean-venv:
	rm -rf $(VENV) $(XLA_VENV)
