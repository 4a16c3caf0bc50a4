"""Gram matrix ``X Xᵀ`` of a per-sample flattened batch and its backward, as Triton kernels.

The pairwise-similarity KL needs only the N x N Gram matrix of the batch (norms on its diagonal), so
the kernels here are the heavy part of that loss:

* ``gram``: tiles of X Xᵀ with ``tl.dot``. N is small (3 to a few hundred) while D = C*H*W is large,
  so the reduction over D is split ("split-K") across a second grid axis, sized by bytes (each split
  reads at least 32 KB, see :func:`split_k`). Each split writes its partial tile into a float32/64
  workspace and takes a ticket (an atomic counter per tile pair); the split that draws the last ticket
  sums the workspace in split order -- deterministic, whichever split finished last -- and writes the
  output, so the whole Gram is one launch (plus the tickets' memset). The same kernel, with ``HF=True``,
  is the Gram of hf(x) (:mod:`.hf_pairwise_similarity_kl`): only the operand loads differ
  (:func:`panel_block`); with ``DS`` it is the one-pass DomainStudio forward of one or two batches
  (:mod:`.domainstudio_loss`). Only the upper-triangular tile pairs are computed and each is written with
  its mirror, so the result is exactly symmetric. Rows past N are masked (read as zero), not clamped.
* ``gram_backward``: ``(g + gᵀ) X`` as a tiled matmul over (row tiles of N) x (column tiles of D); the
  symmetrised ``g + gᵀ`` is formed on the fly from two loads of g.

All dots run on the tensor cores: fp32 operands as 3xTF32 (``input_precision="tf32x3"``: plain TF32
would break the 1e-5 accuracy, 3xTF32 keeps fp32's, see tests/test_tf32x3_accuracy.py); fp16/bf16
operands natively (their products are exact in fp32, accumulation is fp32); fp64 as fp64 (DMMA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import triton_interpreter_enabled
from ._launch import (
    accumulate_dtype,
    check_float,
    interpreter_tiles,
    multiprocessor_count,
    new_output,
    next_pow2,
    on_input_device,
    scalar_as,
)


# --------------------------------------------------------------------------------------------------
# Heuristics (no multi-config autotune: it needs a GPU and adds first-call latency)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GramConfig:
    block_n: int      # square output tile (rows and columns of the N x N result)
    block_k: int      # reduction chunk along D per tl.dot
    k_blocks: int     # K blocks in all
    splits: int       # number of split-K slices
    k_blocks_per_split: int
    num_warps: int
    num_stages: int   # software-pipeline depth of the K loop (1 when it runs once)


def gram_tile(n: int) -> int:
    """Output tile edge: the smallest of 16/32/64 covering N (tl.dot needs >= 16)."""
    return min(64, max(16, next_pow2(n)))


CTA_BYTES = 32 * 1024  # the least a split reads: below that, a CTA is mostly launch and reduction overhead


def split_k(pairs: int, k_blocks: int, k_block_bytes: int, ws_bytes: int, device: torch.device,
            min_k_blocks: int = 1) -> tuple[int, int]:
    """(splits, k_blocks_per_split) of a reduction over ``k_blocks`` K blocks, sized by bytes.

    ``pairs``: programs per split (tile pairs x batches); ``k_block_bytes``: what one program reads per K
    block; ``ws_bytes``: its partial result, which the last program of a tile pair reads back once per split.
    The splits are the fewest of: at least CTA_BYTES read per split; no more partial bytes for the last
    program to sum than a split reads (splits <= sqrt(bytes / ws_bytes)); about two programs per SM in all.
    """
    total = k_blocks * k_block_bytes
    splits = min(total // CTA_BYTES, math.isqrt(total // max(1, ws_bytes)),
                 triton.cdiv(2 * multiprocessor_count(device), max(1, pairs)), k_blocks // max(1, min_k_blocks))
    per = triton.cdiv(k_blocks, max(1, splits))
    return triton.cdiv(k_blocks, per), per


def pipeline_stages(trips: int) -> int:
    """Software-pipeline stages for a loop of ``trips`` iterations: none to overlap in a one-trip loop."""
    return max(1, min(3, trips))


def dot_precision(operand) -> str:
    """``input_precision`` of tl.dot: fp32 operands use 3xTF32 on the tensor cores (hi*hi + hi*lo + lo*hi,
    error ~fp32's; checked against float64 by tests/test_tf32x3_accuracy.py), others multiply natively."""
    return "tf32x3" if operand == tl.float32 else "ieee"


def dot_tiles(block_n: int, operand) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of an X Xᵀ tile on the tensor cores: K = 64 for 16-bit operands, 32 for fp32
    (3xTF32 triples the operand registers), 16 for fp64 (DMMA); 8 warps for 64-wide tiles."""
    block_k = {tl.float16: 64, tl.bfloat16: 64, tl.float32: 32}.get(operand, 16)
    return block_k, 4 if block_n <= 32 else 8


def gram_config(n: int, k_blocks: int, block_k: int, operand, device: torch.device, *, k_block_bytes: int,
                block_n: int | None = None, grams: int = 1, batches: int = 1) -> GramConfig:
    """Split-K tiling of a Gram over ``k_blocks`` K blocks of ``block_k`` (``gram``, ``hf_gram``, the one-pass
    DomainStudio forward); ``k_block_bytes``: what a diagonal tile pair reads per K block; ``block_n``: the
    output tile edge, :func:`gram_tile` by default; ``grams`` per program (partials), ``batches`` per launch."""
    block_n = block_n or gram_tile(n)
    num_warps = dot_tiles(block_n, operand)[1]
    if operand == tl.float64 and grams > 1:
        num_warps = 8  # two fp64 accumulator tiles per program: 4 warps ran out of registers (Triton 3.6, sm_80)
    tiles = triton.cdiv(n, block_n)
    ws_bytes = grams * block_n * block_n * (8 if operand == tl.float64 else 4)
    splits, per = split_k(batches * tiles * (tiles + 1) // 2, k_blocks, k_block_bytes, ws_bytes, device,
                          min_k_blocks=2)
    return GramConfig(block_n, block_k, k_blocks, splits, per, num_warps, pipeline_stages(per))


@dataclass(frozen=True)
class GramBackwardConfig:
    block_m: int      # rows of N per program
    block_d: int      # columns of D per program
    block_k: int      # chunk of N reduced per tl.dot
    num_warps: int
    num_stages: int


def gram_backward_config(n: int, d: int, dtype: torch.dtype, device: torch.device) -> GramBackwardConfig:
    """(g + gᵀ) X: K chunks of 16 samples, [block_m, block_d] accumulator tiles on the tensor cores."""
    block_m = gram_tile(n)
    block_d = {16: 128, 32: 128, 64: 64}[block_m]
    if dtype == torch.float64:
        block_d //= 2
    num_warps = 4 if block_m * block_d <= 2048 else 8
    if interpreter_tiles():
        block_d = min(4096, max(16, next_pow2(d)))
    return GramBackwardConfig(block_m, block_d, 16, num_warps, pipeline_stages(triton.cdiv(n, 16)))


def dot_operand_dtype(dtype: torch.dtype):
    """What tl.dot multiplies: fp16/bf16 natively on a GPU (the interpreter has no bf16 math), else fp32/fp64."""
    if dtype == torch.float64:
        return tl.float64
    if dtype == torch.float16:
        return tl.float16  # a no-op cast: the loaded values go to the tensor cores as they are
    if dtype == torch.bfloat16 and not triton_interpreter_enabled():
        return tl.bfloat16
    return tl.float32


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def hf_rows(x_ptr, rows, row_mask, kb, chunks_w, h, w, s_c, s_h, s_w, BLOCK_K: tl.constexpr):
    """The two input rows under K block kb of hf positions, as stored: ([len(rows), 2*BLOCK_K],) * 2.

    Block kb is BLOCK_K consecutive positions of one hf row (plane c, row y, chunk kb % chunks_w) of the
    samples ``rows`` (int64 offsets; zero where ``row_mask`` is off); its input rows 2y and 2y + 1 are read
    as contiguous runs of 2*BLOCK_K pixels (wide vector loads), zero past the row end.
    """
    row = kb // chunks_w
    xc = kb - row * chunks_w
    c = row // h
    y = row - c * h
    cols = xc * (2 * BLOCK_K) + tl.arange(0, 2 * BLOCK_K)
    base = c.to(tl.int64) * s_c + (2 * y).to(tl.int64) * s_h
    ptr = x_ptr + rows[:, None] + base + (cols * s_w)[None, :]
    mask = row_mask[:, None] & (cols < 2 * w)[None, :]
    return tl.load(ptr, mask=mask, other=0.0), tl.load(ptr + s_h, mask=mask, other=0.0)


@triton.jit
def stencil_panel(top, bottom, wa, wb, wc, wd, OPERAND: tl.constexpr, BLOCK_K: tl.constexpr):
    """hf positions [rows, BLOCK_K] of two input rows [rows, 2*BLOCK_K] (hf_rows): ``wa*a + wb*b + wc*c + wd*d``
    of each 2x2 block, the pixels de-interleaved in registers."""
    a, b = tl.split(tl.reshape(top.to(OPERAND), (top.shape[0], BLOCK_K, 2)))
    c, d = tl.split(tl.reshape(bottom.to(OPERAND), (bottom.shape[0], BLOCK_K, 2)))
    return a * wa + b * wb + c * wc + d * wd


@triton.jit
def panel_block(x_ptr, rows, row_mask, kb, D, s_d, chunks_w, h, w, s_c, s_h, s_w, wa, wb, wc, wd,
                HF: tl.constexpr, OPERAND: tl.constexpr, BLOCK_K: tl.constexpr):
    """K block kb of the Gram operand of samples ``rows`` (int64 offsets, zero off ``row_mask``): [len(rows), BLOCK_K].

    ``HF=False``: columns [kb*BLOCK_K, +BLOCK_K) of the flattened (N, D) x. ``HF=True``: BLOCK_K
    consecutive hf positions of one hf row (:func:`hf_rows`, :func:`stencil_panel`).
    """
    if HF:
        top, bottom = hf_rows(x_ptr, rows, row_mask, kb, chunks_w, h, w, s_c, s_h, s_w, BLOCK_K)
        panel = stencil_panel(top, bottom, wa, wb, wc, wd, OPERAND, BLOCK_K)
    else:
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (k < D)[None, :]
        panel = tl.load(x_ptr + rows[:, None] + (k * s_d)[None, :], mask=mask, other=0.0).to(OPERAND)
    return panel


@triton.jit
def _dot_nt(a, b, acc, OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a bᵀ with both operands as OPERAND."""
    return tl.dot(a.to(OPERAND), tl.trans(b.to(OPERAND)), acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _gram_tile_acc(x_ptr, t_ptr, rows_i, rows_j, mask_i, mask_j, t_rows, t_mask, D, s_d, chunks_w, h, w, s_c, s_h,
                   s_w, t_c, t_h, t_w, wa, wb, wc, wd, kb_start, kb_end, acc, img, sse,
                   SYMMETRIC: tl.constexpr, HF: tl.constexpr, DS: tl.constexpr, TARGET: tl.constexpr,
                   OPERAND: tl.constexpr, PRECISION: tl.constexpr, IMG_OPERAND: tl.constexpr,
                   IMG_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += P[rows_i, K] P[rows_j, K]ᵀ over the K blocks [kb_start, kb_end) of the operand P (panel_block).

    Rows off their mask read as zero. ``DS`` (with HF): also img += x[rows_i] x[rows_j]ᵀ over the pixels
    under those blocks (the two input rows already loaded for P) and, in a SYMMETRIC (diagonal) tile,
    sse += (P - hf(t))² elementwise (the target rows read where ``t_mask``, else P²).
    """
    for kb in range(kb_start, kb_end):
        if DS:
            top, bottom = hf_rows(x_ptr, rows_i, mask_i, kb, chunks_w, h, w, s_c, s_h, s_w, BLOCK_K)
            a = stencil_panel(top, bottom, wa, wb, wc, wd, OPERAND, BLOCK_K)
        else:
            a = panel_block(x_ptr, rows_i, mask_i, kb, D, s_d, chunks_w, h, w, s_c, s_h, s_w, wa, wb, wc, wd, HF,
                            OPERAND, BLOCK_K)
        if SYMMETRIC:
            acc = _dot_nt(a, a, acc, OPERAND, PRECISION)
            if DS:
                img = _dot_nt(top, top, img, IMG_OPERAND, IMG_PRECISION)
                img = _dot_nt(bottom, bottom, img, IMG_OPERAND, IMG_PRECISION)
                diff = a
                if TARGET:
                    t_top, t_bottom = hf_rows(t_ptr, t_rows, t_mask, kb, chunks_w, h, w, t_c, t_h, t_w, BLOCK_K)
                    diff -= stencil_panel(t_top, t_bottom, wa, wb, wc, wd, OPERAND, BLOCK_K)
                sse += diff * diff
        else:
            if DS:
                top_j, bottom_j = hf_rows(x_ptr, rows_j, mask_j, kb, chunks_w, h, w, s_c, s_h, s_w, BLOCK_K)
                b = stencil_panel(top_j, bottom_j, wa, wb, wc, wd, OPERAND, BLOCK_K)
                img = _dot_nt(top, top_j, img, IMG_OPERAND, IMG_PRECISION)
                img = _dot_nt(bottom, bottom_j, img, IMG_OPERAND, IMG_PRECISION)
            else:
                b = panel_block(x_ptr, rows_j, mask_j, kb, D, s_d, chunks_w, h, w, s_c, s_h, s_w, wa, wb, wc, wd, HF,
                                OPERAND, BLOCK_K)
            acc = _dot_nt(a, b, acc, OPERAND, PRECISION)
    return acc, img, sse


@triton.jit
def _sum_splits(ws_ptr, splits, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Sum of the (splits, BLOCK_N, BLOCK_N) partial tiles at ws_ptr, BLOCK_S splits per trip in index order
    (a fixed order: the result does not depend on which program arrived last). Read past L1 (``.cg``): the
    partials were written by other SMs during this launch."""
    ss = tl.arange(0, BLOCK_S)
    e = tl.arange(0, BLOCK_N)
    tile = e[:, None] * BLOCK_N + e[None, :]
    total = tl.zeros((BLOCK_N, BLOCK_N), dtype=ws_ptr.dtype.element_ty)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + ss
        ptr = ws_ptr + s.to(tl.int64)[:, None, None] * (BLOCK_N * BLOCK_N) + tile[None, :, :]
        total += tl.sum(tl.load(ptr, mask=(s < splits)[:, None, None], other=0.0, cache_modifier=".cg"), axis=0)
    return total


@triton.jit
def _store_gram_tile(out_ptr, tile, ri, rj, N, ti, tj):
    """Tile (ti, tj) of the (N, N) output and, off the diagonal, its mirror (tj, ti)."""
    mask = (ri[:, None] < N) & (rj[None, :] < N)
    tl.store(out_ptr + ri[:, None] * N + rj[None, :], tile, mask=mask)
    if ti != tj:
        tl.store(out_ptr + rj[None, :] * N + ri[:, None], tile, mask=mask)


@triton.jit(do_not_specialize=["N", "D", "k_blocks", "k_blocks_per_split", "n_tiles", "splits", "t_batch"])
def _gram_kernel(x_ptr, y_ptr, t_ptr, ws_ptr, sse_ws_ptr, ticket_ptr, out_ptr, img_ptr, sse_ptr, sw_ptr,
                 wa: tl.float64, wb: tl.float64, wc: tl.float64, wd: tl.float64, N, D, s_n, s_d, chunks_w, h, w, s_c,
                 s_h, s_w, t_n, t_c, t_h, t_w, k_blocks, k_blocks_per_split, n_tiles, splits, t_batch,
                 HF: tl.constexpr, DS: tl.constexpr, TARGET: tl.constexpr, SSE_W: tl.constexpr, OPERAND: tl.constexpr,
                 ACC: tl.constexpr, PRECISION: tl.constexpr, IMG_OPERAND: tl.constexpr, IMG_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """Split ``program_id(1)`` of the Gram tile pair ``program_id(0)`` of batch ``program_id(2)`` (x at
    x_ptr, a second batch of the same layout at y_ptr) -- of x itself (``HF=False``) or of hf(x) -- and, for
    the last split of a tile pair to finish, the sum of all its splits into the output.

    Each split writes its partial tile to the workspace, then takes a ticket (an atomic counter per tile
    pair); the program that draws the last ticket sums the workspace in split order (deterministic) and
    writes the tile and its mirror to ``out_ptr[batch]``, an (N, N) Gram.
    ``DS`` (the one-pass DomainStudio forward, with HF): the same program also accumulates x xᵀ (summed
    likewise into ``img_ptr[batch]``) and, for a diagonal tile, the sum of ``(hf(x) - hf(t))²`` (batch ``t_batch`` with
    TARGET) or ``hf(x)²``, summed like the tiles into ``sse_ptr[batch, ti]``; ``SSE_W``: each sample's part
    of it times its weight ``sw_ptr[sample]`` (per-sample weights of the hf-MSE, any float dtype).
    """
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    batch = tl.program_id(2)
    ti = pid_t // n_tiles
    tj = pid_t - ti * n_tiles
    GRAMS: tl.constexpr = 2 if DS else 1
    if HF:  # the stencil weights (unused by the plain Gram)
        wa = scalar_as(wa, OPERAND)
        wb = scalar_as(wb, OPERAND)
        wc = scalar_as(wc, OPERAND)
        wd = scalar_as(wd, OPERAND)
    if ti <= tj:  # upper-triangular tile pairs only; the lower half is the mirror
        if batch == 0:
            x = x_ptr
        else:
            x = y_ptr
        ri = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tj * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_i = ri < N
        mask_j = rj < N
        rows_i = ri.to(tl.int64) * s_n
        rows_j = rj.to(tl.int64) * s_n
        t_rows = ri.to(tl.int64) * t_n
        kb_start = split * k_blocks_per_split
        kb_end = tl.minimum(kb_start + k_blocks_per_split, k_blocks)
        acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=ACC)
        if DS:
            img = tl.zeros((BLOCK_N, BLOCK_N), dtype=ACC)
            sse = tl.zeros((BLOCK_N, BLOCK_K), dtype=OPERAND)
        else:  # unused by the plain and hf Grams
            img = 0.0
            sse = 0.0
        if ti == tj:
            acc, img, sse = _gram_tile_acc(
                x, t_ptr, rows_i, rows_j, mask_i, mask_j, t_rows, ri < tl.where(batch == t_batch, N, 0), D, s_d, chunks_w,
                h, w, s_c, s_h, s_w, t_c, t_h, t_w, wa, wb, wc, wd, kb_start, kb_end, acc, img, sse, True, HF, DS,
                TARGET, OPERAND, PRECISION, IMG_OPERAND, IMG_PRECISION, BLOCK_K)
        else:
            acc, img, sse = _gram_tile_acc(
                x, t_ptr, rows_i, rows_j, mask_i, mask_j, t_rows, mask_i, D, s_d, chunks_w, h, w, s_c, s_h, s_w,
                t_c, t_h, t_w, wa, wb, wc, wd, kb_start, kb_end, acc, img, sse, False, HF, DS, TARGET, OPERAND,
                PRECISION, IMG_OPERAND, IMG_PRECISION, BLOCK_K)
        # workspace (batch, tile pair, gram, split, BLOCK_N, BLOCK_N); hf-MSE partials (batch, tile pair, split)
        pair = batch * n_tiles * n_tiles + pid_t
        ws = ws_ptr + pair.to(tl.int64) * GRAMS * splits * (BLOCK_N * BLOCK_N)
        e = tl.arange(0, BLOCK_N)
        tile = e[:, None] * BLOCK_N + e[None, :]
        tl.store(ws + split * (BLOCK_N * BLOCK_N) + tile, acc)
        if DS:
            tl.store(ws + (splits + split) * (BLOCK_N * BLOCK_N) + tile, img)
            if ti == tj:
                row_sse = tl.sum(sse, axis=1)
                if SSE_W:  # a weight of 1 leaves the row sums, and so the sum, as they are
                    row_sse *= tl.load(sw_ptr + ri, mask=mask_i, other=0.0).to(row_sse.dtype)
                tl.store(sse_ws_ptr + pair * splits + split, tl.sum(row_sse, axis=0).to(ACC))
        tl.debug_barrier()  # every thread's partial stored before the ticket (released by the atomic)
        if tl.atomic_add(ticket_ptr + pair, 1, sem="acq_rel", scope="gpu") == splits - 1:
            out = batch.to(tl.int64) * N * N
            _store_gram_tile(out_ptr + out, _sum_splits(ws, splits, BLOCK_N, BLOCK_S), ri, rj, N, ti, tj)
            if DS:
                img = _sum_splits(ws + splits * (BLOCK_N * BLOCK_N), splits, BLOCK_N, BLOCK_S)
                _store_gram_tile(img_ptr + out, img, ri, rj, N, ti, tj)
                if ti == tj:
                    s = tl.arange(0, BLOCK_S)
                    part = tl.zeros((BLOCK_S,), dtype=ACC)
                    for s0 in range(0, splits, BLOCK_S):
                        part += tl.load(sse_ws_ptr + pair * splits + s0 + s, mask=s0 + s < splits, other=0.0,
                                        cache_modifier=".cg")
                    tl.store(sse_ptr + batch * n_tiles + ti, tl.sum(part, axis=0))


@triton.jit(do_not_specialize=["N"])
def _gram_backward_kernel(g_ptr, x_ptr, out_ptr, N, D, s_g0, s_g1, s_n, s_d,
                          ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
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
        acc = tl.dot(m, xv, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    out_offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _acc_tl(dtype: torch.dtype):
    return tl.float64 if accumulate_dtype(dtype) == torch.float64 else tl.float32


SUM_ELEMENTS = 4096  # partial-tile values the last program of a tile pair sums per trip (BLOCK_S tiles)


def launch_gram(x: torch.Tensor, cfg: GramConfig, out: torch.Tensor, operand, *, s_n: int, s_d: int = 1,
                hf_geometry=(1, 1, 1, 0, 0, 1), weights=None, y=None, image=None, target=None, sse=None,
                sse_weights=None) -> None:
    """Run the split-K Gram kernel (one launch; the last split of each tile pair sums them) into ``out``:
    (batches, N, N), a batch being x (and y, a second batch in x's layout).

    ``weights`` (the four stencil weights, :func:`._launch.as_weights`) makes it the Gram of hf(x), with
    ``hf_geometry = (chunks_w, h, w, s_c, s_h, s_w)`` of x. ``image`` (like out) and ``sse`` (a (batches,
    tiles) output) make it the one-pass DomainStudio forward: hf(x) hf(x)ᵀ into out and x xᵀ into image from
    the same loads, and per diagonal
    tile the sum of ``(hf(x) - hf(target))²`` (``target``: of the last batch) or ``hf(x)²`` into ``sse``,
    each sample's part times ``sse_weights[sample]`` where given ((N,), on x's device).
    The per-tile-pair tickets are one zero-filled int32 per tile pair (a memset launch).
    """
    batches, n, _ = out.shape
    d = x.shape[1] if weights is None else 0
    tiles = triton.cdiv(n, cfg.block_n)
    ds = image is not None
    grams = 2 if ds else 1
    acc_dtype = out.dtype
    ws = new_output((batches * tiles * tiles * grams * cfg.splits, cfg.block_n, cfg.block_n), acc_dtype, x.device)
    sse_ws = new_output((batches * tiles * tiles, cfg.splits), acc_dtype, x.device) if ds else ws
    tickets = torch.zeros(batches * tiles * tiles, dtype=torch.int32, device=x.device)
    t = x if target is None else target
    img_operand = dot_operand_dtype(x.dtype) if ds else operand
    _gram_kernel[(tiles * tiles, cfg.splits, batches)](
        x, x if y is None else y, t, ws, sse_ws, tickets, out, image if ds else out, sse if ds else out,
        out if sse_weights is None else sse_weights, *(weights or (0.0, 0.0, 0.0, 0.0)), n, d, s_n, s_d, *hf_geometry,
        *(t.stride() if ds else (0, 0, 0, 0)), cfg.k_blocks, cfg.k_blocks_per_split, tiles, cfg.splits,
        batches - 1 if target is not None else -1,
        HF=weights is not None, DS=ds, TARGET=target is not None, SSE_W=ds and sse_weights is not None,
        OPERAND=operand, ACC=_acc_tl(out.dtype),
        PRECISION=dot_precision(operand), IMG_OPERAND=img_operand, IMG_PRECISION=dot_precision(img_operand),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_S=max(1, SUM_ELEMENTS // cfg.block_n ** 2),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@on_input_device
def gram(x: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` (or ``(N, ...)``, flattened per sample) -> ``(N, N) = x @ x.T``, float32 (float64 for float64)."""
    check_float(x, "gram")
    if x.dim() == 0:
        raise ValueError("gram: expected (N, D)")
    flat = x.reshape(x.shape[0], -1)
    n, d = flat.shape
    out = new_output((n, n), accumulate_dtype(x.dtype), x.device)
    if n == 0:
        return out
    if d == 0:
        return out.zero_()
    operand = dot_operand_dtype(x.dtype)
    block_k = min(2048, max(16, next_pow2(d))) if interpreter_tiles() else dot_tiles(gram_tile(n), operand)[0]
    cfg = gram_config(n, triton.cdiv(d, block_k), block_k, operand, x.device,
                      k_block_bytes=min(n, gram_tile(n)) * block_k * x.element_size())
    if operand == tl.float64 and cfg.block_n == 32:  # a prefetched K step spilled 8 B (sm_90, Triton 3.6)
        cfg = replace(cfg, num_stages=1)
    launch_gram(flat, cfg, out.view(1, n, n), operand, s_n=flat.stride(0), s_d=flat.stride(1))
    return out


@on_input_device
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
    acc = _acc_tl(x.dtype)
    grid = (triton.cdiv(n, cfg.block_m) * triton.cdiv(d, cfg.block_d),)
    _gram_backward_kernel[grid](
        grad_gram, flat, out, n, d, grad_gram.stride(0), grad_gram.stride(1), flat.stride(0), flat.stride(1),
        ACC=acc, PRECISION=dot_precision(acc), BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(x.shape)


# --------------------------------------------------------------------------------------------------
# The N x N tail: cosine normalisation, diagonal removal, row softmaxes and the KL, in one launch
# forward and one backward (float64 math, as dsfast.reference.similarity_kl_from_gram on .double()).
#
# One program walks the rows in blocks of BLOCK_R (all N columns at once), so any N up to a few
# thousand fits; the work is ~N² numbers, so one program is cheap next to the Gram (O(N² D)) and the
# sum over rows needs no second launch and no atomics (deterministic). Row i of the loss:
#   s_ij = G_ij / (n_i n_j tau) (j != i), n_i = max(sqrt(max(G_ii, 0)), COSINE_EPS),
#   KL_i = sum_j P_ij (log P_ij - log Q_ij), P, Q = row softmaxes of the two sides,
# loss = scale * sum_i w_i KL_i (w_i: how often row i is an anchor, 1 without anchors).
# --------------------------------------------------------------------------------------------------
COSINE_EPS = 1e-8  # torch.nn.CosineSimilarity's clamp on each norm (dsfast.reference.COSINE_EPS)
TAIL_ELEMENTS = 1024  # BLOCK_R x BLOCK_N per trip: a few fp64 values per thread, no spills


def tail_blocks(n: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_N) of the tail kernels: at least 16 rows per trip (smaller tiles compiled with a stack frame)."""
    block_n = max(16, next_pow2(n))
    return max(1, min(max(16, next_pow2(n)), TAIL_ELEMENTS // block_n)), block_n


@triton.jit
def _tail_norms(g_ptr, idx, mask, N, eps):
    """(n, r) at the indices idx, float64: r = sqrt(max(G_ii, 0)), n = max(r, eps)."""
    diag = tl.load(g_ptr + idx.to(tl.int64) * (N + 1), mask=mask, other=1.0).to(tl.float64)
    root = tl.sqrt(tl.maximum(diag, 0.0))
    return tl.maximum(root, eps), root


@triton.jit
def _tail_logits(g_ptr, rows, cols, valid, norm_r, norm_c, tau, N):
    """(s, log-softmax of each row of s) [BLOCK_R, BLOCK_N], s = cos / tau; both 0 off the valid entries."""
    g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=valid, other=0.0).to(tl.float64)
    s = g / (norm_r[:, None] * norm_c[None, :]) / tau
    z = tl.where(valid, s, float("-inf"))
    z = z - tl.max(z, axis=1)[:, None]
    lse = tl.log(tl.sum(tl.where(valid, tl.exp(z), 0.0), axis=1))
    return tl.where(valid, s, 0.0), tl.where(valid, z - lse[:, None], 0.0)


@triton.jit
def _tail_rows(gs_ptr, ga_ptr, w_ptr, rows, cols, cmask, ns_c, na_c, tau, N, HAS_W: tl.constexpr,
               SOURCE_FIRST: tl.constexpr, eps):
    """One row block: (valid, n_source, n_adapted, s_source, s_adapted, log P, log Q, KL_i, w_i), P the first
    distribution, n the rows' norms."""
    rmask = rows < N
    valid = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
    ns_r, _ = _tail_norms(gs_ptr, rows, rmask, N, eps)
    na_r, _ = _tail_norms(ga_ptr, rows, rmask, N, eps)
    s_s, l_s = _tail_logits(gs_ptr, rows, cols, valid, ns_r, ns_c, tau, N)
    s_a, l_a = _tail_logits(ga_ptr, rows, cols, valid, na_r, na_c, tau, N)
    if SOURCE_FIRST:
        lp, lq = l_s, l_a
    else:
        lp, lq = l_a, l_s
    kl = tl.sum(tl.where(valid, tl.exp(lp) * (lp - lq), 0.0), axis=1)
    if HAS_W:
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float64)
    else:
        w = tl.where(rmask, 1.0, 0.0).to(tl.float64)
    return valid, ns_r, na_r, s_s, s_a, lp, lq, kl, w


@triton.jit
def similarity_kl_sum(gs_ptr, ga_ptr, w_ptr, tau, eps, N, HAS_W: tl.constexpr, SOURCE_FIRST: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum_i w_i KL_i of the Grams at gs_ptr, ga_ptr (float64; one program walks the rows)."""
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    ns_c, rs_c = _tail_norms(gs_ptr, cols, cmask, N, eps)
    na_c, ra_c = _tail_norms(ga_ptr, cols, cmask, N, eps)
    total = tl.zeros([BLOCK_R], dtype=tl.float64)
    for r0 in range(0, N, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        valid, ns_r, na_r, s_s, s_a, lp, lq, kl, w = _tail_rows(gs_ptr, ga_ptr, w_ptr, rows, cols, cmask, ns_c, na_c, tau, N,
                                                                HAS_W, SOURCE_FIRST, eps)
        total += w * kl
    return tl.sum(total, axis=0)


@triton.jit
def _similarity_kl_kernel(gs_ptr, ga_ptr, w_ptr, out_ptr, tau: tl.float64, scale: tl.float64, eps: tl.float64, N,
                          HAS_W: tl.constexpr, SOURCE_FIRST: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """loss = scale * sum_i w_i KL_i (eps: COSINE_EPS)."""
    total = similarity_kl_sum(gs_ptr, ga_ptr, w_ptr, tau, eps, N, HAS_W, SOURCE_FIRST, BLOCK_R, BLOCK_N)
    tl.store(out_ptr, total * scale)


@triton.jit
def _tail_grad_block(dg_ptr, rows, cols, valid, ds, s, norm_r, norm_c, tau, N):
    """Store dG_ij = ds_ij / (tau n_i n_j) off the diagonal; return sum_j T_kj + sum_i T_ik per column k,
    T = ds * s (the diagonal's share, through n_k, of this row block)."""
    dg = ds / (norm_r[:, None] * norm_c[None, :]) / tau
    tl.store(dg_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], dg.to(dg_ptr.dtype.element_ty), mask=valid)
    t = tl.where(valid, ds * s, 0.0)
    row_sums = tl.sum(t, axis=1)
    return tl.sum(t, axis=0) + tl.sum(tl.where(rows[:, None] == cols[None, :], row_sums[:, None], 0.0), axis=0)


@triton.jit
def _tail_grad_diag(dg_ptr, cols, cmask, acc, norm, root, N, eps):
    """dG_kk = -(acc_k / n_k) * dn_k/dG_kk, with dn/dG = 1 / (2 r) where r >= eps (the clamps' rule), else 0."""
    dn = -acc / norm
    dg = tl.where(root >= eps, dn * 0.5 / root, 0.0)
    tl.store(dg_ptr + cols.to(tl.int64) * (N + 1), dg.to(dg_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def similarity_kl_grads(c, gs_ptr, ga_ptr, w_ptr, dgs_ptr, dga_ptr, tau, eps, N, HAS_W: tl.constexpr,
                        SOURCE_FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the gradients of ``c * sum_i w_i KL_i`` w.r.t. both Grams. With c_i = c * w_i, on the logits:
    d s_P = c_i P (log P - log Q - KL_i) (the first distribution), d s_Q = c_i (Q - P) (the second)."""
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    ns_c, rs_c = _tail_norms(gs_ptr, cols, cmask, N, eps)
    na_c, ra_c = _tail_norms(ga_ptr, cols, cmask, N, eps)
    acc_s = tl.zeros([BLOCK_N], dtype=tl.float64)
    acc_a = tl.zeros([BLOCK_N], dtype=tl.float64)
    for r0 in range(0, N, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        valid, ns_r, na_r, s_s, s_a, lp, lq, kl, w = _tail_rows(gs_ptr, ga_ptr, w_ptr, rows, cols, cmask, ns_c,
                                                                na_c, tau, N, HAS_W, SOURCE_FIRST, eps)
        ci = (c * w)[:, None]
        p = tl.where(valid, tl.exp(lp), 0.0)
        q = tl.where(valid, tl.exp(lq), 0.0)
        d_first = tl.where(valid, ci * p * (lp - lq - kl[:, None]), 0.0)
        d_second = ci * (q - p)
        if SOURCE_FIRST:
            ds_s, ds_a = d_first, d_second
        else:
            ds_s, ds_a = d_second, d_first
        acc_s += _tail_grad_block(dgs_ptr, rows, cols, valid, ds_s, s_s, ns_r, ns_c, tau, N)
        acc_a += _tail_grad_block(dga_ptr, rows, cols, valid, ds_a, s_a, na_r, na_c, tau, N)
    _tail_grad_diag(dgs_ptr, cols, cmask, acc_s, ns_c, rs_c, N, eps)
    _tail_grad_diag(dga_ptr, cols, cmask, acc_a, na_c, ra_c, N, eps)


@triton.jit
def _similarity_kl_backward_kernel(grad_ptr, gs_ptr, ga_ptr, w_ptr, dgs_ptr, dga_ptr, tau: tl.float64,
                                   scale: tl.float64, eps: tl.float64, N, HAS_W: tl.constexpr, SOURCE_FIRST: tl.constexpr,
                                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gradients of the loss w.r.t. both Grams (:func:`similarity_kl_grads` with c = grad * scale)."""
    c = tl.load(grad_ptr).to(tl.float64) * scale
    similarity_kl_grads(c, gs_ptr, ga_ptr, w_ptr, dgs_ptr, dga_ptr, tau, eps, N, HAS_W, SOURCE_FIRST, BLOCK_R, BLOCK_N)


def _check_tail(g_source: torch.Tensor, g_adapted: torch.Tensor, weights) -> int:
    n = g_adapted.shape[0] if g_adapted.dim() == 2 else -1
    for name, g in (("g_source", g_source), ("g_adapted", g_adapted)):
        if g.dtype not in (torch.float32, torch.float64) or g.shape != (n, n) or n < 3:
            raise ValueError(f"similarity_kl: `{name}` must be a float32/float64 (N, N) Gram with N >= 3 "
                             f"like g_adapted, got {g.dtype} {tuple(g.shape)}")
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"similarity_kl: `weights` must have shape ({n},), got {tuple(weights.shape)}")
    return n


def _tail_launch(g_source, g_adapted, weights, tau: float, scale: float, source_first: bool, per_warp: int):
    """(tensor arguments, float64 scalar arguments, meta-parameters); ``per_warp`` tile elements per warp (no register spills up to N=1024)."""
    n = g_adapted.shape[0]
    block_r, block_n = tail_blocks(n)
    tensors = (g_source.contiguous(), g_adapted.contiguous(), g_adapted if weights is None else weights.contiguous())
    scalars = (float(tau), float(scale), COSINE_EPS)
    meta = dict(HAS_W=weights is not None, SOURCE_FIRST=source_first, BLOCK_R=block_r,
                BLOCK_N=block_n, num_warps=max(4, min(32, block_r * block_n // per_warp)))
    return tensors, scalars, meta


@on_input_device
def similarity_kl(g_source: torch.Tensor, g_adapted: torch.Tensor, weights: torch.Tensor | None, tau: float,
                  source_first: bool, scale: float) -> torch.Tensor:
    """The pairwise-similarity KL from the two (N, N) Grams: a 0-d tensor of g_adapted's dtype (float64 math).

    ``weights`` (N,): how often each row counts (anchors), None for all rows once; ``source_first``: the
    direction source||adapted; ``scale``: the reduction (1 / (rows * (N-1)) for "mean", ...).
    """
    n = _check_tail(g_source, g_adapted, weights)
    out = new_output((), g_adapted.dtype, g_adapted.device)
    tensors, scalars, meta = _tail_launch(g_source, g_adapted, weights, tau, scale, source_first, per_warp=32)
    _similarity_kl_kernel[(1,)](*tensors, out, *scalars, n, **meta)
    return out


@on_input_device
def similarity_kl_backward(grad: torch.Tensor, g_source: torch.Tensor, g_adapted: torch.Tensor,
                           weights: torch.Tensor | None, tau: float, source_first: bool,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d g_source, d loss / d g_adapted) for the 0-d upstream ``grad`` (read on the device)."""
    n = _check_tail(g_source, g_adapted, weights)
    d_source = new_output((n, n), g_source.dtype, g_source.device)
    d_adapted = new_output((n, n), g_adapted.dtype, g_adapted.device)
    tensors, scalars, meta = _tail_launch(g_source, g_adapted, weights, tau, scale, source_first, per_warp=64)
    _similarity_kl_backward_kernel[(1,)](grad.reshape(()), *tensors, d_source, d_adapted, *scalars, n, **meta)
    return d_source, d_adapted
