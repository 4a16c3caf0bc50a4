"""Haar DWT / inverse DWT (one and many levels), in pywt's conventions, on every backend.

The kernels return / take the four bands stacked as ``(4, N, C, H/2, W/2)`` (LL, H, V, D).
The transform is orthonormal, so each direction's backward is the other direction.
"""
from __future__ import annotations

import torch

from dsfast import reference
from dsfast.ops._backend import extension_available, kernel_namespace, resolve_backend
from dsfast.ops.validate import check_image_batch, promote


# -- Triton kernels as custom ops (the launchers import triton lazily) --------------------------
@torch.library.custom_op("dsfast_triton::haar_dwt2", mutates_args=())
def _triton_haar_dwt2(x: torch.Tensor) -> torch.Tensor:
    from dsfast.kernels import haar_dwt2 as kernels

    return kernels.haar_dwt2(x)


@torch.library.custom_op("dsfast_triton::haar_idwt2", mutates_args=())
def _triton_haar_idwt2(bands: torch.Tensor) -> torch.Tensor:
    from dsfast.kernels import haar_dwt2 as kernels

    return kernels.haar_idwt2(bands)


def _fake_dwt(x):
    n, c, h, w = x.shape
    return x.new_empty((4, n, c, h // 2, w // 2))


def _fake_idwt(bands):
    _, n, c, h, w = bands.shape
    return bands.new_empty((n, c, 2 * h, 2 * w))


def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)
    torch.library.register_fake(f"{namespace}::haar_dwt2")(_fake_dwt)
    torch.library.register_fake(f"{namespace}::haar_idwt2")(_fake_idwt)
    torch.library.register_autograd(
        f"{namespace}::haar_dwt2", lambda ctx, grad: ops.haar_idwt2(grad.contiguous())
    )
    torch.library.register_autograd(
        f"{namespace}::haar_idwt2", lambda ctx, grad: ops.haar_dwt2(grad.contiguous())
    )


_register("dsfast_triton")
if extension_available():
    _register("dsfast")


# -- public API -------------------------------------------------------------------------------
def haar_dwt2(x: torch.Tensor, *, backend: str = "auto"):
    """One-level Haar DWT of ``(N, C, H, W)``: ``(LL, (H, V, D))`` equal to ``pywt.dwt2(x, 'haar')``."""
    check_image_batch("haar_dwt2", "x", x)
    chosen = resolve_backend(backend, x.device)
    if chosen == "torch":
        return reference.haar_dwt2(x)
    ll, h, v, d = kernel_namespace(chosen).haar_dwt2(x).unbind(0)
    return ll, (h, v, d)


def haar_idwt2(ll: torch.Tensor, details, *, backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`haar_dwt2`, equal to ``pywt.idwt2((LL, (H, V, D)), 'haar')``.

    Mixed floating dtypes are promoted (:func:`~dsfast.ops.validate.promote`: a cast copy of each
    lower-precision band).
    """
    check_image_batch("haar_idwt2", "LL", ll, levels=0)
    if len(details) != 3:
        raise ValueError(f"haar_idwt2: `details` must be the three bands (H, V, D), got {len(details)}")
    for name, band in zip("HVD", details):
        check_image_batch("haar_idwt2", name, band, levels=0)
        if band.shape != ll.shape or band.device != ll.device:
            raise ValueError(f"haar_idwt2: band `{name}` must match LL in shape and device")
    ll, *details = promote(ll, *details)
    chosen = resolve_backend(backend, ll.device)
    if chosen == "torch":
        return reference.haar_idwt2(ll, details)
    return kernel_namespace(chosen).haar_idwt2(torch.stack((ll, *details)))


def haar_wavedec2(x: torch.Tensor, levels: int, *, backend: str = "auto"):
    """``levels``-level Haar DWT in ``pywt.wavedec2`` order: ``[LL_J, (H_J, V_J, D_J), ..., (H_1, V_1, D_1)]``."""
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"haar_wavedec2: `levels` must be a positive int, got {levels!r}")
    check_image_batch("haar_wavedec2", "x", x, levels=levels)
    coeffs = []
    ll = x
    for _ in range(levels):
        ll, details = haar_dwt2(ll, backend=backend)
        coeffs.append(details)
    return [ll] + coeffs[::-1]


def haar_waverec2(coeffs, *, backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`haar_wavedec2`, equal to ``pywt.waverec2(coeffs, 'haar')``."""
    if len(coeffs) < 2:
        raise ValueError("haar_waverec2: `coeffs` must hold LL and at least one (H, V, D) level")
    ll = coeffs[0]
    for details in coeffs[1:]:
        ll = haar_idwt2(ll, details, backend=backend)
    return ll
