# dsfast: `make demo` and `make test` work from a clean clone (they install what they need).
# PY=/path/to/python installs into an existing environment instead of .venv (keeping its torch).
PY      ?= .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := $(dir $(PY)).dsfast-installed

.PHONY: install test bench bench-gpu demo clean

install: $(STAMP)

# torch==2.13.0 only where no torch is present (a CUDA torch a user brought is kept, and pinned so
# nothing below replaces it). Dependencies come from pyproject.toml (`.[test]` = train + eval + bench +
# pytest); --no-build-isolation lets setup.py see torch and compile dsfast._C now, not at first use.
# torch's version is read from its metadata: importing torch before numpy is installed prints a warning.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -U pip wheel 'setuptools<81'
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -e '.[test]' "torch==$$($(PY) -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])')"
	# A CUDA torch brings the triton it was built with; a CPU torch gets one whose interpreter runs the kernel tests.
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)" || $(PIP) install -q "triton>=3.8"
	touch $(STAMP)
	@test ! -f $(dir $(PY))activate || echo "dsfast is installed in $(dir $(PY)): run 'source $(dir $(PY))activate' to put the dsfast command on PATH."

test: install
	$(PY) -m pytest tests -q

bench: install
	$(PY) -m bench.run --suite cpu

bench-gpu: install
	$(PY) -m bench.run --suite gpu

demo: install
	$(PY) -m dsfast.demo

clean:
	rm -rf build *.egg-info dsfast/*.so .pytest_cache
