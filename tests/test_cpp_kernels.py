"""The C++ CPU kernels (torch.ops.dsfast.*, from dsfast._C) against the float64 reference.

For each of the eight kernels of docs/KERNELS.md: every dtype on one shape, the edge shapes (N=3 with
1x1 maps, 2-pixel-wide maps, N=64, large maps) and a non-contiguous layout. float64 must match the
float64 reference to 1e-10 (relative to the largest reference value) and float32 to 1e-5; float16 /
bfloat16 must be no worse than 2x PyTorch's own error (the reference run on the same half inputs)
plus 1e-6 of the reference's size, with PyTorch's output dtype. Inputs are seeded per test (conftest);
every test runs with DSFAST_POISON_OUTPUTS=1, so an output element the kernel forgets to write is NaN.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_close_in_low_precision, require_backend

require_backend("cpp")  # fails the run when DSFAST_REQUIRE_BACKENDS names cpp and dsfast._C is missing
import dsfast.ops  # noqa: E402,F401  (registers torch.ops.dsfast.* and their fake impls)
from dsfast import reference as R  # noqa: E402

OPS = torch.ops.dsfast
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)
STENCIL_WEIGHTS = [list(R.STENCILS["domainstudio"]), list(R.STENCILS["pywt"]), [0.3, -1.25, 2.0, 0.7]]


def _cases(standard, edges):
    """(dtype, shape, noncontiguous): every dtype on ``standard``, the edge shapes in float32, and a
    non-contiguous layout in float32 and float16."""
    return ([(d, standard, False) for d in DTYPES] + [(torch.float32, s, False) for s in edges]
            + [(torch.float32, standard, True), (torch.float16, standard, True)])


IMAGE_CASES = _cases((4, 3, 8, 12), [(3, 1, 2, 2), (16, 3, 32, 32), (64, 2, 6, 10), (5, 4, 34, 2)])
MATRIX_CASES = _cases((16, 300), [(3, 1), (4, 7), (64, 1000)])


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("DSFAST_POISON_OUTPUTS", "1")


def _rand(shape, dtype, gen, *, noncontiguous=False):
    """Random values exactly representable in `dtype`; optionally a non-contiguous view."""
    if noncontiguous:
        # Every second column of a wider tensor.
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
        x = wide[..., ::2].to(dtype) if dtype == torch.float64 else wide.to(dtype)[..., ::2]
        assert not x.is_contiguous() or x.numel() <= 1
        return x
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _check(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor):
    """``out`` against the float64 ``ref``; ``torch_out`` is PyTorch's result from the same inputs in
    their own dtype (the expected dtype, and the error baseline for half inputs)."""
    assert out.is_contiguous()
    if torch_out.dtype in HALF or out.dtype in HALF:
        assert_close_in_low_precision(out, torch_out, ref, k=2.0, atol=1e-6, msg="half precision")
        return
    assert out.dtype == torch_out.dtype, (out.dtype, torch_out.dtype)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "output has NaN/inf: an element was not written (poisoned)"
    if ref.numel() == 0:
        return
    scale = ref.abs().max().clamp_min(1e-30)
    err = ((out.double() - ref).abs().max() / scale).item()
    tol = 1e-10 if out.dtype == torch.float64 else 1e-5
    assert err <= tol, f"relative error {err:.3e} for {out.dtype}"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _hf_ref(x64: torch.Tensor, weights) -> torch.Tensor:
    for name, w in R.STENCILS.items():
        if list(w) == list(weights):
            return R.high_frequency(x64, name)
    wa, wb, wc, wd = weights
    a, b, c, d = R._blocks(x64)
    return wa * a + wb * b + wc * c + wd * d


def _grad(fn, x, g):
    """d(fn(x)) / dx applied to the cotangent ``g`` (autograd of the reference)."""
    x = x.detach().clone().requires_grad_()
    (out,) = torch.autograd.grad(fn(x), x, g)
    return out


# The domainstudio stencil on every case; the other weights on float64.
HF_CASES = [(d, s, nc, STENCIL_WEIGHTS[0]) for d, s, nc in IMAGE_CASES]
HF_CASES += [(torch.float64, IMAGE_CASES[0][1], False, w) for w in STENCIL_WEIGHTS[1:]]


# ---------------------------------------------------------------------------- haar_dwt2 / idwt2


@pytest.mark.parametrize("dtype,shape,noncontiguous", IMAGE_CASES)
def test_haar_dwt2(dtype, shape, noncontiguous, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)

    def dwt(x):
        ll, (h, v, d) = R.haar_dwt2(x)
        return torch.stack((ll, h, v, d))

    _check(OPS.haar_dwt2(x), dwt(x.double()), dwt(x))


@pytest.mark.parametrize("dtype,shape,noncontiguous", IMAGE_CASES)
def test_haar_idwt2(dtype, shape, noncontiguous, gen):
    n, c, hh, ww = shape
    bands = _rand((4, n, c, hh // 2, ww // 2), dtype, gen, noncontiguous=noncontiguous)

    def idwt(b):
        return R.haar_idwt2(b[0], (b[1], b[2], b[3]))

    _check(OPS.haar_idwt2(bands), idwt(bands.double()), idwt(bands))


def test_haar_round_trip(gen):
    x = _rand((6, 3, 16, 10), torch.float64, gen)
    torch.testing.assert_close(OPS.haar_idwt2(OPS.haar_dwt2(x)), x, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- high_frequency


@pytest.mark.parametrize("dtype,shape,noncontiguous,weights", HF_CASES)
def test_high_frequency(dtype, shape, noncontiguous, weights, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    _check(OPS.high_frequency(x, weights), _hf_ref(x.double(), weights), _hf_ref(x, weights))


@pytest.mark.parametrize("dtype,shape,noncontiguous,weights", HF_CASES)
def test_high_frequency_backward(dtype, shape, noncontiguous, weights, gen):
    n, c, hh, ww = shape
    grad = _rand((n, c, hh // 2, ww // 2), dtype, gen, noncontiguous=noncontiguous)
    x = torch.zeros(shape, dtype=dtype)
    fn = lambda x: _hf_ref(x, weights)  # noqa: E731
    _check(OPS.high_frequency_backward(grad, weights), _grad(fn, x.double(), grad.double()), _grad(fn, x, grad))


# ---------------------------------------------------------------------------- gram


@pytest.mark.parametrize("dtype,shape,noncontiguous", MATRIX_CASES)
def test_gram(dtype, shape, noncontiguous, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    _check(OPS.gram(x), R.gram(x.double()), R.gram(x))


@pytest.mark.parametrize("dtype,shape,noncontiguous", MATRIX_CASES)
def test_gram_backward(dtype, shape, noncontiguous, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    g = _rand((shape[0], shape[0]), _acc(dtype), gen, noncontiguous=noncontiguous)
    _check(OPS.gram_backward(g, x), _grad(R.gram, x.double(), g.double()), _grad(R.gram, x, g))


def test_gram_transposed_input(gen):
    x = _rand((200, 16), torch.float32, gen).t()  # (16, 200), column-major
    _check(OPS.gram(x), R.gram(x.double()), R.gram(x))


# ---------------------------------------------------------------------------- hf_gram


@pytest.mark.parametrize("dtype,shape,noncontiguous,weights", HF_CASES)
def test_hf_gram(dtype, shape, noncontiguous, weights, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    # PyTorch's baseline: the hf map in float32 (as the fused kernel), then the float32 Gram.
    _check(OPS.hf_gram(x, weights), R.gram(_hf_ref(x.double(), weights)), R.gram(_hf_ref(x.to(_acc(dtype)), weights)))


@pytest.mark.parametrize("dtype,shape,noncontiguous,weights", HF_CASES)
def test_hf_gram_backward(dtype, shape, noncontiguous, weights, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    g = _rand((shape[0], shape[0]), _acc(dtype), gen)
    fn = lambda x: R.gram(_hf_ref(x.to(_acc(x.dtype)), weights))  # noqa: E731
    _check(OPS.hf_gram_backward(g, x, weights), _grad(fn, x.double(), g.double()), _grad(fn, x, g))


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_hf_gram_strided_layouts(layout, gen):
    x = _rand((8, 3, 16, 12), torch.float32, gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    w = STENCIL_WEIGHTS[0]
    _check(OPS.hf_gram(x, w), R.gram(_hf_ref(x.double(), w)), R.gram(_hf_ref(x, w)))
    g = _rand((8, 8), torch.float32, gen)
    x64 = x.double().clone().requires_grad_()
    (ref,) = torch.autograd.grad(R.gram(_hf_ref(x64, w)), x64, g.double())
    _check(OPS.hf_gram_backward(g, x, w), ref, ref.float())


def test_hf_gram_large_map_many_chunks(gen):
    """A map big enough to need several panels per thread, with a ragged last chunk."""
    x = _rand((16, 3, 130, 258), torch.float32, gen)
    w = STENCIL_WEIGHTS[0]
    _check(OPS.hf_gram(x, w), R.gram(_hf_ref(x.double(), w)), R.gram(_hf_ref(x, w)))
    g = _rand((16, 16), torch.float32, gen)
    x64 = x.double().clone().requires_grad_()
    (ref,) = torch.autograd.grad(R.gram(_hf_ref(x64, w)), x64, g.double())
    _check(OPS.hf_gram_backward(g, x, w), ref, ref.float())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_hf_gram_thread_counts(threads, gen):
    x = _rand((9, 2, 40, 24), torch.float64, gen)
    w = STENCIL_WEIGHTS[2]
    g = _rand((9, 9), torch.float64, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = OPS.hf_gram(x, w)
        grad = OPS.hf_gram_backward(g, x, w)
    finally:
        torch.set_num_threads(before)
    _check(out, R.gram(_hf_ref(x.double(), w)), out)
    x64 = x.double().clone().requires_grad_()
    (ref,) = torch.autograd.grad(R.gram(_hf_ref(x64, w)), x64, g)
    _check(grad, ref, grad)


def test_hf_gram_under_inference_mode(gen):
    x = _rand((4, 3, 16, 16), torch.float32, gen)
    w = STENCIL_WEIGHTS[0]
    with torch.inference_mode():
        out = OPS.hf_gram(x, w)
        grad = OPS.hf_gram_backward(torch.ones(4, 4), x, w)
    _check(out, R.gram(_hf_ref(x.double(), w)), R.gram(_hf_ref(x, w)))
    assert torch.isfinite(grad).all()


# ---------------------------------------------------------------------------- empty and bad input


def test_empty_batch():
    x = torch.zeros(0, 3, 4, 4)
    assert OPS.haar_dwt2(x).shape == (4, 0, 3, 2, 2)
    assert OPS.high_frequency(x, STENCIL_WEIGHTS[0]).shape == (0, 3, 2, 2)
    assert OPS.hf_gram(x, STENCIL_WEIGHTS[0]).shape == (0, 0)
    assert OPS.hf_gram_backward(torch.zeros(0, 0), x, STENCIL_WEIGHTS[0]).shape == x.shape
    assert OPS.gram(torch.zeros(0, 5)).shape == (0, 0)


def test_zero_size_map_gives_zero_gram():
    out = OPS.hf_gram(torch.zeros(3, 0, 4, 4), STENCIL_WEIGHTS[0])
    assert torch.equal(out, torch.zeros(3, 3))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: OPS.haar_dwt2(torch.zeros(2, 3, 5, 4)), "even"),
        (lambda: OPS.haar_dwt2(torch.zeros(2, 4, 4)), "4-D"),
        (lambda: OPS.haar_dwt2(torch.zeros(2, 3, 4, 4, dtype=torch.int32)), "floating"),
        (lambda: OPS.haar_idwt2(torch.zeros(3, 2, 3, 4, 4)), "bands"),
        (lambda: OPS.high_frequency(torch.zeros(2, 3, 4, 4), [1.0, 2.0]), "4 floats"),
        (lambda: OPS.high_frequency(torch.zeros(2, 3, 4, 7), [1.0] * 4), "even"),
        (lambda: OPS.high_frequency_backward(torch.zeros(2, 3, 4), [1.0] * 4), "4-D"),
        (lambda: OPS.gram(torch.zeros(2, 3, 4)), "2-D"),
        (lambda: OPS.gram_backward(torch.zeros(3, 3), torch.zeros(2, 5)), "grad_gram"),
        (lambda: OPS.hf_gram(torch.zeros(2, 3, 3, 4), [1.0] * 4), "even"),
        (lambda: OPS.hf_gram_backward(torch.zeros(2, 3), torch.zeros(2, 3, 4, 4), [1.0] * 4), "grad_gram"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


# opcheck (schema, fake impl, autograd registration, AOT dispatch) of every op: tests/test_opcheck.py.


def test_inputs_requiring_grad_are_fine(gen):
    """The kernels are leaf ops (autograd lives in dsfast.ops): inputs that require grad must not
    make their internal ATen calls record history or fail (e.g. mm(out=...) with autograd)."""
    x = _rand((5, 3, 8, 8), torch.float32, gen).requires_grad_()
    g = _rand((5, 5), torch.float32, gen).requires_grad_()
    flat = _rand((5, 12), torch.float32, gen).requires_grad_()
    w = STENCIL_WEIGHTS[0]
    for out in (
        OPS.gram(flat),
        OPS.gram_backward(g, flat),
        OPS.hf_gram(x, w),
        OPS.hf_gram_backward(g, x, w),
        OPS.high_frequency(x, w),
        OPS.haar_dwt2(x),
    ):
        assert torch.isfinite(out.detach()).all()


# ---------------------------------------------------------------------------- domainstudio_grams: per-sample hf-MSE weights
# sse_weights w (N,) weight sample i's part of the hf-MSE sum (and of its gradient): Σ_i w_i Σ (hf(x_i) - hf(t_i))².
# Every ISA copy of the chunk loops this CPU runs; N = 3, 5 (a partial small_mm block) and 17 with several chunks
# per thread; random weights with zeros.
def _supported_isas() -> list[str]:
    """The ISA copies this CPU runs (tests/test_cpu_isa.py forces each; here the weighted loops run on each)."""
    found = []
    for isa in ("baseline", "avx2", "avx512"):
        try:
            before = OPS._set_cpu_isa(isa)
        except RuntimeError:
            continue
        OPS._set_cpu_isa(before)
        found.append(isa)
    return found


WEIGHTED_CASES = [(torch.float64, (3, 2, 4, 6)), (torch.float64, (5, 3, 8, 12)), (torch.float32, (17, 3, 34, 66)),
                  (torch.float16, (5, 3, 8, 12)), (torch.bfloat16, (5, 3, 8, 12))]


def _sample_weights(n, gen, dtype=torch.float64):
    """Random non-negative weights with zeros (the first always)."""
    w = torch.rand(n, generator=gen, dtype=torch.float64) * 3 * (torch.rand(n, generator=gen) > 0.3)
    w[0] = 0.0
    return w.to(dtype)


def _ds_weighted(x, t, sw, w):
    """(image Gram, hf Gram, Σ_i sw_i Σ (hf(x_i) - hf(t_i))²) of the reference (t None: hf(t) = 0)."""
    hf = _hf_ref(x, w)
    d = hf - (_hf_ref(t, w) if t is not None else 0)
    return R.gram(x.flatten(1)), R.gram(hf.flatten(1)), (sw.to(d.dtype) * d.flatten(1).pow(2).sum(1)).sum()


def _vjp_weighted(x, t, sw, w, cotangents, compute):
    """d Σ_k <output_k, cotangent_k> / dx of :func:`_ds_weighted`, computed in ``compute``, in x's dtype."""
    x = x.detach().clone().requires_grad_()
    outs = _ds_weighted(x.to(compute), None if t is None else t.to(compute), sw, w)
    (grad,) = torch.autograd.grad(sum((o * c.to(compute)).sum() for o, c in zip(outs, cotangents)), x)
    return grad


