"""Gram matrix ``X Xᵀ`` of a per-sample flattened batch and its backward, as Triton kernels.

The pairwise-similarity KL needs only the N x N Gram matrix of the batch (norms on its diagonal), so
the kernels here are the heavy part of that loss:

* ``gram``: tiles of X Xᵀ with ``tl.dot``. N is small (3 to a few hundred) while D = C*H*W is large,
  so the reduction over D is split ("split-K") across a second grid axis to fill the GPU. Each split
  writes its partial tile into a float32/64 workspace ``(S, N, N)`` and a small second kernel sums the
  splits in a fixed order (deterministic; no atomics, so every output element is written exactly once
  and NaN poisoning stays meaningful). Only the upper-triangular tile pairs are computed; the lower
  half of the output is read from the transposed position of the workspace, so the result is exactly
  symmetric. With a single split the partial kernel writes the output (and its mirror) directly.
* ``gram_backward``: ``(g + gᵀ) X`` as a tiled matmul over (row tiles of N) x (column tiles of D); the
  symmetrised ``g + gᵀ`` is formed on the fly from two loads of g.

fp32 dots use ``input_precision="ieee"`` (TF32 would break 1e-5 accuracy); fp16/bf16 operands go to the
tensor cores natively (their products are exact in fp32, accumulation is fp32); fp64 stays fp64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import (accumulate_dtype, check_float, interpreter_tiles, interpreting, multiprocessor_count, new_output,
                      next_pow2)


# --------------------------------------------------------------------------------------------------
# Heuristics (no multi-config autotune: it needs a GPU and adds first-call latency)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GramConfig:
    block_n: int      # square output tile (rows and columns of the N x N result)
    block_k: int      # reduction chunk along D per tl.dot
    splits: int       # number of split-K slices
    k_blocks_per_split: int
    num_warps: int


def gram_tile(n: int) -> int:
    """Output tile edge: the smallest of 16/32/64 covering N (tl.dot needs >= 16)."""
    return min(64, max(16, next_pow2(n)))


def split_k(n_tiles_pairs: int, k_blocks: int, device: torch.device, min_k_blocks: int = 1) -> tuple[int, int]:
    """(splits, k_blocks_per_split): about two programs per SM in total, at least min_k_blocks each."""
    target = 2 * multiprocessor_count(device)
    splits = max(1, min(triton.cdiv(target, max(1, n_tiles_pairs)), triton.cdiv(k_blocks, min_k_blocks)))
    per = triton.cdiv(k_blocks, splits)
    return triton.cdiv(k_blocks, per), per


def dot_tiles(block_n: int, dtype: torch.dtype, native_16bit: bool) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of an X Xᵀ tile.

    fp32 "ieee" (and fp64) dots run on the FMA units, where every thread keeps the whole K extent of
    its operand rows and columns in registers: K stays small (16-32) and bigger tiles get more warps
    so the per-thread share stays ~100-130 registers. 16-bit operands go through tensor-core MMA
    layouts and take K = 64.
    """
    if native_16bit:
        return 64, 4 if block_n <= 32 else 8
    block_k = 32 if block_n == 16 and dtype != torch.float64 else 16
    return block_k, 4 if block_n == 16 else 8


