"""Pairwise-similarity KL (DomainStudio / CDC): the N x N Gram on a backend, the small softmax/KL in torch.

The expensive part is the Gram ``X Xᵀ`` (O(N² D)); the cosine normalisation, diagonal removal,
softmax and KL work on N x N numbers and are shared by every backend
(:func:`dsfast.reference.similarity_kl_from_gram`), so autograd carries the gradient back to the
Gram and the backend's ``gram_backward`` turns it into ``(G + Gᵀ) X``.
"""
from __future__ import annotations

import torch

from dsfast import reference
from dsfast.ops._backend import extension_available, kernel_namespace, resolve_backend
from dsfast.ops.validate import check_finite_gram, check_pairwise


@torch.library.custom_op("dsfast_triton::gram", mutates_args=())
def _triton_gram(x: torch.Tensor) -> torch.Tensor:
    from dsfast.kernels import pairwise_similarity_kl as kernels

    return kernels.gram(x)


@torch.library.custom_op("dsfast_triton::gram_backward", mutates_args=())
def _triton_gram_backward(grad_gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from dsfast.kernels import pairwise_similarity_kl as kernels

    return kernels.gram_backward(grad_gram, x)


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """Grams accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::gram")
    def _(x):
        return x.new_empty((x.shape[0], x.shape[0]), dtype=gram_dtype(x.dtype))

    @torch.library.register_fake(f"{namespace}::gram_backward")
    def _(grad_gram, x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ops.gram_backward(grad.contiguous(), x)

    torch.library.register_autograd(f"{namespace}::gram", backward, setup_context=setup_context)


_register("dsfast_triton")
if extension_available():
    _register("dsfast")


def sample_anchors(anchors, n: int, device) -> torch.Tensor | None:
    """``None`` (all rows), a count k (k rows drawn without replacement), or explicit row indices."""
    if anchors is None or isinstance(anchors, torch.Tensor):
        return anchors
    return torch.randperm(n, device=device)[:anchors]


def similarity_kl(
    op: str,
    gram_fn,
    source: torch.Tensor,
    adapted: torch.Tensor,
    *,
    tau: float,
    direction: str,
    reduction: str,
    detach_source: bool,
    anchors,
    check_finite: bool | None = None,
) -> torch.Tensor:
    """Shared body of the pairwise losses (arguments already checked): Gram of each side, then the N x N KL."""
    if detach_source:
        with torch.no_grad():
            g_source = gram_fn(source)
    else:
        g_source = gram_fn(source)
    g_adapted = gram_fn(adapted)
    return kl_from_grams(op, g_source, g_adapted, tau=tau, direction=direction, reduction=reduction,
                         anchors=anchors, check_finite=check_finite)


def kl_from_grams(op: str, g_source, g_adapted, *, tau: float, direction: str, reduction: str, anchors,
                  check_finite: bool | None = None) -> torch.Tensor:
    """The N x N tail shared by every pairwise loss: finite check, then the KL of the two Grams."""
    check_finite_gram(op, "source", g_source, check_finite)
    check_finite_gram(op, "adapted", g_adapted, check_finite)
    # The KL of two close softmaxes is a small difference of large terms: float32 would lose
    # ~1e-4 of it, so the N x N part runs in float64 (negligible next to the Gram).
    loss = reference.similarity_kl_from_gram(
        g_source.double(),
        g_adapted.double(),
        tau=tau,
        direction=direction,
        reduction=reduction,
        anchors=sample_anchors(anchors, g_source.shape[0], g_source.device),
    )
    return loss.to(g_adapted.dtype)


def pairwise_similarity_kl(
    source: torch.Tensor,
    adapted: torch.Tensor,
    *,
    tau: float = 1.0,
    direction: str = "source||adapted",
    reduction: str = "mean",
    detach_source: bool = True,
    anchors: int | torch.Tensor | None = None,
    backend: str = "auto",
    check_finite: bool | None = None,
) -> torch.Tensor:
    """KL between the softmaxed pairwise cosine similarities of two batches ``(N, ...)``, N >= 3.

    ``direction="source||adapted"`` is the official ``KLDivLoss()(log p_adapted, p_source)``;
    ``reduction="mean"`` averages over the N(N-1) entries as the official code does, ``"batchmean"``
    sums over j and averages over i. ``anchors``: a count of randomly drawn rows, or row indices.
    ``check_finite``: NaN/Inf inputs raise a ValueError; by default (``None``) only for CPU tensors,
    where the check needs no device sync; on a GPU they give a NaN loss unless ``check_finite=True``.
    """
    op = "pairwise_similarity_kl"
    check_pairwise(op, source, adapted, tau=tau, direction=direction, reduction=reduction, anchors=anchors,
                   check_finite=check_finite)
    chosen = resolve_backend(backend, adapted.device)

    def gram_fn(x):
        flat = x.reshape(x.shape[0], -1)
        return reference.gram(flat) if chosen == "torch" else kernel_namespace(chosen).gram(flat)

    return similarity_kl(
        op, gram_fn, source, adapted,
        tau=tau, direction=direction, reduction=reduction, detach_source=detach_source, anchors=anchors,
        check_finite=check_finite,
    )
