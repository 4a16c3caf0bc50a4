"""Fused high-frequency Gram matrix ``hf(x) hf(x)ᵀ`` and its backward, never materialising ``hf(x)``.

``hf`` is the 2x2 stride-2 stencil ``wa*a + wb*b + wc*c + wd*d`` per block ``[[a, b], [c, d]]`` of each
channel (see :mod:`.high_frequency`); flattened per sample it has ``D = C * H/2 * W/2`` positions.

* ``hf_gram``: the Gram kernel of :mod:`.pairwise_similarity_kl` whose operand loads compute the stencil
  on the fly: a K block is BLOCK_K consecutive hf positions ``p -> (c, y, x)``; for each of them the four
  pixels of the block are loaded (the a/b and c/d pairs share cache sectors, so DRAM traffic is one read
  of x) and combined with the four weights. Split-K over positions into a workspace, upper-triangular
  tile pairs only, deterministic reduce: as ``gram``.
* ``hf_gram_backward``: one program per (row tile of N) x (BLOCK_P positions): it recomputes the hf panel
  of all samples at its positions, multiplies by ``M = g + gᵀ`` with ``tl.dot`` and writes the four
  pixels ``(M hf) * (wa, wb, wc, wd)`` of every block of grad_x. x is read once (for N <= 64) and grad_x
  written once.

All math is fp32 (fp64 for fp64 inputs); the stencil output is not 16-bit exact, so fp16/bf16 inputs
are upcast before the dot and fp32 dots use ``input_precision="ieee"``.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._launch import accumulate_dtype, check_float, interpreter_tiles, new_output, next_pow2, weights_tensor
from .pairwise_similarity_kl import GramConfig, dot_tiles, gram_backward_config, gram_tile, launch_gram_reduce, split_k


# --------------------------------------------------------------------------------------------------
# Heuristics
# --------------------------------------------------------------------------------------------------
def hf_gram_config(n: int, d: int, dtype: torch.dtype, device: torch.device) -> GramConfig:
    """d is the number of hf positions per sample, C * H/2 * W/2. The stencil output is fp32 (fp64), so
    the dots are FMA-unit "ieee" dots (see :func:`.pairwise_similarity_kl.dot_tiles`)."""
    block_n = gram_tile(n)
    block_k, num_warps = dot_tiles(block_n, dtype, False)
    if interpreter_tiles():
        block_k = min(2048, max(16, next_pow2(d)))
    tiles = triton.cdiv(n, block_n)
    k_blocks = max(1, triton.cdiv(d, block_k))
    splits, per = split_k(tiles * (tiles + 1) // 2, k_blocks, device, min_k_blocks=4)
    return GramConfig(block_n, block_k, splits, per, num_warps)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _position_offsets(p, hw, w, s_c, s_h, s_w):
    """Offset of pixel a (top-left of the block) of hf position p = (c, y, x) inside one sample."""
    c = p // hw
    rem = p - c * hw
    y = rem // w
    xx = rem - y * w
    return c.to(tl.int64) * s_c + (2 * y).to(tl.int64) * s_h + (2 * xx).to(tl.int64) * s_w


@triton.jit
def _hf_panel(x_ptr, rows, offs, mask, s_h, s_w, wa, wb, wc, wd, COMPUTE: tl.constexpr):
    """hf values [len(rows), len(offs)]: rows are int64 sample offsets, offs int64 offsets of pixel a."""
    ptr = x_ptr + rows[:, None] + offs[None, :]
    a = tl.load(ptr, mask=mask, other=0.0).to(COMPUTE)
    b = tl.load(ptr + s_w, mask=mask, other=0.0).to(COMPUTE)
    c = tl.load(ptr + s_h, mask=mask, other=0.0).to(COMPUTE)
    d = tl.load(ptr + s_h + s_w, mask=mask, other=0.0).to(COMPUTE)
    return a * wa + b * wb + c * wc + d * wd


@triton.jit
def _hf_tile_acc(x_ptr, rows_i, rows_j, D, hw, w, s_c, s_h, s_w, wa, wb, wc, wd, kb_start, kb_end, acc,
                 SYMMETRIC: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += hf[rows_i, K] hf[rows_j, K]ᵀ over the K blocks [kb_start, kb_end) of hf positions."""
    ks = tl.arange(0, BLOCK_K)
    for kb in range(kb_start, kb_end):
        p = kb * BLOCK_K + ks
        p_mask = p < D
        offs = _position_offsets(p, hw, w, s_c, s_h, s_w)
        a = _hf_panel(x_ptr, rows_i, offs, p_mask[None, :], s_h, s_w, wa, wb, wc, wd, COMPUTE)
        if SYMMETRIC:
            acc = tl.dot(a, tl.trans(a), acc, input_precision="ieee")
        else:
            b = _hf_panel(x_ptr, rows_j, offs, p_mask[None, :], s_h, s_w, wa, wb, wc, wd, COMPUTE)
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return acc


