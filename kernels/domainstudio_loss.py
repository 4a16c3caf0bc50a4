"""The whole DomainStudio loss in few launches: both batches' reductions in one pass, the N x N tail in one program.

``domainstudio_grams(x, target)`` returns ``(x xᵀ, hf(x) hf(x)ᵀ, sum((hf(x) - hf(target))²))`` (no
target: ``sum(hf(x)²)``; with per-sample ``sse_weights`` w (N,): ``Σ_i w_i sum((hf(x_i) - hf(target_i))²)``,
whose gradient scales sample i's hf-MSE term by w_i) of one batch; ``domainstudio_pair_grams(source,
adapted, target)`` the two Grams of both batches (and the hf-MSE partial sums of adapted) in one launch;
``domainstudio_terms`` the loss's four terms from those in one more; ``domainstudio_terms_backward`` the Grams'
and the hf-MSE sum's gradients in one; ``domainstudio_grams_backward`` writes ``(Gi + Giᵀ) x + hfᵀ((Gh + Ghᵀ)
hf(x) + 2 g_sse (hf(x) - hf(target)))`` (sample i's last term times w_i).

* Forward: ``hf_gram``'s split-K Gram kernel (:func:`.pairwise_similarity_kl.launch_gram`, upper-triangular
  tile pairs, the last split of a tile pair sums the splits in a fixed order) with its ``DS`` flag, on
  smaller tiles (it holds the image Gram's accumulators too: at most 32 x 32 output tiles and K = 16, so
  nothing spills), a third grid axis for the batch. A K block's two input rows, read once as contiguous
  runs, give both the hf panel (stencil in registers) and the image Gram's operands (``top topᵀ + bottom
  bottomᵀ``, the pixels of x in another order, multiplied natively for 16-bit inputs); the diagonal tiles
  (every sample exactly once) also read the target's rows for the hf-MSE partial sums.
* Backward: ``hf_gram_backward``'s kernel: a program owns (a row tile of N) x (positions of one hf row)
  and accumulates ``Mh hf`` and ``Mi`` times the two input rows over the batch with ``tl.dot``, adds the
  hf-MSE term of its own rows and writes the two output rows once (contiguous).
* The tail: the two pairwise-similarity KLs (:func:`.pairwise_similarity_kl.similarity_kl_sum`), the hf-MSE
  and the weighted total in one program forward; backward, both KLs' Gram gradients and the hf-MSE sum's.

At the headline shapes the loss is 3 launches forward (the split tickets' memset, the Grams, the tail) and
2 backward (the tail, the adapted batch's gradient), plus the seed of ``.backward()``.
x is read once per pass (and target once); the hf math in fp32 (fp64 for fp64 inputs), fp32 dots as 3xTF32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import accumulate_dtype, as_weights, check_float, new_output, on_input_device
from .hf_pairwise_similarity_kl import _check_x, _compute_tl, ds_tile, hf_gram_config, launch_hf_gram_backward
from .pairwise_similarity_kl import (
    COSINE_EPS,
    launch_gram,
    similarity_kl_grads,
    similarity_kl_sum,
    tail_blocks,
)


def _check_target(x: torch.Tensor, target: torch.Tensor | None, name: str) -> None:
    if target is None:
        return
    _check_x(target, f"{name} (target)")
    if target.shape != x.shape or target.dtype != x.dtype or target.device != x.device:
        raise ValueError(f"{name}: target must match x in shape, dtype and device, got {tuple(target.shape)} "
                         f"{target.dtype} {target.device} and {tuple(x.shape)} {x.dtype} {x.device}")


def _sse_weights(x: torch.Tensor, sse_weights: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """Per-sample weights of the hf-MSE sum, checked ((N,) floating on x's device; any float dtype: the kernels
    convert while loading), contiguous (a copy only where they are not)."""
    if sse_weights is None:
        return None
    check_float(sse_weights, f"{name} (sse_weights)")
    if sse_weights.shape != (x.shape[0],) or sse_weights.device != x.device:
        raise ValueError(f"{name}: sse_weights must have shape ({x.shape[0]},) on {x.device}, got "
                         f"{tuple(sse_weights.shape)} on {sse_weights.device}")
    return sse_weights.contiguous()


def sse_tiles(n: int) -> int:
    """Diagonal tiles of the one-pass forward's Grams: one hf-MSE partial sum each."""
    return triton.cdiv(n, ds_tile(n))


