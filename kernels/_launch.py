"""Shared helpers of the Triton launchers: the device guard, output allocation (with debug poisoning),
float64 scalar arguments and launch heuristics."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import triton_interpreter_enabled

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def poison_enabled() -> bool:
    """``DSFAST_POISON_OUTPUTS=1``: outputs are NaN-filled before the kernels write them."""
    return os.environ.get("DSFAST_POISON_OUTPUTS", "0") == "1"


def interpreter_tiles() -> bool:
    """Large tiles (few programs) under the interpreter, whose cost is per program, not per element.

    ``DSFAST_TRITON_GPU_TILES=1`` keeps the GPU block sizes under the interpreter (the tests use it so
    the configurations a GPU runs are the ones checked).
    """
    return triton_interpreter_enabled() and os.environ.get("DSFAST_TRITON_GPU_TILES", "0") != "1"


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
    """The four stencil weights ``(wa, wb, wc, wd)`` as a tuple of Python floats (list, tuple or tensor in)."""
    w = [float(v) for v in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(w) != 4:
        raise ValueError(f"weights: expected 4 floats (wa, wb, wc, wd), got {len(w)}")
    return w[0], w[1], w[2], w[3]


def on_input_device(launcher):
    """Run ``launcher`` with the CUDA device of its first tensor argument current.

    Triton launches on the current device (and its current stream): a tensor on ``cuda:1`` while
    ``cuda:0`` is current would otherwise be read by a kernel on the wrong GPU. A no-op for CPU and
    meta tensors (``torch.cuda.device_of``).
    """
    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device_of(first):
            return launcher(*args, **kwargs)

    return launch


@triton.jit
def scalar_as(value, DTYPE: tl.constexpr):
    """A float64 scalar argument (annotated ``tl.float64``) in DTYPE.

    Constants (stencil weights, tau, ...) are passed as float64 scalar arguments: no device tensor to
    build (a host-to-device copy, illegal during CUDA-graph capture) or keep alive for a captured graph.
    The interpreter passes them as Python floats, which ``tl.cast`` would round to float32; multiplying
    by a DTYPE one keeps them exact there (and folds away when compiled).
    """
    return (value * tl.full((), 1.0, DTYPE)).to(DTYPE)


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in under the interpreter.

    Meta tensors are what a compile for a GPU target without a GPU launches with (``_gpu_compile``):
    the active Triton driver (there, a stub for that target) tells the count.
    """
    if triton_interpreter_enabled():
        return 4
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return triton.runtime.driver.active.utils.get_device_properties(0)["multiprocessor_count"]


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def elementwise_tile(total_rows: int, w: int, target: int = 1024) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) of a stencil tile over the row space (N*C*h rows, w columns).

    Wide rows for coalescing (up to 128 outputs = 256 input pixels per row segment), about ``target``
    outputs per program (4x as many input pixels: enough bytes in flight per SM on an H100).
    """
    if interpreter_tiles():
        target = 16384
    block_w = min(next_pow2(w), 128)
    block_h = min(next_pow2(total_rows), max(1, target // block_w))
    return block_h, block_w


def stencil_grid(total_rows: int, w: int, block_h: int, block_w: int) -> tuple[int]:
    return (triton.cdiv(total_rows, block_h) * triton.cdiv(w, block_w),)


# --------------------------------------------------------------------------------------------------
# Device helpers shared by the stencil kernels (2x2 stride-2 blocks [[a, b], [c, d]]).
#
# The output positions of all N*C planes are one "row space" of N*C*h rows by w columns (global row
# R = plane * h + y): a tile is BLOCK_H rows x BLOCK_W columns of it, so small planes (latents, tests)
# still fill whole tiles and big ones get wide, coalesced rows.
# --------------------------------------------------------------------------------------------------
@triton.jit
def tile_coords(pid, total_rows, w, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """(global rows [BLOCK_H], row mask, first column) of the tile of a flat program id."""
    tiles_w = tl.cdiv(w, BLOCK_W)
    ty = pid // tiles_w
    tx = pid - ty * tiles_w
    rows = ty * BLOCK_H + tl.arange(0, BLOCK_H)
    return rows, rows < total_rows, tx * BLOCK_W


@triton.jit
def row_offsets(rows, h, C, s_n, s_c, s_h):
    """int64 offset of row y of plane (n, c) for global rows R = (n*C + c)*h + y: n*s_n + c*s_c + y*s_h."""
    plane = rows // h
    y = rows - plane * h
    n = plane // C
    c = plane - n * C
    return n.to(tl.int64) * s_n + c.to(tl.int64) * s_c + y.to(tl.int64) * s_h


@triton.jit
def load_blocks(ptr, row_off, row_mask, col0, w, s_h, s_w, COMPUTE: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Load the 2x2 blocks of output columns col0 + [0, BLOCK_W) as (a, b, c, d), each [BLOCK_H, BLOCK_W].

    row_off [BLOCK_H] (int64): offset of the top input row of each block row. Each input row segment
    is read as one contiguous run of 2*BLOCK_W pixels and de-interleaved in registers (reshape +
    split), so the loads stay coalesced.
    """
    in_cols = col0 * 2 + tl.arange(0, 2 * BLOCK_W)
    mask = row_mask[:, None] & (in_cols[None, :] < 2 * w)
    top_ptr = ptr + row_off[:, None] + (in_cols * s_w)[None, :]
    top = tl.load(top_ptr, mask=mask, other=0.0).to(COMPUTE)
    bottom = tl.load(top_ptr + s_h, mask=mask, other=0.0).to(COMPUTE)
    a, b = tl.split(tl.reshape(top, (BLOCK_H, BLOCK_W, 2)))
    c, d = tl.split(tl.reshape(bottom, (BLOCK_H, BLOCK_W, 2)))
    return a, b, c, d


@triton.jit
def store_blocks(ptr, rows, row_mask, col0, w, a, b, c, d, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Store (a, b, c, d) [BLOCK_H, BLOCK_W] as the 2x2 blocks of a contiguous (planes, 2h, 2w) output.

    Block row R = plane*h + y has its top pixel row at plane*2h + 2y = 2R. Pixels are interleaved in
    registers (join + reshape) so each output row segment is one contiguous store.
    """
    out_cols = col0 * 2 + tl.arange(0, 2 * BLOCK_W)
    mask = row_mask[:, None] & (out_cols[None, :] < 2 * w)
    dtype = ptr.dtype.element_ty
    top = tl.reshape(tl.join(a, b), (BLOCK_H, 2 * BLOCK_W)).to(dtype)
    bottom = tl.reshape(tl.join(c, d), (BLOCK_H, 2 * BLOCK_W)).to(dtype)
    row_stride = 2 * w
    top_ptr = ptr + (2 * rows.to(tl.int64) * row_stride)[:, None] + out_cols[None, :]
    tl.store(top_ptr, top, mask=mask)
    tl.store(top_ptr + row_stride, bottom, mask=mask)