@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
@pytest.mark.parametrize("dtype,shape", WEIGHTED_CASES, ids=[f"{str(d)[6:]}-{'x'.join(map(str, s))}"
                                                             for d, s in WEIGHTED_CASES])
def test_domainstudio_grams_sse_weights(dtype, shape, with_target, gen):
    n, w = shape[0], STENCIL_WEIGHTS[0]
    x = _rand(shape, dtype, gen, noncontiguous=n == 5)
    t = _rand(shape, dtype, gen) if with_target else None
    sw = _sample_weights(n, gen, _acc(dtype))
    cotangents = [_rand((n, n), _acc(dtype), gen), _rand((n, n), _acc(dtype), gen), _rand((1,), _acc(dtype), gen)[0]]
    refs = _ds_weighted(x.double(), None if t is None else t.double(), sw, w)
    torch_outs = _ds_weighted(x.to(_acc(dtype)), None if t is None else t.to(_acc(dtype)), sw, w)  # PyTorch, as the kernels
    ref_grad = _vjp_weighted(x, t, sw, w, cotangents, torch.float64).double()
    torch_grad = _vjp_weighted(x, t, sw, w, cotangents, _acc(dtype))
    for isa in _supported_isas():
        before = OPS._set_cpu_isa(isa)
        try:
            outs = OPS.domainstudio_grams(x, t, w, sw)
            grad = OPS.domainstudio_grams_backward(*cotangents, x, t, w, sw)
        finally:
            OPS._set_cpu_isa(before)
        for out, ref, torch_out in zip(outs, refs, torch_outs):
            _check(out, ref, torch_out)
        _check(grad, ref_grad, torch_grad)


