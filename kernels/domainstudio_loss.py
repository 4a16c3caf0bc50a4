"""The reductions of the whole DomainStudio loss in one pass over a batch, and the backward in one pass.

``domainstudio_grams(x, target)`` returns ``(x xᵀ, hf(x) hf(x)ᵀ, sum((hf(x) - hf(target))²))`` (no
target: ``sum(hf(x)²)``); ``domainstudio_grams_backward`` writes
``(Gi + Giᵀ) x + hfᵀ((Gh + Ghᵀ) hf(x) + 2 g_sse (hf(x) - hf(target)))``.

* Forward: the tiling of :mod:`.hf_pairwise_similarity_kl`'s ``hf_gram`` (split-K over hf positions,
  upper-triangular tile pairs, deterministic reduce). A K block loads the four pixels a, b, c, d of
  each 2x2 block once; the image Gram is ``a aᵀ + b bᵀ + c cᵀ + d dᵀ`` (four dots, the pixels of x in
  another order), the hf Gram the dot of the stencil output, and the diagonal tiles (every sample
  exactly once) also load the target's pixels for the hf-MSE partial sums, one per (split, tile).
* Backward: the tiling of ``hf_gram_backward``: a program owns (a row tile of N) x (BLOCK_P hf
  positions), accumulates ``Mi a``, ``Mi b``, ``Mi c``, ``Mi d`` and ``Mh hf`` over the batch with
  ``tl.dot``, adds the hf-MSE term of its own rows and writes the four pixels of each block once.

x is read once per pass (and target once); all math in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import accumulate_dtype, new_output, weights_tensor
from .hf_pairwise_similarity_kl import _check_x, _compute_tl, _position_offsets, hf_gram_config
from .pairwise_similarity_kl import gram_backward_config, launch_gram_reduce


@triton.jit
def _block_pixels(x_ptr, rows, offs, mask, s_h, s_w, COMPUTE: tl.constexpr):
    """Pixels a, b, c, d [len(rows), len(offs)] of the 2x2 blocks: rows are int64 sample offsets, offs
    int64 offsets of pixel a."""
    ptr = x_ptr + rows[:, None] + offs[None, :]
    a = tl.load(ptr, mask=mask, other=0.0).to(COMPUTE)
    b = tl.load(ptr + s_w, mask=mask, other=0.0).to(COMPUTE)
    c = tl.load(ptr + s_h, mask=mask, other=0.0).to(COMPUTE)
    d = tl.load(ptr + s_h + s_w, mask=mask, other=0.0).to(COMPUTE)
    return a, b, c, d


@triton.jit
def _ds_tile_acc(x_ptr, t_ptr, rows_i, rows_j, t_rows, row_valid, D, hw, w, s_c, s_h, s_w, t_c, t_h, t_w,
                 wa, wb, wc, wd, kb_start, kb_end, acc_img, acc_hf, sse,
                 SYMMETRIC: tl.constexpr, HAS_TARGET: tl.constexpr, COMPUTE: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Over the K blocks [kb_start, kb_end): acc_img += x[i] x[j]ᵀ, acc_hf += hf[i] hf[j]ᵀ and, for the
    diagonal (SYMMETRIC) tile, sse += (hf[i] - hf(t)[i])² elementwise."""
    ks = tl.arange(0, BLOCK_K)
    for kb in range(kb_start, kb_end):
        p = kb * BLOCK_K + ks
        p_mask = p < D
        offs = _position_offsets(p, hw, w, s_c, s_h, s_w)
        a, b, c, d = _block_pixels(x_ptr, rows_i, offs, p_mask[None, :], s_h, s_w, COMPUTE)
        hf = a * wa + b * wb + c * wc + d * wd
        if SYMMETRIC:
            acc_img = tl.dot(a, tl.trans(a), acc_img, input_precision="ieee", out_dtype=COMPUTE)
            acc_img = tl.dot(b, tl.trans(b), acc_img, input_precision="ieee", out_dtype=COMPUTE)
            acc_img = tl.dot(c, tl.trans(c), acc_img, input_precision="ieee", out_dtype=COMPUTE)
            acc_img = tl.dot(d, tl.trans(d), acc_img, input_precision="ieee", out_dtype=COMPUTE)
            acc_hf = tl.dot(hf, tl.trans(hf), acc_hf, input_precision="ieee", out_dtype=COMPUTE)
            diff = hf
            if HAS_TARGET:
                t_offs = _position_offsets(p, hw, w, t_c, t_h, t_w)
                ta, tb, tc, td = _block_pixels(t_ptr, t_rows, t_offs, p_mask[None, :], t_h, t_w, COMPUTE)
                diff = hf - (ta * wa + tb * wb + tc * wc + td * wd)
            sse += tl.where(row_valid[:, None], diff * diff, 0.0)
        else:
            a2, b2, c2, d2 = _block_pixels(x_ptr, rows_j, offs, p_mask[None, :], s_h, s_w, COMPUTE)
            acc_img = tl.dot(a, tl.trans(a2), acc_img, input_precision="ieee", out_dtype=COMPUTE)
            acc_img = tl.dot(b, tl.trans(b2), acc_img, input_precision="ieee", out_dtype=COMPUTE)
            acc_img = tl.dot(c, tl.trans(c2), acc_img, input_precision="ieee", out_dtype=COMPUTE)
            acc_img = tl.dot(d, tl.trans(d2), acc_img, input_precision="ieee", out_dtype=COMPUTE)
            hf2 = a2 * wa + b2 * wb + c2 * wc + d2 * wd
            acc_hf = tl.dot(hf, tl.trans(hf2), acc_hf, input_precision="ieee", out_dtype=COMPUTE)
    return acc_img, acc_hf, sse


