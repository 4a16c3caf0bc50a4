"""Which backends run on which CUDA GPU (``auto`` and explicit choices), checked with mocked compute capabilities.

Triton needs compute capability 8.0 (its tensor-core dots); the CUDA extension needs machine code or PTX
for the device among its build targets (default sm_80, sm_90a and compute_90 PTX).
"""
import pytest
import torch

from dsfast import _extension
from dsfast.ops import _backend
from dsfast.ops._backend import available_backends, has_kernel_image, resolve_backend

DEFAULT = _extension.DEFAULT_CUDA_TARGETS


@pytest.mark.parametrize("capability, targets, runs", [
    ((8, 0), DEFAULT, True), ((8, 6), DEFAULT, True), ((8, 9), DEFAULT, True),  # sm_80 machine code
    ((9, 0), DEFAULT, True),                                                    # sm_90a
    ((10, 0), DEFAULT, True), ((12, 0), DEFAULT, True),                        # compute_90 PTX, JIT-compiled
    ((7, 5), DEFAULT, False), ((7, 0), DEFAULT, False),                        # older than every target
    ((10, 0), ("sm_80", "sm_90a"), False), ((12, 0), ("sm_80", "sm_90a"), False),  # no PTX: no image
    ((9, 0), ("sm_80",), False), ((8, 6), ("sm_86",), True), ((8, 0), ("sm_86",), False),
    ((9, 0), ("sm_90a",), True), ((10, 0), ("sm_90a",), False), ((12, 0), ("sm_100",), False),
])
def test_kernel_image_rule(capability, targets, runs):
    assert has_kernel_image(capability, targets) is runs


def _gpu(monkeypatch, capability):
    """A CUDA device of ``capability`` with Triton and the CUDA extension installed."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)
    monkeypatch.setattr(_backend, "cuda_extension_available", lambda: True)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("DSFAST_BACKEND", raising=False)


@pytest.mark.parametrize("capability, expected", [
    ((7, 5), ["torch"]),                        # Turing: neither Triton's dots nor a kernel image
    ((8, 0), ["triton", "cuda", "torch"]),
    ((8, 6), ["triton", "cuda", "torch"]),
    ((8, 9), ["triton", "cuda", "torch"]),
    ((9, 0), ["triton", "cuda", "torch"]),
    ((10, 0), ["triton", "cuda", "torch"]),     # Blackwell: the CUDA kernels from PTX
    ((12, 0), ["triton", "cuda", "torch"]),
])
def test_backends_by_capability(monkeypatch, capability, expected):
    _gpu(monkeypatch, capability)
    assert available_backends("cuda:0") == expected
    assert resolve_backend("auto", "cuda:0") == expected[0]


def test_cuda_backend_follows_the_build_targets(monkeypatch):
    """A build without PTX (TORCH_CUDA_ARCH_LIST="8.0;9.0a") has no image for Blackwell: Triton, else torch."""
    _gpu(monkeypatch, (12, 0))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    assert available_backends("cuda:0") == ["triton", "torch"]


def test_unsupported_gpu_refuses_explicit_backends(monkeypatch):
    _gpu(monkeypatch, (7, 5))
    for backend in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match="not available"):
            resolve_backend(backend, "cuda:0")


def test_fused_tail_needs_triton_on_the_device(monkeypatch):
    from dsfast.ops.pairwise_similarity_kl import fused_tail

    _gpu(monkeypatch, (7, 5))
    assert not fused_tail("torch", torch.device("cuda:0"))
    _gpu(monkeypatch, (9, 0))
    assert fused_tail("cuda", torch.device("cuda:0"))


def test_build_embeds_ptx(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert "-gencode=arch=compute_90,code=compute_90" in _extension.nvcc_flags()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;10.0+PTX")
    assert _extension.cuda_targets() == ["sm_80", "sm_90a", "sm_100", "compute_100"]
    assert _extension.nvcc_flags()[1:] == ["-gencode=arch=compute_80,code=sm_80",
                                           "-gencode=arch=compute_90a,code=sm_90a",
                                           "-gencode=arch=compute_100,code=sm_100",
                                           "-gencode=arch=compute_100,code=compute_100"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Ampere")
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _extension.cuda_targets()
