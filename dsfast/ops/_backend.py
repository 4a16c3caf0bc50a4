"""Which backend runs an op: discovery of the C++/CUDA extension and Triton, and the `auto` choice.

Backends: ``torch`` (the reference, always there), ``cpp`` (C++ CPU extension), ``cuda`` (the same
extension's CUDA kernels), ``triton`` (GPU; on CPU tensors only under ``TRITON_INTERPRET=1``).
``backend="auto"`` (or env ``DSFAST_BACKEND``) picks the fastest available for the tensor's device.

On a CUDA device a backend is available only where it can run (:func:`available_backends`): Triton from
compute capability 8.0 (its tensor-core dots: tf32, bf16), the CUDA extension where its build has
machine code or PTX for the device (:func:`has_kernel_image`).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings

import torch

from dsfast.kernels import triton_interpreter_enabled

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")


@functools.cache
def extension_available() -> bool:
    """True when ``dsfast._C`` loads (built with the package or at first use); otherwise says once why not."""
    from dsfast._extension import load

    try:
        load()  # registers torch.ops.dsfast.*
    except ImportError as err:
        warnings.warn(
            f"dsfast: the C++ extension dsfast._C is not available ({err}); ops fall back to the "
            "'torch' backend on CPU.",
            stacklevel=3,
        )
        return False
    return True


@functools.cache
def cuda_extension_available() -> bool:
    return extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key("dsfast::gram", "CUDA")


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


TRITON_MIN_CAPABILITY = (8, 0)


def has_kernel_image(capability: tuple[int, int], targets) -> bool:
    """Whether code built for ``targets`` (``sm_XY``, ``sm_XYa``, ``compute_XY``: dsfast._extension.cuda_targets)
    runs on a GPU of compute capability ``capability``: ``sm_XY`` machine code on X.y for y >= Y (sm_80 on
    sm_86/sm_89), ``sm_XYa`` on X.Y only, ``compute_XY`` PTX on X.Y and every later GPU (JIT-compiled)."""
    for target in targets:
        kind, major, minor, suffix = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", target).groups()
        built = (int(major), int(minor))
        if kind == "compute":
            runs = capability >= built
        elif suffix == "a":
            runs = capability == built
        else:
            runs = capability[0] == built[0] and capability[1] >= built[1]
        if runs:
            return True
    return False


def triton_runs_on(device: torch.device | str) -> bool:
    """Triton is importable and ``device`` is a CUDA GPU of compute capability >= 8.0."""
    device = torch.device(device)
    return (device.type == "cuda" and triton_importable()
            and torch.cuda.get_device_capability(device) >= TRITON_MIN_CAPABILITY)


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device``, fastest first; ``torch`` is always last."""
    from dsfast._extension import cuda_targets

    device = torch.device(device)
    found = []
    if device.type == "cuda":
        # Triton first: by the compiled kernels (bench/static.py) it moves fewer bytes -- the fused hf-Gram
        # reads x once, where the CUDA one writes and re-reads an N x L panel per chunk -- with 16-byte
        # vector accesses in every kernel (the CUDA elementwise kernels load scalars).
        if triton_runs_on(device):
            found.append("triton")
        if cuda_extension_available() and has_kernel_image(torch.cuda.get_device_capability(device), cuda_targets()):
            found.append("cuda")
    elif device.type == "cpu":
        if extension_available():
            found.append("cpp")
        if triton_importable() and triton_interpreter_enabled():
            found.append("triton")
    return found + ["torch"]


@torch.compiler.assume_constant_result  # decided once at trace time, not traced into
def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for ``backend`` (or ``DSFAST_BACKEND`` when ``auto``) on ``device``."""
    if backend == "auto":
        backend = os.environ.get("DSFAST_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    available = available_backends(device)
    if backend == "auto":
        # The Triton interpreter is for testing, never the fast choice on CPU.
        return next(b for b in available if not (b == "triton" and torch.device(device).type == "cpu"))
    if backend not in available:
        raise RuntimeError(
            f"dsfast backend {backend!r} is not available for {torch.device(device).type} tensors "
            f"(available: {available})"
        )
    return backend


def kernel_namespace(backend: str):
    """The op namespace that holds the kernels of a compiled backend."""
    if backend in ("cpp", "cuda"):
        return torch.ops.dsfast
    if backend == "triton":
        return torch.ops.dsfast_triton
    raise ValueError(f"backend {backend!r} has no kernel namespace")
