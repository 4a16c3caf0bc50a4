"""The whole DomainStudio loss, ``λ_img·KL_img + λ_hf·KL_hf + λ_hfmse·hfMSE``, in one pass over each batch.

Composed from the separate ops, the loss reads the adapted batch three times (image Gram, hf Gram,
hf-MSE) and the source twice. The compiled backends' ``domainstudio_grams`` computes all three
reductions from the same tiles: the image Gram, the hf Gram (stencil applied while loading, hf never
materialised) and ``sum((hf(x) - hf(target))²)`` (with per-sample hf-MSE weights w: ``Σ_i w_i
sum((hf(x_i) - hf(target_i))²)``); ``domainstudio_grams_backward`` writes
``grad_x = (Gi + Giᵀ) x + hfᵀ((Gh + Ghᵀ) hf(x) + 2 g_sse diag(w) (hf(x) - hf(target)))`` in one pass too,
recomputing hf instead of storing it. The N x N KL tails are shared with
:mod:`dsfast.ops.pairwise_similarity_kl`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from dsfast.ops._backend import extension_available, kernel_namespace, resolve_backend
from dsfast.ops.hf_pairwise_similarity_kl import hf_pairwise_similarity_kl
from dsfast.ops.high_frequency import hf_mse
from dsfast.ops.high_frequency import high_frequency as hf_map
from dsfast.ops.pairwise_similarity_kl import (
    gram_dtype,
    kl_from_grams,
    pairwise_similarity_kl,
    row_weights,
    sample_anchors,
)
from dsfast.ops.validate import (
    check_finite_gram,
    check_image_batch,
    check_pairwise,
    check_same,
    check_sample_weights,
    promote,
    stencil_weights,
)


# sse_weights (every domainstudio_*grams* op): per-sample weights (N,) of the hf-MSE sum, None = all ones.
@torch.library.custom_op("dsfast_triton::domainstudio_grams", mutates_args=())
def _triton_domainstudio_grams(
    x: torch.Tensor, target: torch.Tensor | None, weights: list[float], sse_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dsfast.kernels import domainstudio_loss as kernels

    return kernels.domainstudio_grams(x, target, weights, sse_weights)


@torch.library.custom_op("dsfast_triton::domainstudio_grams_backward", mutates_args=())
def _triton_domainstudio_grams_backward(
    grad_image: torch.Tensor, grad_hf: torch.Tensor, grad_sse: torch.Tensor, x: torch.Tensor,
    target: torch.Tensor | None, weights: list[float], sse_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    from dsfast.kernels import domainstudio_loss as kernels

    return kernels.domainstudio_grams_backward(grad_image, grad_hf, grad_sse, x, target, weights, sse_weights)


@torch.library.custom_op("dsfast_triton::domainstudio_pair_grams", mutates_args=())
def _triton_domainstudio_pair_grams(
    source: torch.Tensor, adapted: torch.Tensor, target: torch.Tensor, weights: list[float],
    sse_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dsfast.kernels import domainstudio_loss as kernels

    return kernels.domainstudio_pair_grams(source, adapted, target, weights, sse_weights)


@torch.library.register_fake("dsfast_triton::domainstudio_pair_grams")
def _(source, adapted, target, weights, sse_weights=None):
    from dsfast.kernels import domainstudio_loss as kernels

    n, dtype = adapted.shape[0], gram_dtype(adapted.dtype)
    return (adapted.new_empty((2, n, n), dtype=dtype), adapted.new_empty((2, n, n), dtype=dtype),
            adapted.new_empty((2, kernels.sse_tiles(n)), dtype=dtype))


@torch.library.custom_op("dsfast_triton::domainstudio_terms", mutates_args=())
def _triton_domainstudio_terms(
    hf: torch.Tensor, image: torch.Tensor, sse: torch.Tensor, row_weights: torch.Tensor | None, lambdas: list[float],
    tau: float, source_first: bool, scale: float, inv_count: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from dsfast.kernels import domainstudio_loss as kernels

    return kernels.domainstudio_terms(hf, image, sse, row_weights, lambdas, tau, source_first, scale, inv_count)


@torch.library.register_fake("dsfast_triton::domainstudio_terms")
def _(hf, image, sse, row_weights, lambdas, tau, source_first, scale, inv_count):
    return tuple(hf.new_empty(()) for _ in range(4))


@torch.library.custom_op("dsfast_triton::domainstudio_terms_backward", mutates_args=())
def _triton_domainstudio_terms_backward(
    g_total: torch.Tensor | None, g_image: torch.Tensor | None, g_hf: torch.Tensor | None, g_mse: torch.Tensor | None,
    hf: torch.Tensor, image: torch.Tensor, row_weights: torch.Tensor | None, lambdas: list[float], tau: float,
    source_first: bool, scale: float, inv_count: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dsfast.kernels import domainstudio_loss as kernels

    return kernels.domainstudio_terms_backward((g_total, g_image, g_hf, g_mse), hf, image, row_weights, lambdas, tau,
                                               source_first, scale, inv_count)


@torch.library.register_fake("dsfast_triton::domainstudio_terms_backward")
def _(g_total, g_image, g_hf, g_mse, hf, image, row_weights, lambdas, tau, source_first, scale, inv_count):
    return torch.empty_like(hf), torch.empty_like(image), hf.new_empty((2,))


class _TritonDomainStudioLoss(torch.autograd.Function):
    """The whole loss on the Triton backend in 3 launches forward (tickets' memset, both batches' Grams and
    hf-MSE sums, the tail) and 2 backward (the tail's gradients, the adapted batch's; 3 with a source gradient).

    Returns ``(total, image, high_frequency, hf_mse, hf Grams, image Grams)``, the Grams (2, N, N) for the
    finite check only. Gradients are not materialised: a term nobody differentiates costs no zero-fill.
    """

    @staticmethod
    def forward(ctx, source, adapted, real, weights, row_weights, options, sse_weights):
        ops = torch.ops.dsfast_triton
        hf, image, sse = ops.domainstudio_pair_grams(source, adapted, real, weights, sse_weights)
        terms = ops.domainstudio_terms(hf, image, sse, row_weights, *options)
        ctx.save_for_backward(source, adapted, real, hf, image, row_weights, sse_weights)
        ctx.weights, ctx.options = weights, options
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(hf, image)
        return (*terms, hf, image)

    @staticmethod
    def backward(ctx, g_total, g_image, g_hf, g_mse, _hf, _image):
        grads = (g_total, g_image, g_hf, g_mse)
        if all(g is None for g in grads):
            return None, None, None, None, None, None, None
        ops = torch.ops.dsfast_triton
        source, adapted, real, hf, image, row_weights, sse_weights = ctx.saved_tensors
        d_hf, d_image, g_sse = ops.domainstudio_terms_backward(*grads, hf, image, row_weights, *ctx.options)
        grad_source = grad_adapted = None
        if ctx.needs_input_grad[1]:
            grad_adapted = ops.domainstudio_grams_backward(d_image[1], d_hf[1], g_sse[1], adapted, real, ctx.weights,
                                                           sse_weights)
        if ctx.needs_input_grad[0]:  # the source's hf-MSE sum is unused (g_sse[0] = 0): no weights
            grad_source = ops.domainstudio_grams_backward(d_image[0], d_hf[0], g_sse[0], source, None, ctx.weights)
        return grad_source, grad_adapted, None, None, None, None, None


def _triton_terms(op, source, adapted, real, lambdas, weights, hfmse_weights, *, tau, direction, reduction, anchors,
                  check_finite):
    """The four terms through :class:`_TritonDomainStudioLoss` (all lambdas nonzero, arguments checked)."""
    n = adapted.shape[0]
    rows, scale = row_weights(sample_anchors(anchors, n, adapted.device), n, reduction, adapted.device)
    options = ([float(v) for v in lambdas], float(tau), direction == "source||adapted", scale, 1.0 / (adapted.numel() // 4))
    total, image, high_frequency, mse, hf_grams, image_grams = _TritonDomainStudioLoss.apply(
        source, adapted, real, weights, rows, options, hfmse_weights)
    for b, name in enumerate(("source", "adapted")):
        check_finite_gram(op, name, image_grams[b], check_finite)
        check_finite_gram(op, name, hf_grams[b], check_finite)
    return DomainStudioTerms(total=total, image=image, high_frequency=high_frequency, hf_mse=mse)


def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::domainstudio_grams")
    def _(x, target, weights, sse_weights=None):
        n, dtype = x.shape[0], gram_dtype(x.dtype)
        return x.new_empty((n, n), dtype=dtype), x.new_empty((n, n), dtype=dtype), x.new_empty((), dtype=dtype)

    @torch.library.register_fake(f"{namespace}::domainstudio_grams_backward")
    def _(grad_image, grad_hf, grad_sse, x, target, weights, sse_weights=None):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        x, target, weights, *rest = inputs
        ctx.save_for_backward(x, target, rest[0] if rest else None)
        ctx.weights = weights

    def backward(ctx, grad_image, grad_hf, grad_sse):
        for i, name in ((1, "target"), (3, "sse_weights")):
            if len(ctx.needs_input_grad) > i and ctx.needs_input_grad[i]:
                raise NotImplementedError(f"domainstudio_grams: no gradient for `{name}` (use the composed ops)")
        x, target, sse_weights = ctx.saved_tensors
        grad_x = ops.domainstudio_grams_backward(
            grad_image.contiguous(), grad_hf.contiguous(), grad_sse, x, target, ctx.weights, sse_weights)
        return grad_x, None, None, None

    torch.library.register_autograd(f"{namespace}::domainstudio_grams", backward, setup_context=setup_context)


_register("dsfast_triton")
if extension_available():
    _register("dsfast")


class DomainStudioTerms(NamedTuple):
    total: torch.Tensor
    image: torch.Tensor
    high_frequency: torch.Tensor
    hf_mse: torch.Tensor


def _check(op, source, adapted, real, lambdas, stencil, pairwise_options, hfmse_weights) -> None:
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
        check_sample_weights(op, "hfmse_weights", hfmse_weights, adapted, pairwise_options["check_finite"])


def _weighted_hf_mse(adapted, real, hfmse_weights, *, stencil, backend) -> torch.Tensor:
    """``(1/N) Σ_i w_i mean((hf(adapted_i) - hf(real_i))²)`` from the separate ops, in hf_mse's dtype (float32
    for half inputs); ``hfmse_weights`` None: :func:`~dsfast.ops.hf_mse` itself."""
    if hfmse_weights is None:
        return hf_mse(adapted, real, stencil=stencil, backend=backend)
    detail = hf_map(adapted - real, stencil, backend=backend)  # hf is linear, as in hf_mse
    per_sample = detail.to(torch.promote_types(detail.dtype, torch.float32)).pow(2).flatten(1).mean(1)
    return (per_sample * hfmse_weights.to(per_sample.dtype)).mean()


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
    hfmse_weights: torch.Tensor | None = None,
) -> DomainStudioTerms:
    """``(total, image, high_frequency, hf_mse)`` of the DomainStudio regularisers on x̂0 predictions.

    ``image = pairwise_similarity_kl(source, adapted)``, ``high_frequency =
    hf_pairwise_similarity_kl(source, adapted)``, ``hf_mse = hf_mse(adapted, real)`` (same options),
    ``total = λ_img·image + λ_hf·high_frequency + λ_hfmse·hf_mse``. A term with weight 0 is not
    computed (it is 0). ``check_finite`` as in :func:`pairwise_similarity_kl`.
    ``hfmse_weights``: per-sample weights w (N,) of the hf-MSE, ``hf_mse = (1/N) Σ_i w_i
    mean((hf(adapted_i) - hf(real_i))²)`` (None: all ones, the unweighted mean); floating, on the inputs'
    device, finite and non-negative (the value checks follow ``check_finite``: by default on CPU only, since
    on a GPU they would wait for the device). Used by the hf-MSE only (checked only when λ_hfmse is nonzero).
    With all three terms on a compiled backend, each batch is read once in the
    forward and once in the backward (the weights scale each sample's hf-MSE sum and its gradient there);
    otherwise (weight 0, backend ``torch``, or ``real`` or ``hfmse_weights`` needing a gradient) the
    separate ops compute the same values.
    Mixed floating dtypes: with a pairwise term and the hf-MSE on, the three inputs are promoted together
    (:func:`~dsfast.ops.validate.promote`: a cast copy of each lower-precision one, which the one-pass
    kernels then read); otherwise each term promotes its own pair. Each term then has the dtype the
    separate op gives for those promoted inputs.
    """
    op = "domainstudio_loss"
    lambdas = (lambda_img, lambda_hf, lambda_hfmse)
    pairwise_options = dict(tau=tau, direction=direction, reduction=reduction, anchors=anchors,
                            check_finite=check_finite)
    _check(op, source, adapted, real, lambdas, stencil, pairwise_options, hfmse_weights)
    if (lambda_img or lambda_hf) and lambda_hfmse:  # the terms share `adapted`: one dtype for all three
        source, adapted, real = promote(source, adapted, real)
    chosen = resolve_backend(backend, adapted.device)
    constant = [real] + ([] if hfmse_weights is None else [hfmse_weights])  # the fused kernels' constants
    fused = all(lambdas) and chosen != "torch" and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in constant))
    if fused and chosen == "triton":
        return _triton_terms(op, source.detach() if detach_source else source, adapted, real, lambdas,
                             stencil_weights(op, stencil), hfmse_weights, **pairwise_options)
    if fused:
        grams = kernel_namespace(chosen).domainstudio_grams
        weights = stencil_weights(op, stencil)
        image_s, hf_s, _ = grams(source.detach() if detach_source else source, None, weights)
        image_a, hf_a, sse = grams(adapted, real, weights, hfmse_weights)
        image = kl_from_grams(op, image_s, image_a, backend=chosen, **pairwise_options)
        high_frequency = kl_from_grams(op, hf_s, hf_a, backend=chosen, **pairwise_options)
        mse = sse / (adapted.numel() // 4)
    else:
        zero = adapted.new_zeros((), dtype=torch.float32)
        pairwise = dict(pairwise_options, detach_source=detach_source, backend=backend)
        image = pairwise_similarity_kl(source, adapted, **pairwise) if lambda_img else zero
        high_frequency = hf_pairwise_similarity_kl(source, adapted, stencil=stencil, **pairwise) if lambda_hf else zero
        mse = _weighted_hf_mse(adapted, real, hfmse_weights, stencil=stencil, backend=backend) if lambda_hfmse else zero
    total = lambda_img * image + lambda_hf * high_frequency + lambda_hfmse * mse
    return DomainStudioTerms(total=total, image=image, high_frequency=high_frequency, hf_mse=mse)
