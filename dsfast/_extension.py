"""The compiled ops ``dsfast._C``: built with the package, or built here at first use.

``pip install --no-build-isolation ...`` (what ``make install`` runs) compiles ``dsfast._C`` with the
package. A plain ``pip install .`` builds in pip's isolated environment, which has no torch, so it
installs pure Python plus the C++/CUDA sources (``dsfast/_csrc``); :func:`load` then compiles them
with ``torch.utils.cpp_extension.load`` the first time an op needs them, as DeepSpeed builds its ops.
The build is cached per Python environment and torch version (``DSFAST_EXTENSIONS_DIR``, default
``~/.cache/dsfast/extensions/<torch>-py<X.Y>-<environment hash>``), so environments never rebuild
each other's copy; later imports load the cached library in milliseconds.

This module imports nothing heavy at import time: setup.py reads :data:`CXX_FLAGS`,
:data:`LINK_FLAGS`, :func:`nvcc_flags` and :func:`source_files` from it for the ahead-of-time build.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

# No -march=native: a build must stay portable. The CPU loops are compiled once more per wider ISA
# (csrc/cpu/loops_avx2.cpp, loops_avx512.cpp set their own code generation) and chosen at run time:
# see cpu_isa().
CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NAME = "dsfast_C"  # the JIT build's library name (the ahead-of-time one is the module dsfast._C)


DEFAULT_CUDA_TARGETS = ("sm_80", "sm_90a", "compute_90")


def cuda_targets() -> list[str]:
    """What the CUDA kernels are built as: ``sm_XY`` machine code (runs on compute capability X.y, y >= Y),
    ``sm_XYa`` (X.Y only) and ``compute_XY`` PTX (the driver compiles it for any newer GPU).

    ``TORCH_CUDA_ARCH_LIST`` in torch's syntax (``"8.0;9.0a;10.0+PTX"``: ``+PTX`` adds ``compute_XY``)
    when set, else sm_80 (also sm_86/sm_89), sm_90a and compute_90 PTX (Blackwell and later).
    """
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not spec:
        return list(DEFAULT_CUDA_TARGETS)
    targets = []
    for item in re.split(r"[;,\s]+", spec):
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", item)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: {item!r} is not X.Y[a|f][+PTX] (dsfast takes no arch names)")
        arch = m.group(1) + m.group(2)
        targets.append(f"sm_{arch}{m.group(3)}")
        if m.group(4):
            targets.append(f"compute_{arch}")
    return targets


def nvcc_flags() -> list[str]:
    """-O3, no --use_fast_math (results stay exact to fp32), and one -gencode per :func:`cuda_targets`
    (explicit arch flags: torch.utils.cpp_extension then adds none of its own)."""
    gencode = []
    for target in cuda_targets():
        kind, arch = target.split("_")
        virtual = "compute_" + arch
        gencode.append(f"-gencode=arch={virtual},code={virtual if kind == 'compute' else target}")
    return ["-O3", *gencode]


def source_files(root: str | os.PathLike, with_cuda: bool) -> list[str]:
    """The extension's sources under ``root`` (the csrc folder), relative to ``root``."""
    patterns = ["bindings.cpp", "cpu/*.cpp"] + (["cuda/*.cu", "cuda/*.cpp"] if with_cuda else [])
    return [os.path.relpath(p, root) for pattern in patterns for p in sorted(glob.glob(os.path.join(root, pattern)))]


def sources_root() -> Path | None:
    """The shipped sources (``dsfast/_csrc`` in an installed wheel, ``csrc/`` in a source tree)."""
    package = Path(__file__).resolve().parent
    for root in (package / "_csrc", package.parent / "csrc"):
        if (root / "bindings.cpp").is_file():
            return root
    return None


def cache_dir(with_cuda: bool) -> Path:
    import torch

    env = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
    key = f"{torch.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}-{env}" + ("-cuda" if with_cuda else "")
    base = os.environ.get("DSFAST_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dsfast",
                                                                   "extensions")
    return Path(base) / key


def load() -> None:
    """Make ``torch.ops.dsfast.*`` available; raises ImportError saying why when it cannot."""
    try:
        import dsfast._C  # noqa: F401  (the ahead-of-time build registers the ops on import)
        return
    except ImportError as err:
        prebuilt_error = err
    if os.environ.get("DSFAST_BUILD_EXT", "").strip().lower() in ("0", "false", "no", "off"):
        raise ImportError(f"{prebuilt_error}; DSFAST_BUILD_EXT=0 skips the build at first use")
    root = sources_root()
    if root is None:
        raise ImportError(f"{prebuilt_error}, and the C++ sources are not installed")
    import torch
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ImportError(f"{prebuilt_error}, and no C++ compiler ({compiler}) is on PATH to build it")
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    build = cache_dir(with_cuda)
    build.mkdir(parents=True, exist_ok=True)
    if not (build / f"{NAME}.so").is_file():
        print(f"dsfast: compiling the C++ extension (first use in this environment, about a minute; "
              f"cached in {build})", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(
            name=NAME, sources=[str(root / s) for s in source_files(root, with_cuda)],
            extra_include_paths=[str(root)], extra_cflags=CXX_FLAGS, extra_ldflags=LINK_FLAGS,
            extra_cuda_cflags=nvcc_flags() if with_cuda else None, build_directory=str(build),
            is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as err:
        raise ImportError(f"{prebuilt_error}; building it in {build} failed: {str(err).strip()[-400:]}") from None


def cpu_isa() -> str:
    """Which copy of the C++ CPU loops runs: ``"baseline"``, ``"avx2"`` (AVX2 + FMA) or ``"avx512"`` (AVX512F).

    The widest one that the CPU and its OS support, chosen at the first call of a CPU op, unless the
    environment variable ``DSFAST_CPU_ISA`` names one (a value the CPU lacks, or an unknown one, is a
    RuntimeError saying so, here and at every CPU op). Raises ImportError when the extension is missing.
    """
    load()
    import torch

    return torch.ops.dsfast.cpu_isa()
