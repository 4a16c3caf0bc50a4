"""Shared helpers of the Triton launchers: output allocation (with debug poisoning) and launch heuristics."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def poison_enabled() -> bool:
    """``DSFAST_POISON_OUTPUTS=1``: outputs are NaN-filled before the kernels write them."""
    return os.environ.get("DSFAST_POISON_OUTPUTS", "0") == "1"


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh contiguous output; NaN-filled under ``DSFAST_POISON_OUTPUTS=1`` so unwritten elements show."""
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {t.dtype}")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Internal math: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_weights(weights) -> tuple[float, float, float, float]:
    """The four stencil weights ``(wa, wb, wc, wd)`` as Python floats (kernel scalar arguments)."""
    w = [float(v) for v in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(w) != 4:
        raise ValueError(f"weights: expected 4 floats (wa, wb, wc, wd), got {len(w)}")
    return w[0], w[1], w[2], w[3]


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in under the interpreter."""
    if device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def elementwise_tile(h: int, w: int, target: int = 1024) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) of a 2-D output tile of a stride-2 stencil: wide rows for coalescing, ~target elements."""
    block_w = min(next_pow2(w), 128)
    block_h = min(next_pow2(h), max(1, target // block_w))
    return block_h, block_w
