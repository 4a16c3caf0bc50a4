"""Argument checks shared by every op, so every backend rejects bad input with the same message."""
from __future__ import annotations

import functools

import torch

from dsfast.reference import DIRECTIONS, REDUCTIONS, STENCILS


def check_image_batch(op: str, name: str, x, *, levels: int = 1) -> None:
    """A non-empty floating ``(N, C, H, W)`` tensor whose H and W are divisible by ``2**levels``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: `{name}` must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{op}: `{name}` must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{op}: `{name}` is empty, shape {tuple(x.shape)}")
    factor = 2**levels
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(
            f"{op}: `{name}` height and width must be divisible by {factor} for {levels} Haar level(s), "
            f"got {x.shape[-2]}x{x.shape[-1]} (dsfast does not pad odd sizes; crop or resize first)"
        )


def check_same(op: str, source, adapted, names=("source", "adapted")) -> None:
    """The same shape and device; the dtypes may differ (see :func:`promote`)."""
    a, b = names
    if source.shape != adapted.shape:
        raise ValueError(f"{op}: `{a}` and `{b}` must have the same shape, got {tuple(source.shape)} and {tuple(adapted.shape)}")
    if source.device != adapted.device:
        raise ValueError(f"{op}: `{a}` and `{b}` must be on the same device, got {source.device} and {adapted.device}")


def promote(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inputs of one op (checked floating, same device) in their promoted dtype, as PyTorch would
    compute ``x + y``: ``torch.promote_types`` over them (bfloat16 with float16 gives float32).

    The ops with several tensor inputs call this before they dispatch, so a kernel sees one dtype (except
    ``hf_mse``, whose first step, the subtraction, promotes while it reads each input once).
    A tensor already in that dtype passes as is; each other one costs a cast copy (one read, one write of
    the lower-precision input, and the promoted copy's memory). The cast is ``Tensor.to``, whose backward
    returns each input's gradient in that input's own dtype.
    """
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in tensors))
    return tuple(x.to(dtype) for x in tensors)


def check_pairwise(op: str, source, adapted, *, tau: float, direction: str, reduction: str, anchors,
                   check_finite: bool | None = None) -> None:
    """Everything a pairwise-similarity loss needs: at least 3 samples and known options."""
    for name, x in (("source", source), ("adapted", adapted)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{op}: `{name}` must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 2 or x.numel() == 0:
            raise ValueError(f"{op}: `{name}` must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    check_same(op, source, adapted)
    n = source.shape[0]
    if n < 3:
        raise ValueError(f"{op}: the pairwise-similarity loss needs N >= 3 samples per batch, got N={n}")
    if not (isinstance(tau, (int, float)) and tau > 0 and tau != float("inf")):
        raise ValueError(f"{op}: `tau` must be a positive finite number, got {tau!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"{op}: `direction` must be one of {DIRECTIONS}, got {direction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if check_finite not in (None, True, False):
        raise ValueError(f"{op}: `check_finite` must be None, True or False, got {check_finite!r}")
    if isinstance(anchors, int) and not 1 <= anchors <= n:
        raise ValueError(f"{op}: `anchors` (a count) must be in [1, N={n}], got {anchors}")


def stencil_weights(op: str, stencil: str) -> list[float]:
    if stencil not in STENCILS:
        raise ValueError(f"{op}: `stencil` must be one of {tuple(STENCILS)}, got {stencil!r}")
    return list(STENCILS[stencil])


def check_finite_gram(op: str, name: str, g: torch.Tensor, check_finite: bool | None = None) -> None:
    """NaN/Inf anywhere in a sample reaches its Gram row, so checking the N x N Gram covers the input.

    ``check_finite``: ``None`` (default) checks where that costs no device->host sync, i.e. CPU tensors;
    on a GPU the loss path never waits for the device, and a non-finite input gives a NaN loss instead
    (NaN propagates through the cosine normalisation, softmax and KL). ``True`` always checks (on a GPU
    that is a blocking sync per call); ``False`` never does.
    """
    if check_finite is False or torch.compiler.is_compiling():
        return
    if check_finite is None and g.device.type != "cpu":
        return
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{op}: `{name}` contains NaN or Inf values")


def check_sample_weights(op: str, name: str, weights, batch: torch.Tensor, check_finite: bool | None = None) -> None:
    """Per-sample weights of ``batch`` (N, ...): ``None`` or a floating (N,) tensor on its device, finite and
    non-negative. The value checks (finite, non-negative) follow ``check_finite`` as :func:`check_finite_gram`
    does: ``None`` checks CPU tensors only (on a GPU they would be a device->host sync per call), ``True``
    always, ``False`` never; none while compiling."""
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor or None, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"{op}: `{name}` must be a floating-point tensor, got {weights.dtype}")
    n = batch.shape[0]
    if weights.shape != (n,):
        raise ValueError(f"{op}: `{name}` must have shape (N,) = ({n},), one weight per sample, got {tuple(weights.shape)}")
    if weights.device != batch.device:
        raise ValueError(f"{op}: `{name}` must be on the device of the inputs ({batch.device}), got {weights.device}")
    if check_finite is False or torch.compiler.is_compiling():
        return
    if check_finite is None and weights.device.type != "cpu":
        return
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{op}: `{name}` contains NaN or Inf values")
    if bool((weights < 0).any()):
        raise ValueError(f"{op}: `{name}` must be non-negative, got a minimum of {float(weights.min())}")