def _launch_grams(x, y, target, weights, sse_weights=None):
    """(hf Grams, image Grams, hf-MSE partial sums): (B, N, N), (B, N, N), (B, tiles) of the batches x (and y);
    ``sse_weights`` (N,) weight each sample's part of the partial sums."""
    batches = 1 if y is None else 2
    n, c, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    acc_dtype = accumulate_dtype(x.dtype)
    hf = new_output((batches, n, n), acc_dtype, x.device)
    image = new_output((batches, n, n), acc_dtype, x.device)
    if n == 0 or c * h * w == 0:
        return hf.zero_(), image.zero_(), torch.zeros((batches, sse_tiles(n)), dtype=acc_dtype, device=x.device)
    cfg = hf_gram_config(n, c, h, w, x.dtype, x.device, ds=True, batches=batches)
    sse = new_output((batches, triton.cdiv(n, cfg.block_n)), acc_dtype, x.device)  # sse_tiles(n) but under tests
    s_n, s_c, s_h, s_w = x.stride()
    launch_gram(x, cfg, hf, _compute_tl(x.dtype), s_n=s_n, hf_geometry=(triton.cdiv(w, cfg.block_k), h, w, s_c, s_h, s_w),
                weights=as_weights(weights), y=y, image=image, target=target, sse=sse, sse_weights=sse_weights)
    return hf, image, sse


@on_input_device
def domainstudio_grams(x: torch.Tensor, target: torch.Tensor | None, weights, sse_weights: torch.Tensor | None = None):
    """``(N, C, H, W)`` -> ``(image Gram, hf Gram, hf-MSE sum)``: (N, N), (N, N), () in fp32 (fp64); the sum's
    sample i times ``sse_weights[i]`` where given."""
    _check_x(x, "domainstudio_grams")
    _check_target(x, target, "domainstudio_grams")
    sse_weights = _sse_weights(x, sse_weights, "domainstudio_grams")
    hf, image, sse = _launch_grams(x, None, target, weights, sse_weights)
    return image.squeeze(0), hf.squeeze(0), sse.sum()


@on_input_device
def domainstudio_pair_grams(source: torch.Tensor, adapted: torch.Tensor, target: torch.Tensor, weights,
                            sse_weights: torch.Tensor | None = None):
    """Both batches in one launch: ``(hf Grams, image Grams, hf-MSE partial sums)``, (2, N, N), (2, N, N) and
    (2, tiles) in fp32 (fp64), batch 0 the source, 1 the adapted batch (whose partial sums are of
    ``(hf(adapted) - hf(target))²``, sample i's times ``sse_weights[i]`` where given; the source's are unused).
    The batches share one layout: where their strides differ, both are made contiguous (a copy)."""
    name = "domainstudio_pair_grams"
    _check_x(source, name)
    _check_target(source, adapted, name)
    _check_target(adapted, target, name)
    sse_weights = _sse_weights(adapted, sse_weights, name)
    if source.stride() != adapted.stride():
        source, adapted = source.contiguous(), adapted.contiguous()
    return _launch_grams(source, adapted, target, weights, sse_weights)