def gram_config(n: int, d: int, dtype: torch.dtype, device: torch.device) -> GramConfig:
    block_n = gram_tile(n)
    block_k, num_warps = dot_tiles(block_n, dtype, dot_operand_dtype(dtype) in (tl.float16, tl.bfloat16))
    if interpreter_tiles():
        block_k = min(2048, max(16, next_pow2(d)))
    tiles = triton.cdiv(n, block_n)
    k_blocks = max(1, triton.cdiv(d, block_k))
    splits, per = split_k(tiles * (tiles + 1) // 2, k_blocks, device, min_k_blocks=4)
    return GramConfig(block_n, block_k, splits, per, num_warps)


@dataclass(frozen=True)
class GramBackwardConfig:
    block_m: int      # rows of N per program
    block_d: int      # columns of D per program
    block_k: int      # chunk of N reduced per tl.dot
    num_warps: int


def gram_backward_config(n: int, d: int, dtype: torch.dtype, device: torch.device) -> GramBackwardConfig:
    """(g + gᵀ) X on the FMA units: K chunks of 16, ~16 accumulators per thread."""
    block_m = gram_tile(n)
    block_d = {16: 128, 32: 128, 64: 64}[block_m]
    if dtype == torch.float64:
        block_d //= 2
    num_warps = 4 if block_m * block_d <= 2048 else 8
    if interpreter_tiles():
        block_d = min(4096, max(16, next_pow2(d)))
    return GramBackwardConfig(block_m, block_d, 16, num_warps)


def dot_operand_dtype(dtype: torch.dtype):
    """What tl.dot multiplies: fp16/bf16 natively on a GPU (the interpreter has no bf16 math), else fp32/fp64."""
    if dtype == torch.float64:
        return tl.float64
    if dtype == torch.float16:
        return tl.float16  # a no-op cast: the loaded values go to the tensor cores as they are
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _gram_tile_acc(x_ptr, rows_i, rows_j, D, s_d, kb_start, kb_end, acc,
                   SYMMETRIC: tl.constexpr, OPERAND: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += X[rows_i, K] X[rows_j, K]ᵀ over the K blocks [kb_start, kb_end); rows_* are int64 row offsets."""
    ks = tl.arange(0, BLOCK_K)
    for kb in range(kb_start, kb_end):
        k = kb * BLOCK_K + ks
        k_mask = k < D
        a = tl.load(x_ptr + rows_i[:, None] + (k * s_d)[None, :], mask=k_mask[None, :], other=0.0)
        a = a.to(OPERAND)
        if SYMMETRIC:
            acc = tl.dot(a, tl.trans(a), acc, input_precision="ieee")
        else:
            b = tl.load(x_ptr + rows_j[:, None] + (k * s_d)[None, :], mask=k_mask[None, :], other=0.0)
            b = b.to(OPERAND)
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return acc


@triton.jit
def _gram_partial_kernel(x_ptr, out_ptr, N, D, s_n, s_d, k_blocks, k_blocks_per_split, n_tiles,
                         OPERAND: tl.constexpr, ACC: tl.constexpr, DIRECT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    ti = pid_t // n_tiles
    tj = pid_t - ti * n_tiles
    if ti <= tj:  # upper-triangular tile pairs only; the lower half is the mirror
        ri = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tj * BLOCK_N + tl.arange(0, BLOCK_N)
        # Out-of-range rows are clamped to row 0 (their results are masked out at the store), so the
        # operand loads need only the K mask.
        rows_i = tl.where(ri < N, ri, 0).to(tl.int64) * s_n
        rows_j = tl.where(rj < N, rj, 0).to(tl.int64) * s_n
        kb_start = split * k_blocks_per_split
        kb_end = tl.minimum(kb_start + k_blocks_per_split, k_blocks)
        acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=ACC)
        if ti == tj:
            acc = _gram_tile_acc(x_ptr, rows_i, rows_j, D, s_d, kb_start, kb_end, acc, True, OPERAND, BLOCK_K)
        else:
            acc = _gram_tile_acc(x_ptr, rows_i, rows_j, D, s_d, kb_start, kb_end, acc, False, OPERAND, BLOCK_K)
        mask = (ri[:, None] < N) & (rj[None, :] < N)
        if DIRECT:
            # single split: write the output tile and, off the diagonal, its mirror
            tl.store(out_ptr + ri[:, None] * N + rj[None, :], acc, mask=mask)
            if ti != tj:
                tl.store(out_ptr + rj[None, :] * N + ri[:, None], acc, mask=mask)
        else:
            base = out_ptr + split.to(tl.int64) * N * N
            tl.store(base + ri[:, None] * N + rj[None, :], acc, mask=mask)


@triton.jit
def _gram_reduce_kernel(ws_ptr, out_ptr, N, splits, TILE: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    """out[r, c] = sum over splits of ws[s, r, c] (upper tile pairs) or ws[s, c, r] (lower ones), in order."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < N * N
    r = e // N
    c = e - r * N
    src = tl.where(r // TILE > c // TILE, c * N + r, e)
    acc = tl.zeros((BLOCK_E,), dtype=out_ptr.dtype.element_ty)
    ss = tl.arange(0, BLOCK_S)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + ss
        mask = (s[:, None] < splits) & e_mask[None, :]
        v = tl.load(ws_ptr + s[:, None].to(tl.int64) * N * N + src[None, :], mask=mask, other=0.0)
        acc += tl.sum(v, axis=0)
    tl.store(out_ptr + e, acc, mask=e_mask)


@triton.jit
def _gram_backward_kernel(g_ptr, x_ptr, out_ptr, N, D, s_g0, s_g1, s_n, s_d,
                          ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """out[rows, cols] = sum_k (g[rows, k] + g[k, rows]) x[k, cols]."""
    # 1-D grid, row tiles fastest: the row tiles of one column panel run together and share it in L2
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(N, BLOCK_M)
    pid_d = pid // m_tiles
    pid_m = pid - pid_d * m_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < D
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for k0 in range(0, N, BLOCK_K):
        k = k0 + ks
        k_mask = k < N
        gm = row_mask[:, None] & k_mask[None, :]
        m = tl.load(g_ptr + rows[:, None] * s_g0 + k[None, :] * s_g1, mask=gm, other=0.0).to(ACC)
        m += tl.load(g_ptr + k[None, :] * s_g0 + rows[:, None] * s_g1, mask=gm, other=0.0).to(ACC)
        xv = tl.load(x_ptr + k[:, None].to(tl.int64) * s_n + (cols * s_d)[None, :],
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0).to(ACC)
        acc = tl.dot(m, xv, acc, input_precision="ieee")
    out_offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _acc_tl(dtype: torch.dtype):
    return tl.float64 if accumulate_dtype(dtype) == torch.float64 else tl.float32


def launch_gram_reduce(ws: torch.Tensor, out: torch.Tensor, tile: int) -> None:
    """Sum the (S, N, N) split-K workspace (upper tile pairs filled) into the symmetric (N, N) out."""
    splits, n, _ = ws.shape
    block_e = min(256, next_pow2(n * n))
    block_s = min(32, next_pow2(splits))
    grid = (triton.cdiv(n * n, block_e),)
    _gram_reduce_kernel[grid](ws, out, n, splits, TILE=tile, BLOCK_E=block_e, BLOCK_S=block_s, num_warps=4)


def gram(x: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` (or ``(N, ...)``, flattened per sample) -> ``(N, N) = x @ x.T``, float32 (float64 for float64)."""
    check_float(x, "gram")
    if x.dim() == 0:
        raise ValueError("gram: expected (N, D)")
    flat = x.reshape(x.shape[0], -1)
    n, d = flat.shape
    acc_dtype = accumulate_dtype(x.dtype)
    out = new_output((n, n), acc_dtype, x.device)
    if n == 0:
        return out
    if d == 0:
        return out.zero_()
    cfg = gram_config(n, d, x.dtype, x.device)
    tiles = triton.cdiv(n, cfg.block_n)
    k_blocks = triton.cdiv(d, cfg.block_k)
    direct = cfg.splits == 1
    target = out if direct else new_output((cfg.splits, n, n), acc_dtype, x.device)
    _gram_partial_kernel[(tiles * tiles, cfg.splits)](
        flat, target, n, d, flat.stride(0), flat.stride(1), k_blocks, cfg.k_blocks_per_split, tiles,
        OPERAND=dot_operand_dtype(x.dtype), ACC=_acc_tl(x.dtype), DIRECT=direct,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    if not direct:
        launch_gram_reduce(target, out, cfg.block_n)
    return out


def gram_backward(grad_gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(N, N)``, ``(N, D)`` -> ``(N, D)`` in the dtype of x: ``(grad_gram + grad_gram.T) @ x``."""
    check_float(x, "gram_backward")
    check_float(grad_gram, "gram_backward (grad_gram)")
    flat = x.reshape(x.shape[0], -1)
    n, d = flat.shape
    if grad_gram.shape != (n, n):
        raise ValueError(f"gram_backward: grad_gram must be ({n}, {n}), got {tuple(grad_gram.shape)}")
    out = new_output((n, d), x.dtype, x.device)
    if out.numel() == 0:
        return out.view(x.shape)
    cfg = gram_backward_config(n, d, x.dtype, x.device)
    grid = (triton.cdiv(n, cfg.block_m) * triton.cdiv(d, cfg.block_d),)
    _gram_backward_kernel[grid](
        grad_gram, flat, out, n, d, grad_gram.stride(0), grad_gram.stride(1), flat.stride(0), flat.stride(1),
        ACC=_acc_tl(x.dtype), BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps)
    return out.view(x.shape)
