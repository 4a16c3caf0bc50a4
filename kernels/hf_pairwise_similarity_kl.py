"""Fused high-frequency Gram matrix ``hf(x) hf(x)ᵀ`` and its backward, never materialising ``hf(x)``.

``hf`` is the 2x2 stride-2 stencil ``wa*a + wb*b + wc*c + wd*d`` per block ``[[a, b], [c, d]]`` of each
channel (see :mod:`.high_frequency`); flattened per sample it has ``D = C * H/2 * W/2`` positions.

* ``hf_gram``: the split-K Gram kernel of :mod:`.pairwise_similarity_kl` with ``HF=True``: a K block is
  BLOCK_K consecutive hf positions of one hf row, whose two input rows are read as contiguous runs and
  de-interleaved in registers, then combined with the four weights (one read of x in all). Upper
  triangular tile pairs only, deterministic reduce: as ``gram``.
* ``hf_gram_backward``: one program per (row tile of N) x (BLOCK_P positions of one hf row): it
  recomputes the hf panel of all samples there, multiplies by ``M = g + gᵀ`` with ``tl.dot`` and writes
  the blocks ``(M hf) * (wa, wb, wc, wd)`` of grad_x as two contiguous output rows (interleaved in
  registers). x is read once (for N <= 64) and grad_x written once.

All math is fp32 (fp64 for fp64 inputs): the stencil output is not 16-bit exact, so fp16/bf16 inputs
are upcast before the dot; fp32 dots run as 3xTF32 on the tensor cores.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._launch import (
    accumulate_dtype,
    as_weights,
    check_float,
    interpreter_tiles,
    new_output,
    next_pow2,
    on_input_device,
    scalar_as,
)
from .pairwise_similarity_kl import (
    GramConfig,
    dot_precision,
    dot_tiles,
    gram_backward_config,
    gram_config,
    gram_tile,
    hf_rows,
    launch_gram,
    stencil_panel,
)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N"])
def _hf_gram_backward_kernel(g_ptr, gi_ptr, gs_ptr, x_ptr, t_ptr, sw_ptr, out_ptr, wa: tl.float64, wb: tl.float64,
                             wc: tl.float64, wd: tl.float64, N, chunks_w, h, w,
                             s_g0, s_g1, s_gi0, s_gi1, s_n, s_c, s_h, s_w, t_n, t_c, t_h, t_w, s_out,
                             DS: tl.constexpr, TARGET: tl.constexpr, SSE_W: tl.constexpr, COMPUTE: tl.constexpr,
                             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """grad_x blocks at positions P of samples R: (sum_k (g[R, k] + g[k, R]) hf[k, P]) * (wa, wb, wc, wd).

    ``DS`` (the one-pass DomainStudio backward): plus ``(Gi + Giᵀ) x`` at those pixels (Gi at gi_ptr, from
    the input rows loaded for hf) and ``2 g_sse (hf(x) - hf(t))[R, P] * (wa, wb, wc, wd)`` (g_sse at gs_ptr;
    ``hf(x)`` without TARGET), row r's times its weight ``sw_ptr[r]`` with ``SSE_W`` (per-sample weights of the
    hf-MSE, any float dtype).
    """
    # 1-D grid, row tiles fastest: the row tiles of one position panel run together and share x in L2
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(N, BLOCK_M)
    kb = pid // m_tiles  # the position chunk: BLOCK_P consecutive positions of one hf row
    pid_m = pid - kb * m_tiles
    wa = scalar_as(wa, COMPUTE)
    wb = scalar_as(wb, COMPUTE)
    wc = scalar_as(wc, COMPUTE)
    wd = scalar_as(wd, COMPUTE)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=COMPUTE)
    if DS:  # (Gi + Giᵀ) x at the two input rows of the positions
        img_top = tl.zeros((BLOCK_M, 2 * BLOCK_P), dtype=COMPUTE)
        img_bottom = tl.zeros((BLOCK_M, 2 * BLOCK_P), dtype=COMPUTE)
    for k0 in range(0, N, BLOCK_K):
        k = k0 + ks
        k_mask = k < N
        gm = row_mask[:, None] & k_mask[None, :]
        m = tl.load(g_ptr + rows[:, None] * s_g0 + k[None, :] * s_g1, mask=gm, other=0.0).to(COMPUTE)
        m += tl.load(g_ptr + k[None, :] * s_g0 + rows[:, None] * s_g1, mask=gm, other=0.0).to(COMPUTE)
        top, bottom = hf_rows(x_ptr, k.to(tl.int64) * s_n, k_mask, kb, chunks_w, h, w, s_c, s_h, s_w, BLOCK_P)
        hf = stencil_panel(top, bottom, wa, wb, wc, wd, COMPUTE, BLOCK_P)
        acc = tl.dot(m, hf, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        if DS:
            mi = tl.load(gi_ptr + rows[:, None] * s_gi0 + k[None, :] * s_gi1, mask=gm, other=0.0).to(COMPUTE)
            mi += tl.load(gi_ptr + k[None, :] * s_gi0 + rows[:, None] * s_gi1, mask=gm, other=0.0).to(COMPUTE)
            img_top = tl.dot(mi, top.to(COMPUTE), img_top, input_precision=PRECISION, out_dtype=acc.dtype)
            img_bottom = tl.dot(mi, bottom.to(COMPUTE), img_bottom, input_precision=PRECISION, out_dtype=acc.dtype)
    if DS:  # the hf-MSE term of this program's own rows
        own = rows.to(tl.int64)
        top, bottom = hf_rows(x_ptr, own * s_n, row_mask, kb, chunks_w, h, w, s_c, s_h, s_w, BLOCK_P)
        diff = stencil_panel(top, bottom, wa, wb, wc, wd, COMPUTE, BLOCK_P)
        if TARGET:
            t_top, t_bottom = hf_rows(t_ptr, own * t_n, row_mask, kb, chunks_w, h, w, t_c, t_h, t_w, BLOCK_P)
            diff -= stencil_panel(t_top, t_bottom, wa, wb, wc, wd, COMPUTE, BLOCK_P)
        g_sse = 2 * tl.load(gs_ptr).to(COMPUTE)
        if SSE_W:  # a weight of 1 leaves 2 g_sse, and so the gradient, as it is
            acc += (g_sse * tl.load(sw_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE))[:, None] * diff
        else:
            acc += g_sse * diff
    # grad_x is a fresh contiguous (N, C, 2h, 2w) tensor: the blocks of hf row (c, y) are output rows
    # 2y and 2y + 1 of plane c, each written as one contiguous run of 2*BLOCK_P pixels.
    row = kb // chunks_w
    xc = kb - row * chunks_w
    c = row // h
    y = row - c * h
    cols = xc * (2 * BLOCK_P) + tl.arange(0, 2 * BLOCK_P)
    row_stride = 2 * w.to(tl.int64)
    base = rows.to(tl.int64) * s_out + c.to(tl.int64) * (2 * h) * row_stride + 2 * y * row_stride
    ptr = out_ptr + base[:, None] + cols[None, :]
    mask = row_mask[:, None] & (cols < 2 * w)[None, :]
    dtype = out_ptr.dtype.element_ty
    top = tl.reshape(tl.join(acc * wa, acc * wb), (BLOCK_M, 2 * BLOCK_P))
    bottom = tl.reshape(tl.join(acc * wc, acc * wd), (BLOCK_M, 2 * BLOCK_P))
    if DS:
        top += img_top
        bottom += img_bottom
    tl.store(ptr, top.to(dtype), mask=mask)
    tl.store(ptr + row_stride, bottom.to(dtype), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _check_x(x: torch.Tensor, name: str) -> None:
    check_float(x, name)
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"{name}: expected (N, C, H, W) with H and W even, got {tuple(x.shape)}")


def _compute_tl(dtype: torch.dtype):
    return tl.float64 if accumulate_dtype(dtype) == torch.float64 else tl.float32


def _row_block(w: int, default: int) -> int:
    """Positions per K block (one hf row segment); under the interpreter the whole row (few programs)."""
    return max(16, min(2048, next_pow2(w))) if interpreter_tiles() else default


def ds_tile(n: int) -> int:
    """Output tile edge of the one-pass DomainStudio forward (see :func:`hf_gram_config`)."""
    return min(32, gram_tile(n))


def hf_gram_config(n: int, c: int, h: int, w: int, dtype: torch.dtype, device: torch.device, *, ds: bool = False,
                   batches: int = 1) -> GramConfig:
    """Split-K tiling of an hf Gram of ``dtype`` inputs: a K block is ``block_k`` consecutive positions of one hf
    row, ``triton.cdiv(w, block_k)`` blocks per row. ``ds``: the one-pass DomainStudio forward
    (``domainstudio_grams``) of ``batches`` batches; False for ``hf_gram``."""
    operand = _compute_tl(dtype)
    ds_dtype = dtype if ds else None
    # The one-pass DomainStudio forward also holds the image Gram tile and both tiles' input rows: tiles
    # of at most 32 and K = 16 (tl.dot's minimum) keep it in the register file (64-wide fp32 tiles spill).
    block_n = ds_tile(n) if ds else gram_tile(n)
    # 64-wide tiles take K = 16: the de-interleaved [64, 2K] row runs stay within ~100 KB of shared memory
    block_k = _row_block(w, 16 if block_n == 64 or ds else dot_tiles(block_n, operand)[0])
    # bytes a diagonal tile pair reads per K block: two input rows of 2*block_k pixels per sample
    k_block_bytes = min(n, block_n) * 4 * block_k * dtype.itemsize
    cfg = gram_config(n, c * h * triton.cdiv(w, block_k), block_k, operand, device, block_n=block_n,
                      k_block_bytes=k_block_bytes, grams=2 if ds else 1, batches=batches)
    if ds_dtype == torch.float32:  # both Grams' operands in 3xTF32: 8 warps share them (4 spill at N = 2048)
        cfg = dataclasses.replace(cfg, num_warps=8)
    if ds_dtype in (torch.float16, torch.bfloat16) and n > block_n:
        # several tiles: a third stage of both tiles' input rows spilled 8 B at N = 1024 (sm_80)
        cfg = dataclasses.replace(cfg, num_stages=min(2, cfg.num_stages))
    elif not ds and block_n <= 32:
        # K steps unpipelined: a prefetched step spilled 8-16 B (sm_90 fp32/bf16/fp16 on Triton 3.9, fp64 on
        # Triton 3.6); 32-wide tiles on 8 warps: with 4, the split sum after the K loop spilled 8 B (sm_90,
        # bf16/fp16/fp64, Triton 3.9)
        cfg = dataclasses.replace(cfg, num_stages=1, num_warps=8 if block_n == 32 else cfg.num_warps)
    return cfg


@on_input_device
def hf_gram(x: torch.Tensor, weights) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, N) = gram(high_frequency(x, weights).reshape(N, -1))``, fused."""
    _check_x(x, "hf_gram")
    n, c, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    out = new_output((n, n), accumulate_dtype(x.dtype), x.device)
    if n == 0:
        return out
    if c * h * w == 0:
        return out.zero_()
    cfg = hf_gram_config(n, c, h, w, x.dtype, x.device)
    s_n, s_c, s_h, s_w = x.stride()
    launch_gram(x, cfg, out.view(1, n, n), _compute_tl(x.dtype), s_n=s_n,
                hf_geometry=(triton.cdiv(w, cfg.block_k), h, w, s_c, s_h, s_w), weights=as_weights(weights))
    return out