@on_input_device
def domainstudio_grams_backward(grad_image: torch.Tensor, grad_hf: torch.Tensor, grad_sse: torch.Tensor,
                                x: torch.Tensor, target: torch.Tensor | None, weights,
                                sse_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, C, H, W)`` in the dtype of x: ``(Gi + Giᵀ) x + hfᵀ((Gh + Ghᵀ) hf(x) + 2 g_sse W (hf(x) - hf(t)))``,
    W = diag(sse_weights) (the identity where None)."""
    name = "domainstudio_grams_backward"
    _check_x(x, name)
    _check_target(x, target, name)
    sse_weights = _sse_weights(x, sse_weights, name)
    n = x.shape[0]
    for g, what in ((grad_image, "grad_image"), (grad_hf, "grad_hf")):
        if g.shape != (n, n):
            raise ValueError(f"{name}: {what} must be ({n}, {n}), got {tuple(g.shape)}")
    if grad_sse.numel() != 1:
        raise ValueError(f"{name}: grad_sse must hold one number, got shape {tuple(grad_sse.shape)}")
    out = new_output(x.shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    return launch_hf_gram_backward(grad_hf, x, weights, out, grad_image=grad_image, grad_sse=grad_sse, target=target,
                                   sse_weights=sse_weights)


# --------------------------------------------------------------------------------------------------
# The tail: ``image = scale * KL(image Grams)``, ``high_frequency = scale * KL(hf Grams)``, ``hf_mse =
# sum(partial sums of adapted) / count`` and ``total = λ_img image + λ_hf high_frequency + λ_hfmse hf_mse``,
# one program (float64 math); Grams at g_ptr + batch * N * N (batch 0 the source).
# --------------------------------------------------------------------------------------------------
@triton.jit
def _sse_total(sse_ptr, tiles, BLOCK_T: tl.constexpr):
    """Sum of the adapted batch's (row 1 of (2, tiles)) hf-MSE partial sums, in tile order, float64."""
    t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float64)
    for t0 in range(0, tiles, BLOCK_T):
        acc += tl.load(sse_ptr + tiles + t0 + t, mask=t0 + t < tiles, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["N", "tiles"])