@triton.jit
def _ds_grams_partial_kernel(x_ptr, t_ptr, w_ptr, img_ptr, hf_ptr, sse_ptr, N, D, hw, w,
                             s_n, s_c, s_h, s_w, t_n, t_c, t_h, t_w, k_blocks, k_blocks_per_split, n_tiles,
                             HAS_TARGET: tl.constexpr, COMPUTE: tl.constexpr, DIRECT: tl.constexpr,
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
        # rows past N are clamped to sample 0, masked out at the store and in the hf-MSE sum
        rows_i = tl.where(ri < N, ri, 0).to(tl.int64) * s_n
        rows_j = tl.where(rj < N, rj, 0).to(tl.int64) * s_n
        t_rows = tl.where(ri < N, ri, 0).to(tl.int64) * t_n
        kb_start = split * k_blocks_per_split
        kb_end = tl.minimum(kb_start + k_blocks_per_split, k_blocks)
        acc_img = tl.zeros((BLOCK_N, BLOCK_N), dtype=COMPUTE)
        acc_hf = tl.zeros((BLOCK_N, BLOCK_N), dtype=COMPUTE)
        sse = tl.zeros((BLOCK_N, BLOCK_K), dtype=COMPUTE)
        if ti == tj:
            acc_img, acc_hf, sse = _ds_tile_acc(
                x_ptr, t_ptr, rows_i, rows_j, t_rows, ri < N, D, hw, w, s_c, s_h, s_w, t_c, t_h, t_w,
                wa, wb, wc, wd, kb_start, kb_end, acc_img, acc_hf, sse, True, HAS_TARGET, COMPUTE, BLOCK_K)
            tl.store(sse_ptr + split * n_tiles + ti, tl.sum(tl.sum(sse, axis=1), axis=0))
        else:
            acc_img, acc_hf, sse = _ds_tile_acc(
                x_ptr, t_ptr, rows_i, rows_j, t_rows, ri < N, D, hw, w, s_c, s_h, s_w, t_c, t_h, t_w,
                wa, wb, wc, wd, kb_start, kb_end, acc_img, acc_hf, sse, False, HAS_TARGET, COMPUTE, BLOCK_K)
        mask = (ri[:, None] < N) & (rj[None, :] < N)
        if DIRECT:
            tl.store(img_ptr + ri[:, None] * N + rj[None, :], acc_img, mask=mask)
            tl.store(hf_ptr + ri[:, None] * N + rj[None, :], acc_hf, mask=mask)
            if ti != tj:
                tl.store(img_ptr + rj[None, :] * N + ri[:, None], acc_img, mask=mask)
                tl.store(hf_ptr + rj[None, :] * N + ri[:, None], acc_hf, mask=mask)
        else:
            offs = split.to(tl.int64) * N * N + ri[:, None] * N + rj[None, :]
            tl.store(img_ptr + offs, acc_img, mask=mask)
            tl.store(hf_ptr + offs, acc_hf, mask=mask)


@triton.jit
def _ds_grams_backward_kernel(gi_ptr, gh_ptr, gs_ptr, x_ptr, t_ptr, w_ptr, out_ptr, N, D, hw, w,
                              s_gi0, s_gi1, s_gh0, s_gh1, s_n, s_c, s_h, s_w, t_n, t_c, t_h, t_w,
                              HAS_TARGET: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_x blocks at positions P of samples R:
    (Mi x)[R] + ((Mh hf)[R, P] + 2 g_sse (hf(x) - hf(t))[R, P]) * (wa, wb, wc, wd), M = g + gᵀ."""
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
    acc_a = tl.zeros((BLOCK_M, BLOCK_P), dtype=COMPUTE)
    acc_b = tl.zeros((BLOCK_M, BLOCK_P), dtype=COMPUTE)
    acc_c = tl.zeros((BLOCK_M, BLOCK_P), dtype=COMPUTE)
    acc_d = tl.zeros((BLOCK_M, BLOCK_P), dtype=COMPUTE)
    acc_h = tl.zeros((BLOCK_M, BLOCK_P), dtype=COMPUTE)
    for k0 in range(0, N, BLOCK_K):
        k = k0 + ks
        k_mask = k < N
        gm = row_mask[:, None] & k_mask[None, :]
        mi = tl.load(gi_ptr + rows[:, None] * s_gi0 + k[None, :] * s_gi1, mask=gm, other=0.0).to(COMPUTE)
        mi += tl.load(gi_ptr + k[None, :] * s_gi0 + rows[:, None] * s_gi1, mask=gm, other=0.0).to(COMPUTE)
        mh = tl.load(gh_ptr + rows[:, None] * s_gh0 + k[None, :] * s_gh1, mask=gm, other=0.0).to(COMPUTE)
        mh += tl.load(gh_ptr + k[None, :] * s_gh0 + rows[:, None] * s_gh1, mask=gm, other=0.0).to(COMPUTE)
        k_rows = tl.where(k_mask, k, 0).to(tl.int64) * s_n
        a, b, c, d = _block_pixels(x_ptr, k_rows, offs, k_mask[:, None] & p_mask[None, :], s_h, s_w, COMPUTE)
        acc_a = tl.dot(mi, a, acc_a, input_precision="ieee", out_dtype=COMPUTE)
        acc_b = tl.dot(mi, b, acc_b, input_precision="ieee", out_dtype=COMPUTE)
        acc_c = tl.dot(mi, c, acc_c, input_precision="ieee", out_dtype=COMPUTE)
        acc_d = tl.dot(mi, d, acc_d, input_precision="ieee", out_dtype=COMPUTE)
        hf = a * wa + b * wb + c * wc + d * wd
        acc_h = tl.dot(mh, hf, acc_h, input_precision="ieee", out_dtype=COMPUTE)
    # the hf-MSE term of this program's own rows
    mask = row_mask[:, None] & p_mask[None, :]
    own = tl.where(row_mask, rows, 0).to(tl.int64)
    a, b, c, d = _block_pixels(x_ptr, own * s_n, offs, mask, s_h, s_w, COMPUTE)
    diff = a * wa + b * wb + c * wc + d * wd
    if HAS_TARGET:
        t_offs = _position_offsets(p, hw, w, t_c, t_h, t_w)
        ta, tb, tc, td = _block_pixels(t_ptr, own * t_n, t_offs, mask, t_h, t_w, COMPUTE)
        diff -= ta * wa + tb * wb + tc * wc + td * wd
    v = acc_h + 2 * tl.load(gs_ptr).to(COMPUTE) * diff
    # grad_x is a fresh contiguous (N, C, 2h, 2w) tensor: pixel a of position (c, y, x) sits at
    # c*4hw + 2y*2w + 2x, which _position_offsets gives with strides (4hw, 2w, 1).
    out_offs = rows[:, None].to(tl.int64) * (4 * D) + _position_offsets(p, hw, w, 4 * hw, 2 * w, 1)[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + out_offs, (acc_a + v * wa).to(dtype), mask=mask)
    tl.store(out_ptr + out_offs + 1, (acc_b + v * wb).to(dtype), mask=mask)
    tl.store(out_ptr + out_offs + 2 * w, (acc_c + v * wc).to(dtype), mask=mask)
    tl.store(out_ptr + out_offs + 2 * w + 1, (acc_d + v * wd).to(dtype), mask=mask)


def _check_target(x: torch.Tensor, target: torch.Tensor | None, name: str) -> torch.Tensor:
    """The tensor the kernels read as target: target itself, or x (unused) when there is none."""
    if target is None:
        return x
    _check_x(target, f"{name} (target)")
    if target.shape != x.shape or target.dtype != x.dtype or target.device != x.device:
        raise ValueError(f"{name}: target must match x in shape, dtype and device, got {tuple(target.shape)} "
                         f"{target.dtype} {target.device} and {tuple(x.shape)} {x.dtype} {x.device}")
    return target


def domainstudio_grams(x: torch.Tensor, target: torch.Tensor | None, weights):
    """``(N, C, H, W)`` -> ``(image Gram, hf Gram, hf-MSE sum)``: (N, N), (N, N), () in fp32 (fp64)."""
    _check_x(x, "domainstudio_grams")
    t = _check_target(x, target, "domainstudio_grams")
    n, c, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    d = c * h * w
    acc_dtype = accumulate_dtype(x.dtype)
    image = new_output((n, n), acc_dtype, x.device)
    hf = new_output((n, n), acc_dtype, x.device)
    if n == 0 or d == 0:
        return image.zero_(), hf.zero_(), torch.zeros((), dtype=acc_dtype, device=x.device)
    wt = weights_tensor(weights, x.device, x.dtype)
    cfg = hf_gram_config(n, d, x.dtype, x.device)
    tiles = triton.cdiv(n, cfg.block_n)
    k_blocks = triton.cdiv(d, cfg.block_k)
    direct = cfg.splits == 1
    img_ws = image if direct else new_output((cfg.splits, n, n), acc_dtype, x.device)
    hf_ws = hf if direct else new_output((cfg.splits, n, n), acc_dtype, x.device)
    sse_ws = new_output((cfg.splits, tiles), acc_dtype, x.device)
    _ds_grams_partial_kernel[(tiles * tiles, cfg.splits)](
        x, t, wt, img_ws, hf_ws, sse_ws, n, d, h * w, w, *x.stride(), *t.stride(),
        k_blocks, cfg.k_blocks_per_split, tiles,
        HAS_TARGET=target is not None, COMPUTE=_compute_tl(x.dtype), DIRECT=direct,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    if not direct:
        launch_gram_reduce(img_ws, image, cfg.block_n)
        launch_gram_reduce(hf_ws, hf, cfg.block_n)
    return image, hf, sse_ws.sum()


def domainstudio_grams_backward(grad_image: torch.Tensor, grad_hf: torch.Tensor, grad_sse: torch.Tensor,
                                x: torch.Tensor, target: torch.Tensor | None, weights) -> torch.Tensor:
    """``(N, C, H, W)`` in the dtype of x: ``(Gi + Giᵀ) x + hfᵀ((Gh + Ghᵀ) hf(x) + 2 g_sse (hf(x) - hf(t)))``."""
    name = "domainstudio_grams_backward"
    _check_x(x, name)
    t = _check_target(x, target, name)
    n, c, hh, ww = x.shape
    for g, what in ((grad_image, "grad_image"), (grad_hf, "grad_hf")):
        if g.shape != (n, n):
            raise ValueError(f"{name}: {what} must be ({n}, {n}), got {tuple(g.shape)}")
    if grad_sse.numel() != 1:
        raise ValueError(f"{name}: grad_sse must hold one number, got shape {tuple(grad_sse.shape)}")
    h, w = hh // 2, ww // 2
    d = c * h * w
    out = new_output((n, c, hh, ww), x.dtype, x.device)
    if out.numel() == 0:
        return out
    wt = weights_tensor(weights, x.device, x.dtype)
    cfg = gram_backward_config(n, d, x.dtype, x.device)  # block_d counts hf positions here
    grid = (triton.cdiv(n, cfg.block_m) * triton.cdiv(d, cfg.block_d),)
    _ds_grams_backward_kernel[grid](
        grad_image, grad_hf, grad_sse, x, t, wt, out, n, d, h * w, w,
        grad_image.stride(0), grad_image.stride(1), grad_hf.stride(0), grad_hf.stride(1), *x.stride(), *t.stride(),
        HAS_TARGET=target is not None, COMPUTE=_compute_tl(x.dtype), BLOCK_M=cfg.block_m,
        BLOCK_P=cfg.block_d, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    return out
