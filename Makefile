# dsfast: `make demo` and `make test` work from a clean clone (they install what they need).
# PY=/path/to/python installs into an existing environment instead of .venv (keeping its torch).
PY      ?= .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := $(dir $(PY)).dsfast-installed

.PHONY: install test test-fast bench bench-gpu demo clean

install: $(STAMP)

# torch==2.13.0 only where no torch is present (a CUDA torch a user brought is kept, and pinned so
# nothing below replaces it).
$(STAMP): setup.py requirements/base.txt requirements/test.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -U pip wheel 'setuptools<81'
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements/base.txt -r requirements/test.txt "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	# A CUDA torch brings the triton it was built with; a CPU torch gets one whose interpreter runs the kernel tests.
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)" || $(PIP) install -q "triton>=3.8"
	$(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

# DSFAST_REQUIRE_BACKENDS: a missing C++ extension or Triton fails the run instead of skipping.
TEST_ENV := DSFAST_REQUIRE_BACKENDS=cpp,triton

test: install
	$(TEST_ENV) $(PY) -m pytest tests -q

# The fast set for development (a minute or two): no trainer launches, nvcc or inductor compiles.
test-fast: install
	$(TEST_ENV) $(PY) -m pytest tests -q -m "not slow"

bench: install
	$(PY) -m bench.run --suite cpu

bench-gpu: install
	$(PY) -m bench.run --suite gpu

demo: install
	$(PY) -m dsfast.demo

clean:
	rm -rf build *.egg-info dsfast/*.so .pytest_cache
