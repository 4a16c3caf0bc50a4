"""The C++ CPU kernels (torch.ops.dsfast.*, from dsfast._C) against the float64 reference.

For each of the eight kernels of docs/KERNELS.md: float64 must match the float64 reference to
1e-10 (relative to the largest reference value), float32 to 1e-5, float16 / bfloat16 loosely
(the reference then runs on the same half-precision values upcast to float64). Inputs are fresh
random tensors of several shapes, including non-contiguous ones and batches up to 64. Every test
runs with DSFAST_POISON_OUTPUTS=1, so an output element the kernel forgets to write is NaN.
"""
from __future__ import annotations

import pytest
import torch

try:
    import dsfast._C  # noqa: F401  (registers torch.ops.dsfast.*)
except ImportError as err:  # pragma: no cover - depends on the build
    pytest.skip(f"dsfast._C is not built ({err})", allow_module_level=True)

from dsfast import reference as R  # noqa: E402

OPS = torch.ops.dsfast
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
STENCIL_WEIGHTS = [list(R.STENCILS["domainstudio"]), list(R.STENCILS["pywt"]), [0.3, -1.25, 2.0, 0.7]]
IMAGE_SHAPES = [(3, 1, 2, 2), (4, 3, 8, 12), (16, 3, 32, 32), (64, 2, 6, 10), (5, 4, 34, 2)]
MATRIX_SHAPES = [(3, 1), (4, 7), (16, 300), (64, 1000)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("DSFAST_POISON_OUTPUTS", "1")


@pytest.fixture
def gen():
    g = torch.Generator().manual_seed(20240611)
    return g


def _rand(shape, dtype, gen, *, noncontiguous=False):
    """Random values exactly representable in `dtype`; optionally a non-contiguous view."""
    if noncontiguous:
        # Every second column of a wider tensor, then a no-op permute round trip.
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
        x = wide[..., ::2].to(dtype) if dtype == torch.float64 else wide.to(dtype)[..., ::2]
        assert not x.is_contiguous() or x.numel() <= 1
        return x
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _tol(out_dtype: torch.dtype, in_dtype: torch.dtype) -> float:
    if out_dtype == torch.float64:
        return 1e-10
    if out_dtype == torch.float16:
        return 2e-3
    if out_dtype == torch.bfloat16:
        return 1.6e-2
    # float32 output: float32 input, or fp16/bf16 input accumulated in float32.
    return 1e-5 if in_dtype in (torch.float32, torch.float64) else 1e-4


def _check(out: torch.Tensor, ref: torch.Tensor, in_dtype: torch.dtype, expected_dtype: torch.dtype):
    assert out.dtype == expected_dtype, (out.dtype, expected_dtype)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.is_contiguous()
    assert torch.isfinite(out).all(), "output has NaN/inf: an element was not written (poisoned)"
    if ref.numel() == 0:
        return
    scale = ref.abs().max().clamp_min(1e-30)
    err = ((out.double() - ref).abs().max() / scale).item()
    assert err <= _tol(out.dtype, in_dtype), f"relative error {err:.3e} for {in_dtype}"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _hf_ref(x64: torch.Tensor, weights) -> torch.Tensor:
    for name, w in R.STENCILS.items():
        if list(w) == list(weights):
            return R.high_frequency(x64, name)
    wa, wb, wc, wd = weights
    a, b, c, d = R._blocks(x64)
    return wa * a + wb * b + wc * c + wd * d


# ---------------------------------------------------------------------------- haar_dwt2 / idwt2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_haar_dwt2(dtype, shape, noncontiguous, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    ll, (h, v, d) = R.haar_dwt2(x.double())
    _check(OPS.haar_dwt2(x), torch.stack((ll, h, v, d)), dtype, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_haar_idwt2(dtype, shape, noncontiguous, gen):
    n, c, hh, ww = shape
    bands = _rand((4, n, c, hh // 2, ww // 2), dtype, gen, noncontiguous=noncontiguous)
    b64 = bands.double()
    _check(OPS.haar_idwt2(bands), R.haar_idwt2(b64[0], (b64[1], b64[2], b64[3])), dtype, dtype)


def test_haar_round_trip(gen):
    x = _rand((6, 3, 16, 10), torch.float64, gen)
    torch.testing.assert_close(OPS.haar_idwt2(OPS.haar_dwt2(x)), x, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- high_frequency


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("weights", STENCIL_WEIGHTS)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_high_frequency(dtype, shape, weights, noncontiguous, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    _check(OPS.high_frequency(x, weights), _hf_ref(x.double(), weights), dtype, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("weights", STENCIL_WEIGHTS)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_high_frequency_backward(dtype, shape, weights, noncontiguous, gen):
    n, c, hh, ww = shape
    grad = _rand((n, c, hh // 2, ww // 2), dtype, gen, noncontiguous=noncontiguous)
    x64 = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(_hf_ref(x64, weights), x64, grad.double())
    _check(OPS.high_frequency_backward(grad, weights), ref, dtype, dtype)


# ---------------------------------------------------------------------------- gram


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MATRIX_SHAPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_gram(dtype, shape, noncontiguous, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    _check(OPS.gram(x), R.gram(x.double()), dtype, _acc(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MATRIX_SHAPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_gram_backward(dtype, shape, noncontiguous, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    g = _rand((shape[0], shape[0]), _acc(dtype), gen, noncontiguous=noncontiguous)
    x64 = x.double().clone().requires_grad_()
    (ref,) = torch.autograd.grad(R.gram(x64), x64, g.double())
    _check(OPS.gram_backward(g, x), ref, dtype, dtype)


def test_gram_transposed_input(gen):
    x = _rand((200, 16), torch.float32, gen).t()  # (16, 200), column-major
    _check(OPS.gram(x), R.gram(x.double()), torch.float32, torch.float32)


# ---------------------------------------------------------------------------- hf_gram


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("weights", STENCIL_WEIGHTS[::2])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_hf_gram(dtype, shape, weights, noncontiguous, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    _check(OPS.hf_gram(x, weights), R.gram(_hf_ref(x.double(), weights)), dtype, _acc(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("weights", STENCIL_WEIGHTS[::2])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_hf_gram_backward(dtype, shape, weights, noncontiguous, gen):
    x = _rand(shape, dtype, gen, noncontiguous=noncontiguous)
    g = _rand((shape[0], shape[0]), _acc(dtype), gen)
    x64 = x.double().clone().requires_grad_()
    (ref,) = torch.autograd.grad(R.gram(_hf_ref(x64, weights)), x64, g.double())
    _check(OPS.hf_gram_backward(g, x, weights), ref, dtype, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_hf_gram_strided_layouts(layout, gen):
    x = _rand((8, 3, 16, 12), torch.float32, gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    w = STENCIL_WEIGHTS[0]
    _check(OPS.hf_gram(x, w), R.gram(_hf_ref(x.double(), w)), torch.float32, torch.float32)
    g = _rand((8, 8), torch.float32, gen)
    x64 = x.double().clone().requires_grad_()
    (ref,) = torch.autograd.grad(R.gram(_hf_ref(x64, w)), x64, g.double())
    _check(OPS.hf_gram_backward(g, x, w), ref, torch.float32, torch.float32)


def test_hf_gram_large_map_many_chunks(gen):
    """A map big enough to need several panels per thread, with a ragged last chunk."""
    x = _rand((16, 3, 130, 258), torch.float32, gen)
    w = STENCIL_WEIGHTS[0]
    _check(OPS.hf_gram(x, w), R.gram(_hf_ref(x.double(), w)), torch.float32, torch.float32)
    g = _rand((16, 16), torch.float32, gen)
    x64 = x.double().clone().requires_grad_()
    (ref,) = torch.autograd.grad(R.gram(_hf_ref(x64, w)), x64, g.double())
    _check(OPS.hf_gram_backward(g, x, w), ref, torch.float32, torch.float32)


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
    _check(out, R.gram(_hf_ref(x.double(), w)), torch.float64, torch.float64)
    x64 = x.double().clone().requires_grad_()
    (ref,) = torch.autograd.grad(R.gram(_hf_ref(x64, w)), x64, g)
    _check(grad, ref, torch.float64, torch.float64)


def test_hf_gram_under_inference_mode(gen):
    x = _rand((4, 3, 16, 16), torch.float32, gen)
    w = STENCIL_WEIGHTS[0]
    with torch.inference_mode():
        out = OPS.hf_gram(x, w)
        grad = OPS.hf_gram_backward(torch.ones(4, 4), x, w)
    _check(out, R.gram(_hf_ref(x.double(), w)), torch.float32, torch.float32)
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


# ---------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 8, 6, generator=g)
    w = STENCIL_WEIGHTS[0]
    return {
        "haar_dwt2": (x,),
        "haar_idwt2": (torch.randn(4, 4, 3, 4, 3, generator=g),),
        "high_frequency": (x, w),
        "high_frequency_backward": (torch.randn(4, 3, 4, 3, generator=g), w),
        "gram": (torch.randn(4, 10, generator=g),),
        "gram_backward": (torch.randn(4, 4, generator=g), torch.randn(4, 10, generator=g)),
        "hf_gram": (x, w),
        "hf_gram_backward": (torch.randn(4, 4, generator=g), x, w),
    }


def _has_fake_impl(op, args) -> bool:
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            op(*fake_args)
    except Exception:  # noqa: BLE001 - any failure means no usable fake/meta kernel
        return False
    return True


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    """Schema check always; fake-tensor / AOT checks when the Python layer registered fakes."""
    args = _opcheck_cases()[name]
    op = getattr(OPS, name).default
    utils = ["test_schema"]
    if _has_fake_impl(op, args):
        utils += ["test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"]
    torch.library.opcheck(op, args, test_utils=utils)


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