def _domainstudio_terms_kernel(hf_ptr, img_ptr, sse_ptr, w_ptr, total_ptr, image_ptr, high_ptr, mse_ptr,
                               tau: tl.float64, scale: tl.float64, eps: tl.float64, lambda_img: tl.float64,
                               lambda_hf: tl.float64, lambda_hfmse: tl.float64, inv_count: tl.float64, N, tiles,
                               HAS_W: tl.constexpr, SOURCE_FIRST: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    image = scale * similarity_kl_sum(img_ptr, img_ptr + N * N, w_ptr, tau, eps, N, HAS_W, SOURCE_FIRST, BLOCK_R,
                                      BLOCK_N)
    high = scale * similarity_kl_sum(hf_ptr, hf_ptr + N * N, w_ptr, tau, eps, N, HAS_W, SOURCE_FIRST, BLOCK_R,
                                     BLOCK_N)
    mse = _sse_total(sse_ptr, tiles, BLOCK_T) * inv_count
    dtype = total_ptr.dtype.element_ty
    tl.store(image_ptr, image.to(dtype))
    tl.store(high_ptr, high.to(dtype))
    tl.store(mse_ptr, mse.to(dtype))
    tl.store(total_ptr, (lambda_img * image + lambda_hf * high + lambda_hfmse * mse).to(dtype))


@triton.jit
def _grad_of(ptr, PRESENT: tl.constexpr):
    """The upstream gradient at ptr (float64), 0 where the term got none."""
    if PRESENT:
        g = tl.load(ptr).to(tl.float64)
    else:
        g = tl.zeros((), dtype=tl.float64)
    return g


@triton.jit(do_not_specialize=["N"])
def _domainstudio_terms_backward_kernel(gt_ptr, gi_ptr, gh_ptr, gm_ptr, hf_ptr, img_ptr, w_ptr, dhf_ptr, dimg_ptr,
                                        gsse_ptr, tau: tl.float64, scale: tl.float64, eps: tl.float64,
                                        lambda_img: tl.float64, lambda_hf: tl.float64, lambda_hfmse: tl.float64,
                                        inv_count: tl.float64, N, GRADS: tl.constexpr, HAS_W: tl.constexpr,
                                        SOURCE_FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gradients of the Grams (dhf, dimg: (2, N, N)) and of the hf-MSE sums (gsse: (2,), the source's 0):
    program 0 the image KL's (and gsse), program 1 the hf KL's (one KL per program: a single program holding
    both spilled). GRADS: bit k set where output k of (total, image, high_frequency, hf_mse) has a gradient."""
    g_total = _grad_of(gt_ptr, GRADS & 1)
    if tl.program_id(0) == 0:
        c_mse = (_grad_of(gm_ptr, GRADS & 8) + lambda_hfmse * g_total) * inv_count
        dtype = gsse_ptr.dtype.element_ty
        tl.store(gsse_ptr, tl.zeros((), dtype=dtype))
        tl.store(gsse_ptr + 1, c_mse.to(dtype))
        c = (_grad_of(gi_ptr, GRADS & 2) + lambda_img * g_total) * scale
        similarity_kl_grads(c, img_ptr, img_ptr + N * N, w_ptr, dimg_ptr, dimg_ptr + N * N, tau, eps, N, HAS_W,
                            SOURCE_FIRST, BLOCK_R, BLOCK_N)
    else:
        c = (_grad_of(gh_ptr, GRADS & 4) + lambda_hf * g_total) * scale
        similarity_kl_grads(c, hf_ptr, hf_ptr + N * N, w_ptr, dhf_ptr, dhf_ptr + N * N, tau, eps, N, HAS_W,
                            SOURCE_FIRST, BLOCK_R, BLOCK_N)


def _check_terms(hf: torch.Tensor, image: torch.Tensor, row_weights) -> int:
    n = hf.shape[-1]
    for name, g in (("hf", hf), ("image", image)):
        if g.dtype not in (torch.float32, torch.float64) or g.shape != (2, n, n) or n < 3 or not g.is_contiguous():
            raise ValueError(f"domainstudio_terms: `{name}` must be contiguous float32/float64 (2, N, N) Grams with "
                             f"N >= 3, got {g.dtype} {tuple(g.shape)}")
    if row_weights is not None and row_weights.shape != (n,):
        raise ValueError(f"domainstudio_terms: `row_weights` must have shape ({n},), got {tuple(row_weights.shape)}")
    return n


def _terms_meta(n: int, row_weights, source_first: bool, per_warp: int, min_warps: int) -> dict:
    """Meta-parameters of the tail kernels: ``per_warp`` tile elements per warp, at least ``min_warps``
    (no register spills on sm_80/sm_90 up to N=1024)."""
    block_r, block_n = tail_blocks(n)
    return dict(HAS_W=row_weights is not None, SOURCE_FIRST=source_first, BLOCK_R=block_r, BLOCK_N=block_n,
                num_warps=max(min_warps, min(32, block_r * block_n // per_warp)))


@on_input_device
def domainstudio_terms(hf: torch.Tensor, image: torch.Tensor, sse: torch.Tensor, row_weights: torch.Tensor | None,
                       lambdas, tau: float, source_first: bool, scale: float, inv_count: float):
    """``(total, image, high_frequency, hf_mse)`` (0-d, the Grams' dtype) from :func:`domainstudio_pair_grams`'s
    outputs. ``row_weights`` (N,) / ``scale``: the anchors and the reduction, as :func:`similarity_kl`;
    ``inv_count``: 1 / the hf positions of the adapted batch."""
    n = _check_terms(hf, image, row_weights)
    outs = [new_output((), hf.dtype, hf.device) for _ in range(4)]
    tiles = sse.shape[1]
    _domainstudio_terms_kernel[(1,)](
        hf, image, sse, hf if row_weights is None else row_weights, *outs, float(tau), float(scale), COSINE_EPS,
        *map(float, lambdas), float(inv_count), n, tiles, BLOCK_T=16,
        **_terms_meta(n, row_weights, source_first, per_warp=32, min_warps=4))
    return tuple(outs)


@on_input_device
def domainstudio_terms_backward(grads, hf: torch.Tensor, image: torch.Tensor, row_weights: torch.Tensor | None,
                                lambdas, tau: float, source_first: bool, scale: float, inv_count: float):
    """``(d hf Grams, d image Grams, d hf-MSE sums)``: (2, N, N), (2, N, N), (2,) for the upstream ``grads`` of
    ``(total, image, high_frequency, hf_mse)`` (0-d tensors, None where a term has none)."""
    n = _check_terms(hf, image, row_weights)
    d_hf = new_output((2, n, n), hf.dtype, hf.device)
    d_image = new_output((2, n, n), hf.dtype, hf.device)
    g_sse = new_output((2,), hf.dtype, hf.device)
    present = sum(1 << k for k, g in enumerate(grads) if g is not None)
    _domainstudio_terms_backward_kernel[(2,)](
        *(hf if g is None else g.reshape(()) for g in grads), hf, image, hf if row_weights is None else row_weights,
        d_hf, d_image, g_sse, float(tau), float(scale), COSINE_EPS, *map(float, lambdas), float(inv_count), n,
        GRADS=present, **_terms_meta(n, row_weights, source_first, per_warp=64, min_warps=4))
    return d_hf, d_image, g_sse
