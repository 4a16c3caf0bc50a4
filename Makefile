# dsfast: `make demo` and `make test` work from a clean clone (they install what they need).
# PY=/path/to/python installs into an existing environment instead of .venv (keeping its torch).
SHELL   := /bin/bash
PY      ?= .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := $(dir $(PY)).dsfast-installed
# The exact versions CI last passed with: every dependency but torch, Triton and the CUDA libraries (they
# follow the torch in the environment). pyproject.toml declares the ranges; this file is what `make install`
# takes. It changes on purpose only: `make lock` after a green `make test-latest` (see below).
LOCK    := constraints.txt
# The Triton whose CPU interpreter runs the kernel tests when torch is a CPU build (a CUDA torch brings its own).
TRITON_CPU := 3.9.0

.PHONY: install install-offline test test-fast test-quant test-latest lock test-triton-oldest test-gpu bench bench-gpu demo docs clean

install: $(STAMP)

# torch==2.13.0 only where no torch is present (a CUDA torch a user brought is kept, and pinned so
# nothing below replaces it). Dependencies come from pyproject.toml (`.[test]` = train + eval + bench +
# pytest); --no-build-isolation lets setup.py see torch and compile dsfast._C now, not at first use.
# torch's version is read from its metadata: importing torch before numpy is installed prints a warning.
$(STAMP): setup.py pyproject.toml $(LOCK) $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -U pip wheel 'setuptools<81'
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -c $(LOCK) -e '.[test]' "torch==$$($(PY) -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])')"
	# A CUDA torch brings the triton it was built with; a CPU torch gets one whose interpreter runs the kernel tests.
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)" || $(PIP) install -q "triton==$(TRITON_CPU)"
	# DeepSpeed compiles its CPU communication op at a first CPU run (about a minute): build it now, once.
	$(PY) -c "from dsfast.train.distributed import build_cpu_comm_op; build_cpu_comm_op()"
	touch $(STAMP)
	@test ! -f $(dir $(PY))activate || echo "dsfast is installed in $(dir $(PY)): run 'source $(dir $(PY))activate' to put the dsfast command on PATH."

# DSFAST_REQUIRE_BACKENDS: a missing C++ extension or Triton fails the run instead of skipping.
# DSFAST_REQUIRE_NVCC=1 (set by .ci/run): the CUDA compile tests fail without nvcc instead of skipping.
TEST_ENV := DSFAST_REQUIRE_BACKENDS=cpp,triton

test: install test-triton-oldest test-quant
	$(TEST_ENV) $(PY) -m pytest tests -q -m "not quant"

# The fast set for development (about 80 s on 2 cores): no trainer launches, nvcc, inductor or dynamo compiles, Triton
# interpreter runs over many tiles, plans traced from whole pipelines. --durations shows what to mark slow next.
test-fast: install
	$(TEST_ENV) $(PY) -m pytest tests -q -m "not slow and not quant" --durations=5

# The tests of model.quantize and train.optimizer=adamw8bit (marked `quant`), with the quant extra's packages
# (torchao, bitsandbytes, at the lock's versions) in a folder of their own on PYTHONPATH: once installed,
# diffusers and peft import them in every process, which would slow every trainer launch of the main run.
QUANT_SITE := .quant-site

$(QUANT_SITE)/.ready: $(STAMP) $(LOCK)
	rm -rf $(QUANT_SITE)
	$(PIP) install -q --no-deps -c $(LOCK) --target $(QUANT_SITE) torchao bitsandbytes
	touch $@

test-quant: install $(QUANT_SITE)/.ready
	$(TEST_ENV) PYTHONPATH=$(CURDIR)/$(QUANT_SITE) $(PY) -m pytest tests -q -m quant

# Drift check: a side environment with the newest releases of every dependency that pyproject.toml leaves
# open (torch stays the machine's 2.13.0 CPU build, deepspeed its pinned version), then what a new user runs
# first, from the repository root: the shadowing checks, an import of every module, a short training run of
# each method on each model kind, and the demo at tiny settings (the tests marked `drift`). CI runs it, so an
# upstream release that breaks dsfast fails CI instead of a user. Uses the C++ extension `make install` built.
LATEST_VENV := .venv-latest
LATEST_PY   := $(LATEST_VENV)/bin/python

