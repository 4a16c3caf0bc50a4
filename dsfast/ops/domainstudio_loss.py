"""The whole DomainStudio loss, ``λ_img·KL_img + λ_hf·KL_hf + λ_hfmse·hfMSE``, in one pass over each batch.

Composed from the separate ops, the loss reads the adapted batch three times (image Gram, hf Gram,
hf-MSE) and the source twice. The compiled backends' ``domainstudio_grams`` computes all three
reductions from the same tiles: the image Gram, the hf Gram (stencil applied while loading, hf never
materialised) and ``sum((hf(x) - hf(target))²)``; ``domainstudio_grams_backward`` writes
``grad_x = (Gi + Giᵀ) x + hfᵀ((Gh + Ghᵀ) hf(x) + 2 g_sse (hf(x) - hf(target)))`` in one pass too,
recomputing hf instead of storing it. The N x N KL tails are shared with
:mod:`dsfast.ops.pairwise_similarity_kl`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from dsfast.ops._backend import extension_available, kernel_namespace, resolve_backend
from dsfast.ops.hf_pairwise_similarity_kl import hf_pairwise_similarity_kl
from dsfast.ops.high_frequency import hf_mse
from dsfast.ops.pairwise_similarity_kl import gram_dtype, kl_from_grams, pairwise_similarity_kl
from dsfast.ops.validate import check_image_batch, check_pairwise, check_same, promote, stencil_weights


@torch.library.custom_op("dsfast_triton::domainstudio_grams", mutates_args=())
def _triton_domainstudio_grams(
    x: torch.Tensor, target: torch.Tensor | None, weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dsfast.kernels import domainstudio_loss as kernels

    return kernels.domainstudio_grams(x, target, weights)


@torch.library.custom_op("dsfast_triton::domainstudio_grams_backward", mutates_args=())
def _triton_domainstudio_grams_backward(
    grad_image: torch.Tensor, grad_hf: torch.Tensor, grad_sse: torch.Tensor, x: torch.Tensor,
    target: torch.Tensor | None, weights: list[float],
) -> torch.Tensor:
    from dsfast.kernels import domainstudio_loss as kernels

    return kernels.domainstudio_grams_backward(grad_image, grad_hf, grad_sse, x, target, weights)


def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::domainstudio_grams")
    def _(x, target, weights):
        n, dtype = x.shape[0], gram_dtype(x.dtype)
        return x.new_empty((n, n), dtype=dtype), x.new_empty((n, n), dtype=dtype), x.new_empty((), dtype=dtype)

    @torch.library.register_fake(f"{namespace}::domainstudio_grams_backward")
    def _(grad_image, grad_hf, grad_sse, x, target, weights):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        x, target, weights = inputs
        ctx.save_for_backward(x, target)
        ctx.weights = weights

    def backward(ctx, grad_image, grad_hf, grad_sse):
        if ctx.needs_input_grad[1]:
            raise NotImplementedError("domainstudio_grams: no gradient for `target` (use the composed ops)")
        x, target = ctx.saved_tensors
        grad_x = ops.domainstudio_grams_backward(
            grad_image.contiguous(), grad_hf.contiguous(), grad_sse, x, target, ctx.weights)
        return grad_x, None, None

    torch.library.register_autograd(f"{namespace}::domainstudio_grams", backward, setup_context=setup_context)


_register("dsfast_triton")
if extension_available():
    _register("dsfast")


class DomainStudioTerms(NamedTuple):
    total: torch.Tensor
    image: torch.Tensor
    high_frequency: torch.Tensor
    hf_mse: torch.Tensor


def _check(op, source, adapted, real, lambdas, stencil, pairwise_options) -> None:
    """Every argument the nonzero terms use, checked before any work."""
    lambda_img, lambda_hf, lambda_hfmse = lambdas
    if lambda_hf or lambda_hfmse:
        stencil_weights(op, stencil)
    if lambda_img or lambda_hf:
        check_pairwise(op, source, adapted, **pairwise_options)
    if lambda_hf:
        check_image_batch(op, "source", source)
        check_image_batch(op, "adapted", adapted)
    if lambda_hfmse:
        check_image_batch(op, "adapted", adapted)
        check_image_batch(op, "real", real)
        check_same(op, adapted, real, names=("adapted", "real"))


def domainstudio_loss(
    source: torch.Tensor,
    adapted: torch.Tensor,
    real: torch.Tensor,
    *,
    lambda_img: float = 4.0,
    lambda_hf: float = 4.0,
    lambda_hfmse: float = 1.0,
    stencil: str = "domainstudio",
    tau: float = 1.0,
    direction: str = "source||adapted",
    reduction: str = "mean",
    anchors: int | torch.Tensor | None = None,
    detach_source: bool = True,
    backend: str = "auto",
    check_finite: bool | None = None,
) -> DomainStudioTerms:
    """``(total, image, high_frequency, hf_mse)`` of the DomainStudio regularisers on x̂0 predictions.

    ``image = pairwise_similarity_kl(source, adapted)``, ``high_frequency =
    hf_pairwise_similarity_kl(source, adapted)``, ``hf_mse = hf_mse(adapted, real)`` (same options),
    ``total = λ_img·image + λ_hf·high_frequency + λ_hfmse·hf_mse``. A term with weight 0 is not
    computed (it is 0). ``check_finite`` as in :func:`pairwise_similarity_kl`.
    With all three terms on a compiled backend, each batch is read once in the
    forward and once in the backward; otherwise (weight 0, backend ``torch``, or ``real`` needing a
    gradient) the separate ops compute the same values.
    Mixed floating dtypes: with a pairwise term and the hf-MSE on, the three inputs are promoted together
    (:func:`~dsfast.ops.validate.promote`: a cast copy of each lower-precision one, which the one-pass
    kernels then read); otherwise each term promotes its own pair. Each term then has the dtype the
    separate op gives for those promoted inputs.
    """
    op = "domainstudio_loss"
    lambdas = (lambda_img, lambda_hf, lambda_hfmse)
    pairwise_options = dict(tau=tau, direction=direction, reduction=reduction, anchors=anchors,
                            check_finite=check_finite)
    _check(op, source, adapted, real, lambdas, stencil, pairwise_options)
    if (lambda_img or lambda_hf) and lambda_hfmse:  # the terms share `adapted`: one dtype for all three
        source, adapted, real = promote(source, adapted, real)
    chosen = resolve_backend(backend, adapted.device)
    fused = all(lambdas) and chosen != "torch" and not (real.requires_grad and torch.is_grad_enabled())
    if fused:
        grams = kernel_namespace(chosen).domainstudio_grams
        weights = stencil_weights(op, stencil)
        image_s, hf_s, _ = grams(source.detach() if detach_source else source, None, weights)
        image_a, hf_a, sse = grams(adapted, real, weights)
        image = kl_from_grams(op, image_s, image_a, backend=chosen, **pairwise_options)
        high_frequency = kl_from_grams(op, hf_s, hf_a, backend=chosen, **pairwise_options)
        mse = sse / (adapted.numel() // 4)
    else:
        zero = adapted.new_zeros((), dtype=torch.float32)
        pairwise = dict(pairwise_options, detach_source=detach_source, backend=backend)
        image = pairwise_similarity_kl(source, adapted, **pairwise) if lambda_img else zero
        high_frequency = hf_pairwise_similarity_kl(source, adapted, stencil=stencil, **pairwise) if lambda_hf else zero
        mse = hf_mse(adapted, real, stencil=stencil, backend=backend) if lambda_hfmse else zero
    total = lambda_img * image + lambda_hf * high_frequency + lambda_hfmse * mse
    return DomainStudioTerms(total=total, image=image, high_frequency=high_frequency, hf_mse=mse)
