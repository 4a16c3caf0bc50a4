"""Build dsfast (metadata and dependencies: pyproject.toml).

Packages: ``dsfast`` (with all its subpackages), ``dsfast.kernels``, whose modules live in the
top-level ``kernels/`` folder (Triton kernels) and whose ``__init__.py`` is ``dsfast/kernels/__init__.py``
(so ``kernels/`` is no regular package: from the repository root, ``import kernels`` still finds an
installed distribution of that name, e.g. Hugging Face's ``kernels`` that transformers imports), and ``dsfast._csrc``: the C++/CUDA sources (csrc/),
shipped so that an install without a compiled extension can build it at first use
(dsfast/_extension.py). Extension ``dsfast._C`` (csrc/) is built ahead of time with
torch.utils.cpp_extension and ninja when torch is importable here, i.e. in a build without
isolation (``pip install --no-build-isolation ...``, ``make install``); pip's isolated build has no
torch, so a plain ``pip install .`` installs pure Python and the extension is built at first use.

* ``DSFAST_BUILD_EXT=0``   skip the extension entirely (the pure-Python package still installs);
* C++ CPU ops always otherwise (-O3 -fopenmp, no -march=native: the wheel must stay portable);
* CUDA ops (csrc/cuda/*.cu kernels + csrc/cuda/bindings.cpp) when ``DSFAST_BUILD_CUDA=1``, or
  when torch is a CUDA build and CUDA_HOME is found (``DSFAST_BUILD_CUDA=0`` forces them off). nvcc gets -O3 and no
  --use_fast_math (results must stay exact to fp32); machine code for sm_80 and sm_90a and compute_90
  PTX (newer GPUs) unless TORCH_CUDA_ARCH_LIST says otherwise (dsfast/_extension.py: cuda_targets).

Install for development with ``pip install --no-build-isolation -e '.[test]'`` (see the Makefile).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

from setuptools import find_packages, setup
from setuptools.warnings import InformationOnly

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_extension_module():
    """dsfast/_extension.py (sources and flags, shared with the build at first use) without importing dsfast."""
    spec = importlib.util.spec_from_file_location("_dsfast_extension", os.path.join(ROOT, "dsfast", "_extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ext = _load_extension_module()


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower()


def _packages() -> list[str]:
    found = find_packages(where=ROOT, include=["dsfast", "dsfast.*"])
    packages = sorted(set(["dsfast", *found]))
    return packages + ["dsfast.kernels", "dsfast._csrc"]


def _extensions():
    if _flag("DSFAST_BUILD_EXT") in ("0", "false", "no", "off") or importlib.util.find_spec("torch") is None:
        return [], {}
    # torch warns "Failed to initialize NumPy" when numpy is not installed yet (pip prepares this package's
    # metadata before installing its dependencies); the build does not use numpy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    build_cuda = _flag("DSFAST_BUILD_CUDA")
    if build_cuda is None:
        with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    else:
        with_cuda = build_cuda in ("1", "true", "yes", "on")
        if with_cuda and (torch.version.cuda is None or CUDA_HOME is None):
            raise RuntimeError(
                "DSFAST_BUILD_CUDA=1 needs a CUDA build of torch and a CUDA toolkit (CUDA_HOME); "
                f"found torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}. "
                "The CUDA sources can still be checked with tests/test_cuda_compile.py."
            )

    # Relative paths: setuptools wants sources relative to setup.py.
    sources = [os.path.join("csrc", f) for f in _ext.source_files(os.path.join(ROOT, "csrc"), with_cuda)]
    extra_compile_args = {"cxx": _ext.CXX_FLAGS}
    if with_cuda:
        extra_compile_args["nvcc"] = _ext.nvcc_flags()
    ext_cls = CUDAExtension if with_cuda else CppExtension

    ext = ext_cls(
        name="dsfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=_ext.LINK_FLAGS,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# An editable install maps dsfast.kernels to kernels/ (see the docstring), so setuptools installs it with an
# import finder and tells the user, on every install, to beware of folders named like the package in the working
# directory: tests/test_install.py checks exactly that, and there is nothing for the user to do.
warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)

setup(
    packages=_packages(),
    package_dir={"dsfast.kernels": "kernels", "dsfast._csrc": "csrc"},
    # the __init__.py of dsfast.kernels is dsfast/kernels/__init__.py (see the docstring)
    package_data={"dsfast": ["kernels/__init__.py"], "dsfast._csrc": ["*.h", "*.cpp", "cpu/*.h", "cpu/*.cpp", "cuda/*.h", "cuda/*.cuh",
                                   "cuda/*.cu", "cuda/*.cpp"]},
    # package_data above is the whole list of data files; setuptools' default (every tracked file inside a
    # package) also takes csrc/cpu, csrc/cuda and dsfast/kernels as undeclared packages and warns about each
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