@triton.jit
def _hf_gram_partial_kernel(x_ptr, w_ptr, out_ptr, N, D, hw, w, s_n, s_c, s_h, s_w,
                            k_blocks, k_blocks_per_split, n_tiles,
                            COMPUTE: tl.constexpr, DIRECT: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    ti = pid_t // n_tiles
    tj = pid_t - ti * n_tiles
    if ti <= tj:  # upper-triangular tile pairs only; the lower half is the mirror
        wa = tl.load(w_ptr)
        wb = tl.load(w_ptr + 1)
        wc = tl.load(w_ptr + 2)
        wd = tl.load(w_ptr + 3)
        ri = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tj * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows past N are clamped to sample 0 and masked out at the store
        rows_i = tl.where(ri < N, ri, 0).to(tl.int64) * s_n
        rows_j = tl.where(rj < N, rj, 0).to(tl.int64) * s_n
        kb_start = split * k_blocks_per_split
        kb_end = tl.minimum(kb_start + k_blocks_per_split, k_blocks)
        acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=COMPUTE)
        if ti == tj:
            acc = _hf_tile_acc(x_ptr, rows_i, rows_j, D, hw, w, s_c, s_h, s_w, wa, wb, wc, wd,
                               kb_start, kb_end, acc, True, COMPUTE, BLOCK_K)
        else:
            acc = _hf_tile_acc(x_ptr, rows_i, rows_j, D, hw, w, s_c, s_h, s_w, wa, wb, wc, wd,
                               kb_start, kb_end, acc, False, COMPUTE, BLOCK_K)
        mask = (ri[:, None] < N) & (rj[None, :] < N)
        if DIRECT:
            tl.store(out_ptr + ri[:, None] * N + rj[None, :], acc, mask=mask)
            if ti != tj:
                tl.store(out_ptr + rj[None, :] * N + ri[:, None], acc, mask=mask)
        else:
            base = out_ptr + split.to(tl.int64) * N * N
            tl.store(base + ri[:, None] * N + rj[None, :], acc, mask=mask)


@triton.jit
def _hf_gram_backward_kernel(g_ptr, x_ptr, w_ptr, out_ptr, N, D, hw, w, s_g0, s_g1, s_n, s_c, s_h, s_w,
                             COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """grad_x blocks at positions P of samples R: (sum_k (g[R, k] + g[k, R]) hf[k, P]) * (wa, wb, wc, wd)."""
    # 1-D grid, row tiles fastest: the row tiles of one position panel run together and share x in L2
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(N, BLOCK_M)
    pid_p = pid // m_tiles
    pid_m = pid - pid_p * m_tiles
    wa = tl.load(w_ptr)
    wb = tl.load(w_ptr + 1)
    wc = tl.load(w_ptr + 2)
    wd = tl.load(w_ptr + 3)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < D
    offs = _position_offsets(p, hw, w, s_c, s_h, s_w)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=COMPUTE)
    for k0 in range(0, N, BLOCK_K):
        k = k0 + ks
        k_mask = k < N
        gm = row_mask[:, None] & k_mask[None, :]
        m = tl.load(g_ptr + rows[:, None] * s_g0 + k[None, :] * s_g1, mask=gm, other=0.0).to(COMPUTE)
        m += tl.load(g_ptr + k[None, :] * s_g0 + rows[:, None] * s_g1, mask=gm, other=0.0).to(COMPUTE)
        k_rows = tl.where(k_mask, k, 0).to(tl.int64) * s_n
        hf = _hf_panel(x_ptr, k_rows, offs, k_mask[:, None] & p_mask[None, :], s_h, s_w, wa, wb, wc, wd, COMPUTE)
        acc = tl.dot(m, hf, acc, input_precision="ieee")
    # grad_x is a fresh contiguous (N, C, 2h, 2w) tensor: pixel a of position (c, y, x) sits at
    # c*4hw + 2y*2w + 2x, which _position_offsets gives with strides (4hw, 2w, 1).
    out_offs = rows[:, None].to(tl.int64) * (4 * D) + _position_offsets(p, hw, w, 4 * hw, 2 * w, 1)[None, :]
    mask = row_mask[:, None] & p_mask[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + out_offs, (acc * wa).to(dtype), mask=mask)
    tl.store(out_ptr + out_offs + 1, (acc * wb).to(dtype), mask=mask)
    tl.store(out_ptr + out_offs + 2 * w, (acc * wc).to(dtype), mask=mask)
    tl.store(out_ptr + out_offs + 2 * w + 1, (acc * wd).to(dtype), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _check_x(x: torch.Tensor, name: str) -> None:
    check_float(x, name)
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"{name}: expected (N, C, H, W) with H and W even, got {tuple(x.shape)}")


