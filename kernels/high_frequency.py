"""High-frequency map ``hf = wa*a + wb*b + wc*c + wd*d`` per 2x2 block, and its backward, as Triton kernels.

Memory-bound stride-2 stencils: the output positions of all N*C planes form one row space (N*C*h rows x
w columns); every program owns a [BLOCK_H, BLOCK_W] tile of it, and the 2x2 blocks are read (or written)
as contiguous row runs de-/interleaved in registers.
The four weights are float64 scalar arguments (``_launch.scalar_as``), so one compiled kernel serves every
stencil and float64 inputs get exact float64 weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    accumulate_dtype,
    as_weights,
    check_float,
    elementwise_tile,
    load_blocks,
    new_output,
    on_input_device,
    row_offsets,
    scalar_as,
    stencil_grid,
    store_blocks,
    tile_coords,
)


@triton.jit
def _high_frequency_kernel(x_ptr, out_ptr, wa: tl.float64, wb: tl.float64, wc: tl.float64, wd: tl.float64,
                           C, h, w, total_rows, s_n, s_c, s_h, s_w, COMPUTE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    rows, row_mask, col0 = tile_coords(tl.program_id(0), total_rows, w, BLOCK_H, BLOCK_W)
    wa = scalar_as(wa, COMPUTE)
    wb = scalar_as(wb, COMPUTE)
    wc = scalar_as(wc, COMPUTE)
    wd = scalar_as(wd, COMPUTE)
    row_off = row_offsets(rows, h, C, s_n, s_c, 2 * s_h)
    a, b, c, d = load_blocks(x_ptr, row_off, row_mask, col0, w, s_h, s_w, COMPUTE, BLOCK_H, BLOCK_W)
    hf = a * wa + b * wb + c * wc + d * wd
    cols = col0 + tl.arange(0, BLOCK_W)
    mask = row_mask[:, None] & (cols[None, :] < w)
    offs = rows.to(tl.int64)[:, None] * w + cols[None, :]
    tl.store(out_ptr + offs, hf.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _high_frequency_backward_kernel(g_ptr, out_ptr, wa: tl.float64, wb: tl.float64, wc: tl.float64, wd: tl.float64,
                                    C, h, w, total_rows, s_n, s_c, s_h, s_w, COMPUTE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    rows, row_mask, col0 = tile_coords(tl.program_id(0), total_rows, w, BLOCK_H, BLOCK_W)
    wa = scalar_as(wa, COMPUTE)
    wb = scalar_as(wb, COMPUTE)
    wc = scalar_as(wc, COMPUTE)
    wd = scalar_as(wd, COMPUTE)
    cols = col0 + tl.arange(0, BLOCK_W)
    mask = row_mask[:, None] & (cols[None, :] < w)
    ptr = g_ptr + row_offsets(rows, h, C, s_n, s_c, s_h)[:, None] + (cols * s_w)[None, :]
    g = tl.load(ptr, mask=mask, other=0.0).to(COMPUTE)
    store_blocks(out_ptr, rows, row_mask, col0, w, g * wa, g * wb, g * wc, g * wd, BLOCK_H, BLOCK_W)


def _compute(dtype: torch.dtype):
    return tl.float64 if accumulate_dtype(dtype) == torch.float64 else tl.float32


@on_input_device
def high_frequency(x: torch.Tensor, weights) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H/2, W/2)``: ``wa*a + wb*b + wc*c + wd*d`` per block ``[[a, b], [c, d]]``."""
    check_float(x, "high_frequency")
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"high_frequency: expected (N, C, H, W) with H and W even, got {tuple(x.shape)}")
    n, c, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    out = new_output((n, c, h, w), x.dtype, x.device)
    if out.numel() == 0:
        return out
    rows = n * c * h
    bh, bw = elementwise_tile(rows, w)
    _high_frequency_kernel[stencil_grid(rows, w, bh, bw)](
        x, out, *as_weights(weights), c, h, w, rows, *x.stride(),
        COMPUTE=_compute(x.dtype), BLOCK_H=bh, BLOCK_W=bw, num_warps=4)
    return out


@on_input_device
def high_frequency_backward(grad: torch.Tensor, weights) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N, C, 2h, 2w)``: every block ``= grad * (wa, wb, wc, wd)``."""
    check_float(grad, "high_frequency_backward")
    if grad.dim() != 4:
        raise ValueError(f"high_frequency_backward: expected (N, C, h, w), got {tuple(grad.shape)}")
    n, c, h, w = grad.shape
    out = new_output((n, c, 2 * h, 2 * w), grad.dtype, grad.device)
    if out.numel() == 0:
        return out
    rows = n * c * h
    bh, bw = elementwise_tile(rows, w)
    _high_frequency_backward_kernel[stencil_grid(rows, w, bh, bw)](
        grad, out, *as_weights(weights), c, h, w, rows, *grad.stride(),
        COMPUTE=_compute(grad.dtype), BLOCK_H=bh, BLOCK_W=bw, num_warps=4)
    return out