test-latest: install
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q -U pip wheel 'setuptools<81'
	$(LATEST_PY) -m pip install -q torch==2.13.0
	DSFAST_BUILD_EXT=0 $(LATEST_PY) -m pip install -q -U --upgrade-strategy eager --no-build-isolation -e '.[test,quant]' \
		torch==2.13.0 "triton>=$(TRITON_CPU)"
	@echo "test-latest: versions that differ from $(LOCK):"
	@LC_ALL=C comm -13 <(grep -v '^#' $(LOCK) | LC_ALL=C sort) \
		<($(LATEST_PY) -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|cuda-)' | LC_ALL=C sort)
	$(TEST_ENV) $(LATEST_PY) -m pytest tests -q -m "drift or quant" -p no:cacheprovider

# Moves the lock to the versions `make test-latest` just passed with (review the diff, then run `make test`).
lock:
	test -x $(LATEST_PY) || { echo "make lock: run 'make test-latest' first"; exit 1; }
	{ echo "# Exact versions CI passed with (make lock; torch, Triton and CUDA libraries follow the environment's torch)"; \
	  $(LATEST_PY) -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|cuda-)'; } > $(LOCK)

# The GPU compile tests (sm_80/sm_90, no GPU needed) against the oldest supported Triton, in a side
# environment with only CPU torch, that Triton, numpy and pytest (dsfast from this tree, no extension).
OLDEST_TRITON := 3.6.0
OLD_VENV      := .venv-triton-$(OLDEST_TRITON)
OLD_PY        := $(OLD_VENV)/bin/python

$(OLD_VENV)/.ready:
	test -x $(OLD_PY) || python3 -m venv $(OLD_VENV)
	$(OLD_PY) -m pip install -q -c $(LOCK) torch==2.13.0 triton==$(OLDEST_TRITON) numpy pytest 'setuptools<81' wheel
	DSFAST_BUILD_EXT=0 $(OLD_PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test-triton-oldest: $(OLD_VENV)/.ready
	$(OLD_PY) -m pytest tests/test_gpu_compile.py -q

bench: install
	$(PY) -m bench.run --suite cpu

# OFFLINE=1: a GPU machine that already has torch, Triton (and pytest) and no package index:
# nothing is downloaded, dsfast is installed from this tree only (--no-index --no-deps), e.g.
#   make bench-gpu PY=python OFFLINE=1      make test-gpu PY=python OFFLINE=1
SETUP := $(if $(filter 1,$(OFFLINE)),install-offline,install)

install-offline:
	$(PIP) install -q --no-index --no-deps --no-build-isolation -e .

bench-gpu: $(SETUP)
	$(PY) -m bench.run --suite gpu

# The kernel tests on the GPU (CUDA and Triton backends against the reference) and the compile tests;
# a missing CUDA extension or Triton fails them instead of skipping.
GPU_TESTS := tests/test_triton_kernels.py tests/test_ops.py tests/test_opcheck.py tests/test_losses.py \
	tests/test_bad_input.py tests/test_gpu_compile.py

test-gpu: $(SETUP)
	DSFAST_REQUIRE_BACKENDS=cuda,triton $(PY) -m pytest -q $(GPU_TESTS)

# gpu-wheels (here, with a package index): .whl/ gets the wheels a GPU image without diffusers, DeepSpeed
# and PyWavelets needs (bench/gpu_wheels.py). gpu-check (on the GPU machine, the tree and .whl/ copied
# there): installs them, builds the CUDA extension, runs the kernel tests, the fp32 accuracy canary, two
# 10-step trainings and the headline bench in one call of at most 9.5 min, and writes a JSON report
# (bench/gpu_check.py), e.g.   make gpu-wheels      then there:   make gpu-check PY=python3 OFFLINE=1
.PHONY: gpu-wheels gpu-check

gpu-wheels: install
	$(PY) -m bench.gpu_wheels

gpu-check:
	$(PY) -m bench.gpu_check $(if $(filter 1,$(OFFLINE)),--offline) --kernel-tests $(GPU_TESTS)

demo: install
	$(PY) -m dsfast.demo

# docs/config.md's table of config keys, generated from the config schema (tests/test_docs.py fails when it is stale).
docs: install
	$(PY) -m dsfast.train.config_doc docs/config.md

clean:
	rm -rf build *.egg-info dsfast/*.so .pytest_cache
