"""Fused high-frequency pairwise-similarity KL: the Gram of hf(x) straight from x.

The compiled backends never materialise the detail bands or the hf map: ``hf_gram`` applies the
2x2 stencil while it accumulates the Gram, and ``hf_gram_backward`` recomputes hf instead of
storing it. The small N x N KL is shared with :mod:`dsfast.ops.pairwise_similarity_kl`.
"""
from __future__ import annotations

import torch

from dsfast import reference
from dsfast.ops._backend import extension_available, kernel_namespace, resolve_backend
from dsfast.ops.pairwise_similarity_kl import gram_dtype, similarity_kl
from dsfast.ops.validate import check_image_batch, check_pairwise, promote, stencil_weights


@torch.library.custom_op("dsfast_triton::hf_gram", mutates_args=())
def _triton_hf_gram(x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    from dsfast.kernels import hf_pairwise_similarity_kl as kernels

    return kernels.hf_gram(x, weights)


@torch.library.custom_op("dsfast_triton::hf_gram_backward", mutates_args=())
def _triton_hf_gram_backward(grad_gram: torch.Tensor, x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    from dsfast.kernels import hf_pairwise_similarity_kl as kernels

    return kernels.hf_gram_backward(grad_gram, x, weights)


def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::hf_gram")
    def _(x, weights):
        return x.new_empty((x.shape[0], x.shape[0]), dtype=gram_dtype(x.dtype))

    @torch.library.register_fake(f"{namespace}::hf_gram_backward")
    def _(grad_gram, x, weights):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.weights = inputs[1]

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ops.hf_gram_backward(grad.contiguous(), x, ctx.weights), None

    torch.library.register_autograd(f"{namespace}::hf_gram", backward, setup_context=setup_context)


_register("dsfast_triton")
if extension_available():
    _register("dsfast")


def hf_pairwise_similarity_kl(
    source: torch.Tensor,
    adapted: torch.Tensor,
    *,
    stencil: str = "domainstudio",
    tau: float = 1.0,
    direction: str = "source||adapted",
    reduction: str = "mean",
    detach_source: bool = True,
    anchors: int | torch.Tensor | None = None,
    backend: str = "auto",
    check_finite: bool | None = None,
) -> torch.Tensor:
    """:func:`~dsfast.ops.pairwise_similarity_kl` of ``high_frequency(source)`` and ``high_frequency(adapted)``."""
    op = "hf_pairwise_similarity_kl"
    weights = stencil_weights(op, stencil)
    check_image_batch(op, "source", source)
    check_image_batch(op, "adapted", adapted)
    check_pairwise(op, source, adapted, tau=tau, direction=direction, reduction=reduction, anchors=anchors,
                   check_finite=check_finite)
    source, adapted = promote(source, adapted)
    chosen = resolve_backend(backend, adapted.device)

    def gram_fn(x):
        if chosen == "torch":
            return reference.gram(reference.high_frequency(x, stencil))
        return kernel_namespace(chosen).hf_gram(x, weights)

    return similarity_kl(
        op, gram_fn, source, adapted,
        tau=tau, direction=direction, reduction=reduction, detach_source=detach_source, anchors=anchors,
        check_finite=check_finite, backend=chosen,
    )
