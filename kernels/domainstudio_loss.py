"""The reductions of the whole DomainStudio loss in one pass over a batch, and the backward in one pass.

``domainstudio_grams(x, target)`` returns ``(x xᵀ, hf(x) hf(x)ᵀ, sum((hf(x) - hf(target))²))`` (no
target: ``sum(hf(x)²)``); ``domainstudio_grams_backward`` writes
``(Gi + Giᵀ) x + hfᵀ((Gh + Ghᵀ) hf(x) + 2 g_sse (hf(x) - hf(target)))``.

Both are the hf Gram kernels of :mod:`.hf_pairwise_similarity_kl` with their ``DS`` flag, on smaller tiles
(they hold the image Gram's accumulators too: at most 32 x 32 output tiles and K = 16 forward, half the
positions per program backward, so nothing spills):

* Forward: ``hf_gram``'s split-K Gram (``_gram_partial_kernel``, upper-triangular tile pairs,
  deterministic reduce). A K block's two input rows, read once as contiguous runs, give both the hf
  panel (stencil in registers) and the image Gram's operands (``top topᵀ + bottom bottomᵀ``, the pixels
  of x in another order, multiplied natively for 16-bit inputs); the diagonal tiles (every sample exactly
  once) also read the target's rows for the hf-MSE partial sums, one per (split, tile).
* Backward: ``hf_gram_backward``'s kernel: a program owns (a row tile of N) x (positions of one hf row)
  and accumulates ``Mh hf`` and ``Mi`` times the two input rows over the batch with ``tl.dot``, adds the
  hf-MSE term of its own rows and writes the two output rows once (contiguous).

x is read once per pass (and target once); the hf math in fp32 (fp64 for fp64 inputs), fp32 dots as 3xTF32.
"""
from __future__ import annotations

import torch
import triton

from ._launch import accumulate_dtype, as_weights, new_output, on_input_device
from .hf_pairwise_similarity_kl import _check_x, _compute_tl, hf_gram_config, launch_hf_gram_backward
from .pairwise_similarity_kl import launch_gram


def _check_target(x: torch.Tensor, target: torch.Tensor | None, name: str) -> None:
    if target is None:
        return
    _check_x(target, f"{name} (target)")
    if target.shape != x.shape or target.dtype != x.dtype or target.device != x.device:
        raise ValueError(f"{name}: target must match x in shape, dtype and device, got {tuple(target.shape)} "
                         f"{target.dtype} {target.device} and {tuple(x.shape)} {x.dtype} {x.device}")


@on_input_device
def domainstudio_grams(x: torch.Tensor, target: torch.Tensor | None, weights):
    """``(N, C, H, W)`` -> ``(image Gram, hf Gram, hf-MSE sum)``: (N, N), (N, N), () in fp32 (fp64)."""
    _check_x(x, "domainstudio_grams")
    _check_target(x, target, "domainstudio_grams")
    n, c, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    d = c * h * w
    acc_dtype = accumulate_dtype(x.dtype)
    image = new_output((n, n), acc_dtype, x.device)
    hf = new_output((n, n), acc_dtype, x.device)
    if n == 0 or d == 0:
        return image.zero_(), hf.zero_(), torch.zeros((), dtype=acc_dtype, device=x.device)
    operand = _compute_tl(x.dtype)
    cfg = hf_gram_config(n, c, h, w, operand, x.device, ds_dtype=x.dtype)
    sse = new_output((cfg.splits, triton.cdiv(n, cfg.block_n)), acc_dtype, x.device)
    s_n, s_c, s_h, s_w = x.stride()
    launch_gram(x, cfg, hf, operand, s_n=s_n, hf_geometry=(triton.cdiv(w, cfg.block_k), h, w, s_c, s_h, s_w),
                weights=as_weights(weights), image=image, target=target, sse=sse)
    return image, hf, sse.sum()


@on_input_device
def domainstudio_grams_backward(grad_image: torch.Tensor, grad_hf: torch.Tensor, grad_sse: torch.Tensor,
                                x: torch.Tensor, target: torch.Tensor | None, weights) -> torch.Tensor:
    """``(N, C, H, W)`` in the dtype of x: ``(Gi + Giᵀ) x + hfᵀ((Gh + Ghᵀ) hf(x) + 2 g_sse (hf(x) - hf(t)))``."""
    name = "domainstudio_grams_backward"
    _check_x(x, name)
    _check_target(x, target, name)
    n = x.shape[0]
    for g, what in ((grad_image, "grad_image"), (grad_hf, "grad_hf")):
        if g.shape != (n, n):
            raise ValueError(f"{name}: {what} must be ({n}, {n}), got {tuple(g.shape)}")
    if grad_sse.numel() != 1:
        raise ValueError(f"{name}: grad_sse must hold one number, got shape {tuple(grad_sse.shape)}")
    out = new_output(x.shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    return launch_hf_gram_backward(grad_hf, x, weights, out, grad_image=grad_image, grad_sse=grad_sse, target=target)
