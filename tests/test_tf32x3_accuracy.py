"""The fp32 Triton dots run as 3xTF32 on the tensor cores; the interpreter ignores ``input_precision``,
so their accuracy is checked here by an exact CPU emulation against the float64 reference.

Emulation (what Triton's tf32x3 lowering computes, per K block of the kernel):
``hi = tf32(a)``, ``lo = tf32(a - hi)``, with ``tf32`` the ``cvt.rna.tf32.f32`` rounding (10 mantissa
bits, round to nearest, ties away from zero: add half an ulp to the magnitude bits and clear the low 13);
products of two TF32 numbers are exact in fp32 (11 x 11 significand bits), and every K block adds
``hi*lo + lo*hi`` and then ``hi*hi`` to an fp32 accumulator, block after block, split by split, as the
kernel does. The error must stay within the fp32 tolerance the kernel tests use (1e-5 of the largest
entry), at the test shapes and the headline DomainStudio shape.
"""
import zlib

import pytest
import torch

from dsfast import reference as R

FP32_TOL = 1e-5  # tests/test_triton_kernels.py TOL[torch.float32]


def tf32(x: torch.Tensor) -> torch.Tensor:
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def dot_tf32x3(a: torch.Tensor, b: torch.Tensor, block_k: int, splits: int = 1) -> torch.Tensor:
    """``a @ b.T`` (a: (M, K), b: (P, K) fp32) as the kernels compute it with input_precision="tf32x3"."""
    k = a.shape[1]
    pad = (-k) % block_k
    a = torch.nn.functional.pad(a, (0, pad))
    b = torch.nn.functional.pad(b, (0, pad))
    a_hi, b_hi = tf32(a), tf32(b)
    a_lo, b_lo = tf32(a - a_hi), tf32(b - b_hi)

    def blocks(t):  # (K blocks, rows, block_k)
        return t.reshape(t.shape[0], -1, block_k).transpose(0, 1)

    cross = blocks(a_hi) @ blocks(b_lo).transpose(1, 2) + blocks(a_lo) @ blocks(b_hi).transpose(1, 2)
    main = blocks(a_hi) @ blocks(b_hi).transpose(1, 2)
    per = -(-cross.shape[0] // splits)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32)
    for s in range(0, cross.shape[0], per):
        acc = torch.zeros_like(out)
        for kb in range(s, min(s + per, cross.shape[0])):
            acc = (acc + cross[kb]) + main[kb]
        out = out + acc
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


CASES = [  # (N, C, H, W), block_k, splits: test shapes and the headline batch (split as on an H100)
    ((4, 3, 16, 16), 32, 1),
    ((17, 3, 8, 6), 32, 3),
    ((16, 3, 256, 256), 32, 256),
    ((64, 3, 128, 128), 16, 64),
]


@pytest.mark.parametrize("shape, block_k, splits", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("kind", ["gram", "hf_gram"])
def test_tf32x3_gram_within_fp32_tolerance(shape, block_k, splits, kind):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind)).encode()))
    x = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1  # images in [-1, 1]
    x32 = x.float()
    if kind == "hf_gram":
        flat32 = R.high_frequency(x32, "domainstudio").reshape(shape[0], -1)  # the fp32 stencil output
        flat64 = R.high_frequency(x, "domainstudio").reshape(shape[0], -1)
    else:
        flat32, flat64 = x32.reshape(shape[0], -1), x.reshape(shape[0], -1)
    ref = flat64 @ flat64.T
    err = rel_err(dot_tf32x3(flat32, flat32, block_k, splits), ref)
    ieee = rel_err(flat32 @ flat32.T, ref)
    assert err <= FP32_TOL, f"3xTF32 Gram error {err:.2e} (fp32 ieee: {ieee:.2e})"


@pytest.mark.parametrize("n, d", [(4, 768), (16, 3 * 256 * 256), (64, 3 * 128 * 128)])
def test_tf32x3_gram_backward_within_fp32_tolerance(n, d):
    """(g + gᵀ) X: the reduction runs over N in K blocks of 16."""
    gen = torch.Generator().manual_seed(n * 7 + d)
    x = torch.rand((n, d), generator=gen, dtype=torch.float64) * 2 - 1
    g = torch.randn((n, n), generator=gen, dtype=torch.float64)
    m = (g.float() + g.float().T)
    ref = (g + g.T) @ x
    err = rel_err(dot_tf32x3(m, x.float().T.contiguous(), 16), ref)
    assert err <= FP32_TOL, f"3xTF32 (g + gᵀ) X error {err:.2e}"


def test_tf32_rounding():
    """The emulated rounding: 10 mantissa bits, ties away from zero, exact on TF32 values."""
    one_ulp = 2.0**-10
    x = torch.tensor([1.0, 1 + one_ulp / 2, -(1 + one_ulp / 2), 1 + one_ulp / 2 - 2**-20, 3.0], dtype=torch.float32)
    assert tf32(x).tolist() == [1.0, 1 + one_ulp, -(1 + one_ulp), 1.0, 3.0]
