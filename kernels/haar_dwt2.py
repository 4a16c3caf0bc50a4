"""One-level 2-D Haar DWT / inverse (pywt ``dwt2(x, 'haar')`` convention) as Triton kernels.

Memory-bound stride-2 stencils: the output positions of all N*C planes form one row space
(N*C*h rows x w columns); every program owns a [BLOCK_H, BLOCK_W] tile of it, reads each input pixel
once with coalesced row loads (de-interleaved in registers) and writes each output once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    accumulate_dtype,
    check_float,
    elementwise_tile,
    load_blocks,
    new_output,
    on_input_device,
    row_offsets,
    stencil_grid,
    store_blocks,
    tile_coords,
)


@triton.jit
def _haar_dwt2_kernel(x_ptr, out_ptr, C, h, w, total_rows, band, s_n, s_c, s_h, s_w,
                      COMPUTE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # band: elements per band of the (4, N, C, h, w) output, N*C*h*w. Under 2^31 Triton passes it as
    # i32, but 2*band and 3*band may not fit: the band offsets are int64.
    band = band.to(tl.int64)
    rows, row_mask, col0 = tile_coords(tl.program_id(0), total_rows, w, BLOCK_H, BLOCK_W)
    row_off = row_offsets(rows, h, C, s_n, s_c, 2 * s_h)
    a, b, c, d = load_blocks(x_ptr, row_off, row_mask, col0, w, s_h, s_w, COMPUTE, BLOCK_H, BLOCK_W)
    ll = (a + b + c + d) * 0.5
    hh = (a + b - c - d) * 0.5
    vv = (a - b + c - d) * 0.5
    dd = (a - b - c + d) * 0.5
    cols = col0 + tl.arange(0, BLOCK_W)
    mask = row_mask[:, None] & (cols[None, :] < w)
    offs = rows.to(tl.int64)[:, None] * w + cols[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs, ll.to(dtype), mask=mask)
    tl.store(out_ptr + band + offs, hh.to(dtype), mask=mask)
    tl.store(out_ptr + 2 * band + offs, vv.to(dtype), mask=mask)
    tl.store(out_ptr + 3 * band + offs, dd.to(dtype), mask=mask)


@triton.jit
def _haar_idwt2_kernel(bands_ptr, out_ptr, C, h, w, total_rows, s_band, s_n, s_c, s_h, s_w,
                       COMPUTE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    s_band = s_band.to(tl.int64)  # as band in the forward: 2*s_band, 3*s_band may pass 2^31
    rows, row_mask, col0 = tile_coords(tl.program_id(0), total_rows, w, BLOCK_H, BLOCK_W)
    cols = col0 + tl.arange(0, BLOCK_W)
    mask = row_mask[:, None] & (cols[None, :] < w)
    ptr = bands_ptr + row_offsets(rows, h, C, s_n, s_c, s_h)[:, None] + (cols * s_w)[None, :]
    ll = tl.load(ptr, mask=mask, other=0.0).to(COMPUTE)
    hh = tl.load(ptr + s_band, mask=mask, other=0.0).to(COMPUTE)
    vv = tl.load(ptr + 2 * s_band, mask=mask, other=0.0).to(COMPUTE)
    dd = tl.load(ptr + 3 * s_band, mask=mask, other=0.0).to(COMPUTE)
    a = (ll + hh + vv + dd) * 0.5
    b = (ll + hh - vv - dd) * 0.5
    c = (ll - hh + vv - dd) * 0.5
    d = (ll - hh - vv + dd) * 0.5
    store_blocks(out_ptr, rows, row_mask, col0, w, a, b, c, d, BLOCK_H, BLOCK_W)


def _compute(dtype: torch.dtype):
    return tl.float64 if accumulate_dtype(dtype) == torch.float64 else tl.float32


@on_input_device
def haar_dwt2(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(4, N, C, H/2, W/2)``: bands LL, H, V, D (pywt ``dwt2(x, 'haar')``)."""
    check_float(x, "haar_dwt2")
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"haar_dwt2: expected (N, C, H, W) with H and W even, got {tuple(x.shape)}")
    n, c, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    out = new_output((4, n, c, h, w), x.dtype, x.device)
    if out.numel() == 0:
        return out
    rows = n * c * h
    bh, bw = elementwise_tile(rows, w)
    _haar_dwt2_kernel[stencil_grid(rows, w, bh, bw)](
        x, out, c, h, w, rows, rows * w, *x.stride(), COMPUTE=_compute(x.dtype), BLOCK_H=bh, BLOCK_W=bw, num_warps=4)
    return out


@on_input_device
def haar_idwt2(bands: torch.Tensor) -> torch.Tensor:
    """``(4, N, C, h, w)`` -> ``(N, C, 2h, 2w)``: the exact inverse of :func:`haar_dwt2` (pywt ``idwt2``)."""
    check_float(bands, "haar_idwt2")
    if bands.dim() != 5 or bands.shape[0] != 4:
        raise ValueError(f"haar_idwt2: expected (4, N, C, h, w), got {tuple(bands.shape)}")
    _, n, c, h, w = bands.shape
    out = new_output((n, c, 2 * h, 2 * w), bands.dtype, bands.device)
    if out.numel() == 0:
        return out
    rows = n * c * h
    bh, bw = elementwise_tile(rows, w)
    _haar_idwt2_kernel[stencil_grid(rows, w, bh, bw)](
        bands, out, c, h, w, rows, *bands.stride(), COMPUTE=_compute(bands.dtype), BLOCK_H=bh, BLOCK_W=bw,
        num_warps=4)
    return out