def launch_hf_gram_backward(grad_gram: torch.Tensor, x: torch.Tensor, weights, out: torch.Tensor, *,
                            grad_image=None, grad_sse=None, target=None, sse_weights=None) -> torch.Tensor:
    """Run the hf Gram backward kernel into the fresh (N, C, H, W) ``out``; ``grad_image`` (with
    ``grad_sse``, optional ``target`` and per-sample ``sse_weights`` (N,)) makes it the one-pass DomainStudio
    backward."""
    n, c, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    compute = _compute_tl(x.dtype)
    # gram_backward's tiling with half as many positions as it has columns (a position is 4 pixels): at
    # N=16, 3x256x256 that is ~6 programs per H100 SM. A position block is one segment of an hf row.
    cfg = gram_backward_config(n, c * h * w, x.dtype, x.device)
    ds = grad_image is not None
    # The one-pass DomainStudio backward holds two more [block_m, 2 * block_p] accumulators (the image
    # term at both input rows): half the positions per program (a quarter with 32-row tiles) keeps it
    # within the register file, with 8 warps to share them (4 spill in some sm_90 fp32/fp64 launches)
    # and no prefetched K step in fp64 (sm_90 spills at 255 registers).
    if ds:
        block_p = _row_block(w, max(16, cfg.block_d // (8 if cfg.block_m == 32 else 4)))  # tl.dot's minimum N is 16
        cfg = dataclasses.replace(cfg, num_warps=8, num_stages=1 if compute == tl.float64 else cfg.num_stages)
    else:
        block_p = _row_block(w, cfg.block_d // 2)
        if cfg.block_m == 32:  # N = 17..32: two K steps, and prefetching the second one spills on sm_80
            cfg = dataclasses.replace(cfg, num_stages=1)
    chunks_w = triton.cdiv(w, block_p)
    grid = (triton.cdiv(n, cfg.block_m) * c * h * chunks_w,)
    gi = grad_image if ds else grad_gram
    t = x if target is None else target
    _hf_gram_backward_kernel[grid](
        grad_gram, gi, grad_sse if ds else grad_gram, x, t, grad_gram if sse_weights is None else sse_weights, out,
        *as_weights(weights), n,
        chunks_w, h, w, grad_gram.stride(0), grad_gram.stride(1), gi.stride(0), gi.stride(1), *x.stride(),
        *(t.stride() if ds else (0, 0, 0, 0)), out.stride(0),
        DS=ds, TARGET=target is not None, SSE_W=ds and sse_weights is not None, COMPUTE=compute,
        PRECISION=dot_precision(compute), BLOCK_M=cfg.block_m, BLOCK_P=block_p, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@on_input_device
def hf_gram_backward(grad_gram: torch.Tensor, x: torch.Tensor, weights) -> torch.Tensor:
    """``(N, N)``, ``(N, C, H, W)`` -> ``(N, C, H, W)`` in the dtype of x:
    ``high_frequency_backward(((g + gᵀ) @ hf(x).reshape(N, -1)).view(N, C, H/2, W/2), weights)``."""
    _check_x(x, "hf_gram_backward")
    check_float(grad_gram, "hf_gram_backward (grad_gram)")
    n, c, hh, ww = x.shape
    if grad_gram.shape != (n, n):
        raise ValueError(f"hf_gram_backward: grad_gram must be ({n}, {n}), got {tuple(grad_gram.shape)}")
    out = new_output((n, c, hh, ww), x.dtype, x.device)
    if out.numel() == 0:
        return out
    return launch_hf_gram_backward(grad_gram, x, weights, out)
