"""Build and install dsfast.

Packages: ``dsfast`` (with all its subpackages) and ``dsfast.kernels``, whose sources live in the
top-level ``kernels/`` folder (Triton kernels). Extension ``dsfast._C`` (csrc/) is built with
torch.utils.cpp_extension and ninja:

* ``DSFAST_BUILD_EXT=0``   skip the extension entirely (the pure-Python package still installs);
* C++ CPU ops always otherwise (-O3 -fopenmp, no -march=native: the wheel must stay portable);
* CUDA ops (csrc/cuda/*.cu kernels + csrc/cuda/bindings.cpp) when ``DSFAST_BUILD_CUDA=1``, or
  when torch is a CUDA build and CUDA_HOME is found (``DSFAST_BUILD_CUDA=0`` forces them off). nvcc gets -O3 and no
  --use_fast_math (results must stay exact to fp32); code for sm_80 and sm_90a unless
  TORCH_CUDA_ARCH_LIST says otherwise.

Install for development with ``pip install --no-build-isolation -e .`` (see the Makefile).
"""
from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower()


def _packages() -> list[str]:
    found = find_packages(where=ROOT, include=["dsfast", "dsfast.*"])
    packages = sorted(set(["dsfast", *found]))
    return packages + ["dsfast.kernels"]


def _extensions():
    if _flag("DSFAST_BUILD_EXT") in ("0", "false", "no", "off"):
        return [], {}
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
    sources = ["csrc/bindings.cpp"] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    extra_link_args = ["-fopenmp"]
    if with_cuda:
        sources += sorted(
            os.path.relpath(p, ROOT)
            for pattern in ("*.cu", "*.cpp")
            for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", pattern))
        )
        nvcc = ["-O3"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += [
                "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90a,code=sm_90a",
            ]
        extra_compile_args["nvcc"] = nvcc
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension

    ext = ext_cls(
        name="dsfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="dsfast",
    version="0.1.0",
    description="Fast DomainStudio / DreamBooth diffusion losses: fused Triton, CUDA and C++ kernels",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"dsfast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    entry_points={"console_scripts": ["dsfast = dsfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
