"""Shared helpers of the Triton launchers: output allocation (with debug poisoning) and launch heuristics."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

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


@functools.lru_cache(maxsize=64)
def _weights_tensor(weights: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(weights, dtype=dtype, device=device)


def weights_tensor(weights, device, dtype: torch.dtype) -> torch.Tensor:
    """The four stencil weights as a (cached) device tensor of the compute dtype.

    Loaded by the kernels instead of passed as scalars: Triton passes Python floats as float32,
    which would round weights such as 1/sqrt(2) for float64 inputs.
    """
    return _weights_tensor(as_weights(weights), torch.device(device), accumulate_dtype(dtype))


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


# --------------------------------------------------------------------------------------------------
# Device helpers shared by the stencil kernels (2x2 stride-2 blocks [[a, b], [c, d]]).
# --------------------------------------------------------------------------------------------------


@triton.jit
def tile_coords(pid, h, w, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Split a flat program id into (plane, first output row, first output col) of a BLOCK_H x BLOCK_W tile."""
    tiles_w = tl.cdiv(w, BLOCK_W)
    tiles_h = tl.cdiv(h, BLOCK_H)
    tiles = tiles_w * tiles_h
    plane = pid // tiles
    rest = pid - plane * tiles
    ty = rest // tiles_w
    tx = rest - ty * tiles_w
    return plane, ty * BLOCK_H, tx * BLOCK_W


@triton.jit
def load_blocks(base, row0, col0, h, w, s_h, s_w, COMPUTE: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Load the 2x2 blocks of output rows row0 + [0, BLOCK_H) x cols col0 + [0, BLOCK_W) of one plane as (a, b, c, d), each [BLOCK_H, BLOCK_W].

    Each input row segment is read as one contiguous run of 2*BLOCK_W pixels and de-interleaved
    in registers (reshape + split), so the loads stay coalesced.
    """
    rows = row0 + tl.arange(0, BLOCK_H)
    in_cols = col0 * 2 + tl.arange(0, 2 * BLOCK_W)
    mask = (rows[:, None] < h) & (in_cols[None, :] < 2 * w)
    top_ptr = base + (2 * rows)[:, None] * s_h + in_cols[None, :] * s_w
    top = tl.load(top_ptr, mask=mask, other=0.0).to(COMPUTE)
    bottom = tl.load(top_ptr + s_h, mask=mask, other=0.0).to(COMPUTE)
    a, b = tl.split(tl.reshape(top, (BLOCK_H, BLOCK_W, 2)))
    c, d = tl.split(tl.reshape(bottom, (BLOCK_H, BLOCK_W, 2)))
    return a, b, c, d


@triton.jit
def store_blocks(base, row0, col0, h, w, row_stride, a, b, c, d,
                 BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Store (a, b, c, d) [BLOCK_H, BLOCK_W] as the 2x2 blocks of a contiguous-row output plane.

    Pixels are interleaved in registers (join + reshape) so each output row is one contiguous store.
    """
    rows = row0 + tl.arange(0, BLOCK_H)
    out_cols = col0 * 2 + tl.arange(0, 2 * BLOCK_W)
    mask = (rows[:, None] < h) & (out_cols[None, :] < 2 * w)
    dtype = base.dtype.element_ty
    top = tl.reshape(tl.join(a, b), (BLOCK_H, 2 * BLOCK_W)).to(dtype)
    bottom = tl.reshape(tl.join(c, d), (BLOCK_H, 2 * BLOCK_W)).to(dtype)
    top_ptr = base + (2 * rows)[:, None] * row_stride + out_cols[None, :]
    tl.store(top_ptr, top, mask=mask)
    tl.store(top_ptr + row_stride, bottom, mask=mask)
