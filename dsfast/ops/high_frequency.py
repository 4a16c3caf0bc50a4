"""High-frequency map: the sum of the three Haar detail bands as one 2x2 stride-2 stencil."""
from __future__ import annotations

import torch

from dsfast import reference
from dsfast.ops._backend import extension_available, kernel_namespace, resolve_backend
from dsfast.ops.validate import check_image_batch, check_same, stencil_weights


@torch.library.custom_op("dsfast_triton::high_frequency", mutates_args=())
def _triton_high_frequency(x: torch.Tensor, weights: list[float]) -> torch.Tensor:
    from dsfast.kernels import high_frequency as kernels

    return kernels.high_frequency(x, weights)


@torch.library.custom_op("dsfast_triton::high_frequency_backward", mutates_args=())
def _triton_high_frequency_backward(grad: torch.Tensor, weights: list[float]) -> torch.Tensor:
    from dsfast.kernels import high_frequency as kernels

    return kernels.high_frequency_backward(grad, weights)


def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::high_frequency")
    def _(x, weights):
        n, c, h, w = x.shape
        return x.new_empty((n, c, h // 2, w // 2))

    @torch.library.register_fake(f"{namespace}::high_frequency_backward")
    def _(grad, weights):
        n, c, h, w = grad.shape
        return grad.new_empty((n, c, 2 * h, 2 * w))

    def setup_context(ctx, inputs, output):
        ctx.weights = inputs[1]

    def backward(ctx, grad):
        return ops.high_frequency_backward(grad.contiguous(), ctx.weights), None

    torch.library.register_autograd(f"{namespace}::high_frequency", backward, setup_context=setup_context)


_register("dsfast_triton")
if extension_available():
    _register("dsfast")


def high_frequency(x: torch.Tensor, stencil: str = "domainstudio", *, backend: str = "auto") -> torch.Tensor:
    """Sum of the detail bands of ``(N, C, H, W)``: ``(N, C, H/2, W/2)``.

    ``stencil="domainstudio"`` reproduces the official code's LH + HL + HH, ``"pywt"`` is H + V + D of pywt.
    """
    weights = stencil_weights("high_frequency", stencil)
    check_image_batch("high_frequency", "x", x)
    chosen = resolve_backend(backend, x.device)
    if chosen == "torch":
        return reference.high_frequency(x, stencil)
    return kernel_namespace(chosen).high_frequency(x, weights)


def hf_mse(adapted: torch.Tensor, target: torch.Tensor, *, stencil: str = "domainstudio", backend: str = "auto") -> torch.Tensor:
    """``mean((hf(adapted) - hf(target))²)``, in float32 for half inputs.

    hf is linear, so this is one stencil pass over the difference instead of two. Mixed floating dtypes:
    the subtraction promotes them (as :func:`~dsfast.ops.validate.promote` would) while it reads each
    input once, so they cost no cast copy.
    """
    check_image_batch("hf_mse", "adapted", adapted)
    check_image_batch("hf_mse", "target", target)
    check_same("hf_mse", adapted, target, names=("adapted", "target"))
    detail = high_frequency(adapted - target, stencil, backend=backend)
    return detail.to(torch.promote_types(detail.dtype, torch.float32)).pow(2).mean()
