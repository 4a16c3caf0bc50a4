"""Which backend runs an op: discovery of the C++/CUDA extension and Triton, and the `auto` choice.

Backends: ``torch`` (the reference, always there), ``cpp`` (C++ CPU extension), ``cuda`` (the same
extension's CUDA kernels), ``triton`` (GPU; on CPU tensors only under ``TRITON_INTERPRET=1``).
``backend="auto"`` (or env ``DSFAST_BACKEND``) picks the fastest available for the tensor's device.
"""
from __future__ import annotations

import functools
import importlib.util
import os
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


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device``, fastest first; ``torch`` is always last."""
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        # Triton first: by the compiled kernels (bench/static.py) it moves fewer bytes -- the fused hf-Gram
        # reads x once, where the CUDA one writes and re-reads an N x L panel per chunk -- with 16-byte
        # vector accesses in every kernel (the CUDA elementwise kernels load scalars).
        if triton_importable():
            found.append("triton")
        if cuda_extension_available():
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