def _compute_tl(dtype: torch.dtype):
    return tl.float64 if accumulate_dtype(dtype) == torch.float64 else tl.float32


def hf_gram(x: torch.Tensor, weights) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, N) = gram(high_frequency(x, weights).reshape(N, -1))``, fused."""
    _check_x(x, "hf_gram")
    n, c, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    d = c * h * w
    acc_dtype = accumulate_dtype(x.dtype)
    out = new_output((n, n), acc_dtype, x.device)
    if n == 0:
        return out
    if d == 0:
        return out.zero_()
    wt = weights_tensor(weights, x.device, x.dtype)
    cfg = hf_gram_config(n, d, x.dtype, x.device)
    tiles = triton.cdiv(n, cfg.block_n)
    k_blocks = triton.cdiv(d, cfg.block_k)
    direct = cfg.splits == 1
    target = out if direct else new_output((cfg.splits, n, n), acc_dtype, x.device)
    _hf_gram_partial_kernel[(tiles * tiles, cfg.splits)](
        x, wt, target, n, d, h * w, w, *x.stride(), k_blocks, cfg.k_blocks_per_split, tiles,
        COMPUTE=_compute_tl(x.dtype), DIRECT=direct, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps)
    if not direct:
        launch_gram_reduce(target, out, cfg.block_n)
    return out


def hf_gram_backward(grad_gram: torch.Tensor, x: torch.Tensor, weights) -> torch.Tensor:
    """``(N, N)``, ``(N, C, H, W)`` -> ``(N, C, H, W)`` in the dtype of x:
    ``high_frequency_backward(((g + gᵀ) @ hf(x).reshape(N, -1)).view(N, C, H/2, W/2), weights)``."""
    _check_x(x, "hf_gram_backward")
    check_float(grad_gram, "hf_gram_backward (grad_gram)")
    n, c, hh, ww = x.shape
    if grad_gram.shape != (n, n):
        raise ValueError(f"hf_gram_backward: grad_gram must be ({n}, {n}), got {tuple(grad_gram.shape)}")
    h, w = hh // 2, ww // 2
    d = c * h * w
    out = new_output((n, c, hh, ww), x.dtype, x.device)
    if out.numel() == 0:
        return out
    wt = weights_tensor(weights, x.device, x.dtype)
    # Same tiling as gram_backward: block_d counts hf positions here.
    cfg = gram_backward_config(n, d, x.dtype, x.device)
    grid = (triton.cdiv(n, cfg.block_m) * triton.cdiv(d, cfg.block_d),)
    _hf_gram_backward_kernel[grid](
        grad_gram, x, wt, out, n, d, h * w, w, grad_gram.stride(0), grad_gram.stride(1), *x.stride(),
        COMPUTE=_compute_tl(x.dtype), BLOCK_M=cfg.block_m, BLOCK_P=cfg.block_d,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    return out
