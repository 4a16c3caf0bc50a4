"""Pairwise-similarity KL (DomainStudio / CDC): the N x N Gram on a backend, then the small softmax/KL.

The expensive part is the Gram ``X Xᵀ`` (O(N² D)); the cosine normalisation, diagonal removal,
softmax and KL work on N x N numbers and are shared by every backend: on CPU the reference
(:func:`dsfast.reference.similarity_kl_from_gram`, float64), on the Triton backend and on CUDA tensors
the Triton tail ``dsfast_triton::similarity_kl`` (the same float64 math in one launch forward and one
backward). Autograd carries the gradient back to the Gram and the backend's ``gram_backward`` turns it
into ``(G + Gᵀ) X``.
"""
from __future__ import annotations

import torch

from dsfast import reference
from dsfast.ops._backend import extension_available, kernel_namespace, resolve_backend, triton_runs_on
from dsfast.ops.validate import check_finite_gram, check_pairwise, promote


@torch.library.custom_op("dsfast_triton::gram", mutates_args=())
def _triton_gram(x: torch.Tensor) -> torch.Tensor:
    from dsfast.kernels import pairwise_similarity_kl as kernels

    return kernels.gram(x)


@torch.library.custom_op("dsfast_triton::gram_backward", mutates_args=())
def _triton_gram_backward(grad_gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from dsfast.kernels import pairwise_similarity_kl as kernels

    return kernels.gram_backward(grad_gram, x)


@torch.library.custom_op("dsfast_triton::similarity_kl", mutates_args=())
def _triton_similarity_kl(g_source: torch.Tensor, g_adapted: torch.Tensor, weights: torch.Tensor | None, tau: float,
                          source_first: bool, scale: float) -> torch.Tensor:
    from dsfast.kernels import pairwise_similarity_kl as kernels

    return kernels.similarity_kl(g_source, g_adapted, weights, tau, source_first, scale)


@torch.library.custom_op("dsfast_triton::similarity_kl_backward", mutates_args=())
def _triton_similarity_kl_backward(grad: torch.Tensor, g_source: torch.Tensor, g_adapted: torch.Tensor,
                                   weights: torch.Tensor | None, tau: float, source_first: bool,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from dsfast.kernels import pairwise_similarity_kl as kernels

    return kernels.similarity_kl_backward(grad, g_source, g_adapted, weights, tau, source_first, scale)


@torch.library.register_fake("dsfast_triton::similarity_kl")
def _(g_source, g_adapted, weights, tau, source_first, scale):
    return g_adapted.new_empty(())


@torch.library.register_fake("dsfast_triton::similarity_kl_backward")
def _(grad, g_source, g_adapted, weights, tau, source_first, scale):
    return torch.empty_like(g_source), torch.empty_like(g_adapted)


def _similarity_kl_setup(ctx, inputs, output):
    g_source, g_adapted, weights, *ctx.options = inputs
    ctx.save_for_backward(g_source, g_adapted, weights)


def _similarity_kl_backward(ctx, grad):
    g_source, g_adapted, weights = ctx.saved_tensors
    d_source, d_adapted = torch.ops.dsfast_triton.similarity_kl_backward(grad, g_source, g_adapted, weights,
                                                                        *ctx.options)
    return d_source, d_adapted, None, None, None, None


torch.library.register_autograd("dsfast_triton::similarity_kl", _similarity_kl_backward,
                                setup_context=_similarity_kl_setup)


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


def fused_tail(backend: str, device: torch.device) -> bool:
    """Whether the N x N tail runs as the Triton kernels (one launch forward, one backward): on the Triton
    backend, and on every CUDA tensor when Triton is there (eager torch is ~40 launches forward, ~85 with
    the backward: at N=16 launch overhead, not the Gram, would set the time) where Triton runs
    (:func:`~dsfast.ops._backend.triton_runs_on`). CPU backends keep the reference."""
    return backend == "triton" or triton_runs_on(device)


def similarity_kl_tail(g_source: torch.Tensor, g_adapted: torch.Tensor, *, tau: float, direction: str,
                       reduction: str, anchors: torch.Tensor | None, fused: bool) -> torch.Tensor:
    """The KL from the two Grams in float64 math, as a loss of g_adapted's dtype: the reference on
    ``.double()`` copies, or (``fused``) the Triton tail with anchors as per-row weights."""
    if not fused:
        # The KL of two close softmaxes is a small difference of large terms: float32 would lose
        # ~1e-4 of it, so the N x N part runs in float64 (negligible next to the Gram).
        loss = reference.similarity_kl_from_gram(g_source.double(), g_adapted.double(), tau=tau,
                                                 direction=direction, reduction=reduction, anchors=anchors)
        return loss.to(g_adapted.dtype)
    weights, scale = row_weights(anchors, g_adapted.shape[0], reduction, g_adapted.device)
    return torch.ops.dsfast_triton.similarity_kl(g_source, g_adapted, weights, float(tau),
                                                 direction == "source||adapted", scale)


def row_weights(anchors: torch.Tensor | None, n: int, reduction: str, device) -> tuple[torch.Tensor | None, float]:
    """(how often each row counts as an anchor, float64 (N,) or None for every row once; the reduction's
    scale) of the Triton tails."""
    weights = None
    rows = n
    if anchors is not None:
        anchors = anchors.to(device).reshape(-1)
        rows = anchors.numel()
        weights = torch.zeros(n, dtype=torch.float64, device=device).index_add_(
            0, anchors, torch.ones(rows, dtype=torch.float64, device=device))
    return weights, {"mean": 1.0 / (rows * (n - 1)), "batchmean": 1.0 / rows, "sum": 1.0}[reduction]


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
    backend: str | None = None,
) -> torch.Tensor:
    """Shared body of the pairwise losses (arguments already checked): Gram of each side, then the N x N KL.

    ``backend``: the one that computed the Grams (decides the tail, see :func:`fused_tail`)."""
    if detach_source:
        with torch.no_grad():
            g_source = gram_fn(source)
    else:
        g_source = gram_fn(source)
    g_adapted = gram_fn(adapted)
    return kl_from_grams(op, g_source, g_adapted, tau=tau, direction=direction, reduction=reduction,
                         anchors=anchors, check_finite=check_finite, backend=backend)


def kl_from_grams(op: str, g_source, g_adapted, *, tau: float, direction: str, reduction: str, anchors,
                  check_finite: bool | None = None, backend: str | None = None) -> torch.Tensor:
    """The N x N tail shared by every pairwise loss: finite check, then the KL of the two Grams.

    ``backend``: the one that computed the Grams (decides the tail, see :func:`fused_tail`)."""
    check_finite_gram(op, "source", g_source, check_finite)
    check_finite_gram(op, "adapted", g_adapted, check_finite)
    return similarity_kl_tail(g_source, g_adapted, tau=tau, direction=direction, reduction=reduction,
                              anchors=sample_anchors(anchors, g_source.shape[0], g_source.device),
                              fused=fused_tail(backend or "torch", g_adapted.device))


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
    Mixed floating dtypes are promoted (:func:`~dsfast.ops.validate.promote`: a cast copy of the other one).
    """
    op = "pairwise_similarity_kl"
    check_pairwise(op, source, adapted, tau=tau, direction=direction, reduction=reduction, anchors=anchors,
                   check_finite=check_finite)
    source, adapted = promote(source, adapted)
    chosen = resolve_backend(backend, adapted.device)

    def gram_fn(x):
        flat = x.reshape(x.shape[0], -1)
        return reference.gram(flat) if chosen == "torch" else kernel_namespace(chosen).gram(flat)

    return similarity_kl(
        op, gram_fn, source, adapted,
        tau=tau, direction=direction, reduction=reduction, detach_source=detach_source, anchors=anchors,
        check_finite=check_finite, backend=chosen,
    )