def test_domainstudio_grams_sse_weights_of_one_are_none(gen):
    """All-ones weights give the unweighted kernels' bits (a product by 1 is exact), forward and backward, per ISA."""
    w = STENCIL_WEIGHTS[0]
    for dtype in (torch.float64, torch.float32):
        x, t = (_rand((17, 3, 34, 66), dtype, gen) for _ in range(2))
        cotangents = [_rand((17, 17), dtype, gen), _rand((17, 17), dtype, gen), _rand((1,), dtype, gen)[0]]
        for isa in _supported_isas():
            before = OPS._set_cpu_isa(isa)
            try:
                ones = torch.ones(17, dtype=dtype)
                for a, b in zip(OPS.domainstudio_grams(x, t, w, ones), OPS.domainstudio_grams(x, t, w)):
                    assert torch.equal(a, b), f"{isa} {dtype}"
                assert torch.equal(OPS.domainstudio_grams_backward(*cotangents, x, t, w, ones),
                                   OPS.domainstudio_grams_backward(*cotangents, x, t, w)), f"{isa} {dtype}"
            finally:
                OPS._set_cpu_isa(before)


@pytest.mark.parametrize(
    "sse_weights, message",
    [(torch.ones(4), "shape"), (torch.ones(5, 1), "shape"), (torch.ones(5, dtype=torch.int64), "floating")],
    ids=["short", "2-D", "int"],  # (weights on another device: a CUDA build's check; a meta tensor dispatches to the fake)
)
def test_domainstudio_grams_bad_sse_weights(sse_weights, message):
    x = torch.zeros(5, 3, 4, 4)
    g = torch.zeros(5, 5)
    with pytest.raises(RuntimeError, match=message):
        OPS.domainstudio_grams(x, x, STENCIL_WEIGHTS[0], sse_weights)
    with pytest.raises(RuntimeError, match=message):
        OPS.domainstudio_grams_backward(g, g, torch.zeros(()), x, x, STENCIL_WEIGHTS[0], sse_weights)
