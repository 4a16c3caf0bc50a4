"""The Triton kernels (dsfast.kernels) against the float64 reference, kernel by kernel.

On a CUDA machine the kernels run on the GPU; elsewhere through the Triton interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1 before triton is imported). Every kernel runs every dtype on one
shape, the edge shapes (N=3 and N=17, C=1, several tiles) in float32 and a non-contiguous layout;
float32 / float64 must match to 1e-5 / 1e-10 of the reference's size, float16 / bfloat16 be no
worse than 2x PyTorch's own error on the same inputs plus 1e-6 of the reference's size (see
``interpreter_atol`` for bfloat16 under the interpreter). Every test runs with
DSFAST_POISON_OUTPUTS=1, so an output element a kernel forgets to write shows up as NaN.
"""
import importlib
import importlib.util
import pathlib
import sys

import pytest
import torch

from tests.conftest import assert_close_in_low_precision, interpreter_atol, require_backend

require_backend("triton")  # fails the run when DSFAST_REQUIRE_BACKENDS names triton and it is missing
from dsfast import reference as R  # noqa: E402


def _load_kernels():
    """``dsfast.kernels`` when installed; else the repository's kernels/ folder under that name."""
    try:
        return importlib.import_module("dsfast.kernels")
    except ModuleNotFoundError:
        root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "dsfast.kernels", root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["dsfast.kernels"] = module
        spec.loader.exec_module(module)
        return module


_load_kernels()
from dsfast.kernels import _launch  # noqa: E402
from dsfast.kernels import domainstudio_loss as K_ds  # noqa: E402
from dsfast.kernels import haar_dwt2 as K_haar  # noqa: E402
from dsfast.kernels import hf_pairwise_similarity_kl as K_hfgram  # noqa: E402
from dsfast.kernels import high_frequency as K_hf  # noqa: E402
from dsfast.kernels import pairwise_similarity_kl as K_gram  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
STANDARD = (3, 3, 16, 10)
# (shape, dtype): every dtype on STANDARD, edge shapes in float32; N == 5 is the non-contiguous layout.
CASES = [(STANDARD, d) for d in DTYPES] + [((17, 3, 16, 10), torch.float32), ((17, 1, 4, 6), torch.float32),
                                           ((3, 1, 4, 6), torch.float32), ((5, 3, 8, 8), torch.float32),
                                           ((5, 3, 8, 8), torch.float16)]
CASE_IDS = ["x".join(map(str, s)) + f"-{str(d)[6:]}" for s, d in CASES]
# high-frequency kernels: both stencils on float32 and float64, domainstudio elsewhere
HF_CASES = [(s, d, "domainstudio") for s, d in CASES] + [(STANDARD, d, "pywt") for d in DTYPES[:2]]
HF_IDS = CASE_IDS + [f"{i}-pywt" for i in CASE_IDS[:2]]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("DSFAST_POISON_OUTPUTS", "1")
    # Under the interpreter, check the block sizes a GPU would run (not the interpreter's big tiles).
    monkeypatch.setenv("DSFAST_TRITON_GPU_TILES", "1")


def _rand(shape, dtype, gen, noncontig=False):
    """Values exactly representable in ``dtype``; optionally laid out with non-trivial strides."""
    if noncontig:
        # last two dims swapped in memory, and a strided slice along dim 1
        n, c, *rest = shape
        big = torch.randn((n, 2 * c, *rest[::-1]), generator=gen, dtype=torch.float64)
        x = big[:, ::2].transpose(-1, -2)
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x.to(dtype)
    assert x.shape == tuple(shape)
    return x.to(DEVICE)


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # max |error| / max |reference|


def _vjp(fn, x, g):
    """d(fn(x)) / dx applied to the cotangent ``g`` (autograd of the reference)."""
    x = x.detach().clone().requires_grad_()
    (out,) = torch.autograd.grad(fn(x), x, g)
    return out


def _check(out, ref, dtype, out_dtype=None, torch_out=None):
    """``out`` against the float64 ``ref``; a half-precision output against 2x the error of
    ``torch_out`` (PyTorch on the same inputs, in their dtype) plus 1e-6 of the reference's size."""
    out_dtype = out_dtype or dtype
    assert out.device.type == DEVICE
    if out_dtype in HALF:
        atol = interpreter_atol(out_dtype, DEVICE, "triton", 1e-6)
        assert_close_in_low_precision(out, torch_out, ref.to(out.device), k=2.0, atol=atol, msg=str(out_dtype))
        return
    assert out.dtype == out_dtype, (out.dtype, out_dtype)
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output elements"
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    scale = ref64.abs().max().clamp_min(1e-30)
    err = ((out64 - ref64).abs().max() / scale).item()
    assert err <= TOL[dtype], f"relative error {err:.3e} > {TOL[dtype]:.1e} ({dtype})"


def _gram_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gram_tol_dtype(dtype):
    # Grams of 16-bit inputs are fp32 and exact up to fp32 accumulation.
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# haar_dwt2 / haar_idwt2
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype", CASES, ids=CASE_IDS)
def test_haar_dwt2(shape, dtype, gen):
    x = _rand(shape, dtype, gen, noncontig=shape[0] == 5)

    def dwt(x):
        ll, (h, v, d) = R.haar_dwt2(x)
        return torch.stack((ll, h, v, d))

    _check(K_haar.haar_dwt2(x), dwt(x.double()), dtype, torch_out=dwt(x))


@pytest.mark.parametrize("shape,dtype", CASES, ids=CASE_IDS)
def test_haar_idwt2(shape, dtype, gen):
    n, c, hh, ww = shape
    bands = torch.randn((4, n, c, hh // 2, ww // 2), generator=gen, dtype=torch.float64).to(dtype)
    if n == 5:  # non-contiguous bands: band axis innermost in memory
        bands = bands.permute(1, 2, 3, 4, 0).contiguous().permute(4, 0, 1, 2, 3)
    bands = bands.to(DEVICE)
    b64 = bands.double()
    ref = R.haar_idwt2(b64[0], (b64[1], b64[2], b64[3]))
    _check(K_haar.haar_idwt2(bands), ref, dtype, torch_out=R.haar_idwt2(bands[0], (bands[1], bands[2], bands[3])))


def test_haar_roundtrip(gen):
    x = _rand((3, 2, 8, 6), torch.float64, gen)
    _check(K_haar.haar_idwt2(K_haar.haar_dwt2(x)), x, torch.float64)


# --------------------------------------------------------------------------------------------------
# high_frequency / high_frequency_backward
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype,stencil", HF_CASES, ids=HF_IDS)
def test_high_frequency(shape, dtype, stencil, gen):
    x = _rand(shape, dtype, gen, noncontig=shape[0] == 5)
    _check(K_hf.high_frequency(x, R.STENCILS[stencil]), R.high_frequency(x.double(), stencil), dtype,
           torch_out=R.high_frequency(x, stencil))


@pytest.mark.parametrize("shape,dtype,stencil", HF_CASES, ids=HF_IDS)
def test_high_frequency_backward(shape, dtype, stencil, gen):
    n, c, hh, ww = shape
    grad = _rand((n, c, hh // 2, ww // 2), dtype, gen,
                 noncontig=n == 5)
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    R.high_frequency(x, stencil).backward(grad.double().cpu())
    torch_out = _vjp(lambda x: R.high_frequency(x, stencil), torch.zeros(shape, dtype=dtype, device=DEVICE), grad)
    _check(K_hf.high_frequency_backward(grad, R.STENCILS[stencil]), x.grad, dtype, torch_out=torch_out)


def test_stencils_wide_rows(gen):
    """Rows wider than one tile (several column tiles, partial last one) with a channels-last layout."""
    x = _rand((2, 3, 6, 300), torch.float32, gen).contiguous(memory_format=torch.channels_last)
    w = R.STENCILS["pywt"]
    _check(K_hf.high_frequency(x, w), R.high_frequency(x.double(), "pywt"), torch.float32)
    ll, (h, v, d) = R.haar_dwt2(x.double())
    bands = K_haar.haar_dwt2(x)
    _check(bands, torch.stack((ll, h, v, d)), torch.float32)
    _check(K_haar.haar_idwt2(bands), x, torch.float32)
    g = _rand((2, 3, 3, 150), torch.float32, gen, noncontig=True)
    xg = torch.zeros((2, 3, 6, 300), dtype=torch.float64, requires_grad=True)
    R.high_frequency(xg, "pywt").backward(g.double().cpu())
    _check(K_hf.high_frequency_backward(g, w), xg.grad, torch.float32)


def test_high_frequency_float64_weights(gen):
    """Weights reach float64 kernels unrounded (Triton would pass Python floats as float32)."""
    w = (2**-0.5, -(2**-0.5), 1 / 3, 0.1)
    x = _rand((3, 1, 4, 6), torch.float64, gen)
    a, b, c, d = R._blocks(x)
    _check(K_hf.high_frequency(x, w), w[0] * a + w[1] * b + w[2] * c + w[3] * d, torch.float64)


# --------------------------------------------------------------------------------------------------
# gram / gram_backward
# --------------------------------------------------------------------------------------------------
def _flat_input(n, d, dtype, gen, noncontig):
    if noncontig:  # column-major (N, D) and a strided column slice
        big = torch.randn((2 * d, n), generator=gen, dtype=torch.float64).to(dtype)
        x = big[::2].T
    else:
        x = torch.randn((n, d), generator=gen, dtype=torch.float64).to(dtype)
    return x.to(DEVICE)


# (n, d, dtype): every dtype on (17, 480), edge shapes in float32; N == 5 is the non-contiguous layout.
GRAM_CASES = [(17, 480, dt) for dt in DTYPES] + [(3, 24, torch.float32), (17, 7, torch.float32),
                                                (5, 1000, torch.float32), (5, 192, torch.float16)]


@pytest.mark.parametrize("n,d,dtype", GRAM_CASES)
def test_gram(n, d, dtype, gen):
    x = _flat_input(n, d, dtype, gen, noncontig=n == 5)
    out = K_gram.gram(x)
    _check(out, R.gram(x.double()), _gram_tol_dtype(dtype), _gram_dtype(dtype))


def test_gram_of_images_flattens_per_sample(gen):
    x = _rand((5, 3, 8, 8), torch.float32, gen, noncontig=True)
    _check(K_gram.gram(x), R.gram(x.double()), torch.float32)


@pytest.mark.parametrize("n,d,dtype", GRAM_CASES)
def test_gram_backward(n, d, dtype, gen):
    x = _flat_input(n, d, dtype, gen, noncontig=n == 5)
    g = torch.randn((n, n), generator=gen, dtype=torch.float64)
    ref = (g + g.T) @ x.double().cpu()
    g = g.to(_gram_dtype(dtype)).to(DEVICE)
    if n == 17:
        g = g.T.contiguous().T  # non-contiguous grad_gram
    _check(K_gram.gram_backward(g, x), ref, dtype, torch_out=_vjp(R.gram, x, g))


# The N x N tail: N=3 (smallest), 16 (headline, one row block), 37 (three row blocks of 16 x 64).
TAIL_CASES = [
    (3, torch.float64, "source||adapted", "mean", None, 1.0),
    (16, torch.float32, "adapted||source", "sum", None, 0.3),
    (16, torch.float64, "source||adapted", "batchmean", [3, 1, 3, 0], 1.0),
    (37, torch.float64, "adapted||source", "mean", [36, 2, 2, 20, 5], 2.0),
    (37, torch.float32, "source||adapted", "mean", None, 0.7),
]


@pytest.mark.parametrize("n,dtype,direction,reduction,anchors,tau", TAIL_CASES)
def test_similarity_kl_tail(n, dtype, direction, reduction, anchors, tau, gen):
    """Loss and both Gram gradients against the float64 reference (anchors with a repeated row)."""
    assert K_gram.COSINE_EPS == R.COSINE_EPS
    x = torch.randn((n, 40), generator=gen, dtype=torch.float64)
    y = x + 0.4 * torch.randn((n, 40), generator=gen, dtype=torch.float64)
    g_source, g_adapted = (R.gram(v).to(dtype).requires_grad_() for v in (x, y))
    idx = None if anchors is None else torch.tensor(anchors)
    ref = R.similarity_kl_from_gram(g_source.double(), g_adapted.double(), tau=tau, direction=direction,
                                    reduction=reduction, anchors=idx)
    upstream = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    ref.backward(upstream)
    rows = n if idx is None else len(anchors)
    weights = None if idx is None else torch.bincount(idx, minlength=n).double().to(DEVICE)
    scale = {"mean": 1 / (rows * (n - 1)), "batchmean": 1 / rows, "sum": 1.0}[reduction]
    args = (g_source.detach().to(DEVICE), g_adapted.detach().to(DEVICE), weights, tau,
            direction == "source||adapted", scale)
    loss = K_gram.similarity_kl(*args)
    assert loss.shape == () and loss.dtype == dtype
    d_source, d_adapted = K_gram.similarity_kl_backward(upstream.to(dtype).to(DEVICE), *args)
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # float64 math either way; float32 rounds the outputs
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=tol, atol=0)
    for got, want in ((d_source, g_source.grad), (d_adapted, g_adapted.grad)):
        assert got.dtype == dtype and not got.isnan().any()
        assert (got.double().cpu() - want.double()).abs().max() <= tol * want.abs().max()


def _forced_gram_config(block_n, splits):
    def config(n, k_blocks, block_k, operand, device, **_):  # the caller's tile edge and sizing are overridden
        per = -(-k_blocks // splits)
        return K_gram.GramConfig(block_n, block_k, k_blocks, -(-k_blocks // per), per, 4, 1)
    return config


@pytest.mark.parametrize("splits", [1, 3], ids=["one-split", "splitk"])
@pytest.mark.parametrize("n", [17, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.slow
def test_gram_multi_tile(monkeypatch, n, splits, dtype, gen):
    """Several 16x16 tiles: off-diagonal tile pairs, the mirrored lower half, split-K (summed by the last split)."""
    monkeypatch.setenv("DSFAST_TRITON_GPU_TILES", "1")  # GPU K blocks: several per split
    monkeypatch.setattr(K_gram, "gram_config", _forced_gram_config(16, splits))
    x = _flat_input(n, 100, dtype, gen, noncontig=True)
    _check(K_gram.gram(x), R.gram(x.double()), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gram_split_sum_in_trips(monkeypatch, dtype, gen):
    """More splits than the last program sums per trip (2 here): several trips, the last one partial."""
    monkeypatch.setenv("DSFAST_TRITON_GPU_TILES", "1")
    monkeypatch.setattr(K_gram, "gram_config", _forced_gram_config(16, 7))
    monkeypatch.setattr(K_gram, "SUM_ELEMENTS", 2 * 16 * 16)
    x = _flat_input(33, 250, dtype, gen, noncontig=False)
    _check(K_gram.gram(x), R.gram(x.double()), dtype)


@pytest.mark.parametrize("n", [17, 33])
def test_gram_backward_multi_tile(monkeypatch, n, gen):
    monkeypatch.setattr(K_gram, "gram_backward_config", lambda *a: K_gram.GramBackwardConfig(16, 16, 16, 4, 1))
    x = _flat_input(n, 40, torch.float32, gen, noncontig=False)
    g = torch.randn((n, n), generator=gen, dtype=torch.float64)
    ref = (g + g.T) @ x.double().cpu()
    _check(K_gram.gram_backward(g.float().to(DEVICE), x), ref, torch.float32)


def test_split_k_by_bytes(monkeypatch):
    """GPU-sized heuristics: every K block in exactly one split, no empty split, and every split reads at least
    CTA_BYTES (32 KB) when there are several; the headline one-pass forward (N=16, 3x256², both batches) is
    split by its bytes, not into ~8 programs per SM."""
    monkeypatch.setattr(K_gram, "multiprocessor_count", lambda device: 132)
    for pairs, k_blocks, k_block_bytes in [(1, 1, 4096), (1, 7, 4096), (1, 3072, 4096), (10, 512, 16384),
                                           (1, 100000, 2048), (300, 64, 65536), (2, 3072, 64)]:
        splits, per = K_gram.split_k(pairs, k_blocks, k_block_bytes, 2048, torch.device(DEVICE), min_k_blocks=2)
        assert splits >= 1 and per >= 1
        assert (splits - 1) * per < k_blocks <= splits * per
        assert splits == 1 or per * k_block_bytes >= K_gram.CTA_BYTES
        assert splits * 2048 <= max(K_gram.CTA_BYTES, k_blocks * k_block_bytes // splits)  # the last split's sum
    monkeypatch.setenv("DSFAST_TRITON_GPU_TILES", "1")
    cfg = K_hfgram.hf_gram_config(16, 3, 128, 128, torch.float32, torch.device(DEVICE), ds=True, batches=2)
    assert cfg.block_n == 16 and 16 <= cfg.splits <= 132
    assert cfg.k_blocks_per_split * 16 * 4 * cfg.block_k * 4 >= K_gram.CTA_BYTES


# --------------------------------------------------------------------------------------------------
# hf_gram / hf_gram_backward
# --------------------------------------------------------------------------------------------------
def _hf_flat(x, stencil):
    return R.high_frequency(x.double().cpu(), stencil).reshape(x.shape[0], -1)


@pytest.mark.parametrize("shape,dtype,stencil", HF_CASES, ids=HF_IDS)
def test_hf_gram(shape, dtype, stencil, gen):
    x = _rand(shape, dtype, gen, noncontig=shape[0] == 5)
    hf = _hf_flat(x, stencil)
    out = K_hfgram.hf_gram(x, R.STENCILS[stencil])
    _check(out, hf @ hf.T, _gram_tol_dtype(dtype), _gram_dtype(dtype))


@pytest.mark.parametrize("shape,dtype,stencil", HF_CASES, ids=HF_IDS)
def test_hf_gram_backward(shape, dtype, stencil, gen):
    n = shape[0]
    x = _rand(shape, dtype, gen, noncontig=n == 5)
    g = torch.randn((n, n), generator=gen, dtype=torch.float64)
    x64 = x.double().cpu().requires_grad_(True)
    hf = R.high_frequency(x64, stencil).reshape(n, -1)
    (hf @ hf.T).backward(g)
    g = g.to(_gram_dtype(dtype)).to(DEVICE)
    if n == 17:
        g = g.T.contiguous().T
    # PyTorch's baseline keeps the hf map in float32, as the fused kernel does
    torch_out = _vjp(lambda x: R.gram(R.high_frequency(x.float(), stencil)), x, g)
    _check(K_hfgram.hf_gram_backward(g, x, R.STENCILS[stencil]), x64.grad, dtype, torch_out=torch_out)


@pytest.mark.parametrize("splits", [1, 3], ids=["direct", "splitk"])
@pytest.mark.parametrize("n", [17, 33])
@pytest.mark.slow
def test_hf_gram_multi_tile(monkeypatch, n, splits, gen):
    monkeypatch.setattr(K_hfgram, "gram_config", _forced_gram_config(16, splits))
    x = _rand((n, 3, 8, 6), torch.float32, gen, noncontig=True)
    hf = _hf_flat(x, "domainstudio")
    _check(K_hfgram.hf_gram(x, R.STENCILS["domainstudio"]), hf @ hf.T, torch.float32)


# --------------------------------------------------------------------------------------------------
# domainstudio_grams / domainstudio_grams_backward
# --------------------------------------------------------------------------------------------------
def _ds_outputs(x, t, stencil):
    """(image Gram, hf Gram, hf-MSE sum) of x (and target t) in their dtype."""
    hf = R.high_frequency(x, stencil)
    diff = hf if t is None else hf - R.high_frequency(t, stencil)
    return R.gram(x), R.gram(hf), diff.pow(2).sum()


def _ds_reference(x, t, stencil, grads=None):
    """(image Gram, hf Gram, hf-MSE sum) in float64 and, for cotangents ``grads``, the gradient in x."""
    x64 = x.double().cpu()
    t64 = None if t is None else t.double().cpu()
    if grads is None:
        return _ds_outputs(x64, t64, stencil)
    return _vjp(lambda x: _ds_outputs(x, t64, stencil), x64, grads)


DS_CASES = [((3, 1, 4, 6), torch.float32), ((5, 3, 8, 8), torch.float64), ((17, 3, 16, 10), torch.bfloat16),
            ((5, 1, 16, 10), torch.float16)]


@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
@pytest.mark.parametrize("shape,dtype", DS_CASES, ids=[f"{'x'.join(map(str, s))}-{d}" for s, d in DS_CASES])
def test_domainstudio_grams(shape, dtype, with_target, gen):
    x = _rand(shape, dtype, gen, noncontig=shape[0] == 5)
    t = _rand(shape, dtype, gen, noncontig=shape[0] == 3) if with_target else None
    for out, ref in zip(K_ds.domainstudio_grams(x, t, R.STENCILS["pywt"]), _ds_reference(x, t, "pywt")):
        _check(out, ref, _gram_tol_dtype(dtype), _gram_dtype(dtype))


@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
@pytest.mark.parametrize("shape,dtype", DS_CASES, ids=[f"{'x'.join(map(str, s))}-{d}" for s, d in DS_CASES])
def test_domainstudio_grams_backward(shape, dtype, with_target, gen):
    n = shape[0]
    x = _rand(shape, dtype, gen, noncontig=n == 5)
    t = _rand(shape, dtype, gen) if with_target else None
    grads = (torch.randn((n, n), generator=gen, dtype=torch.float64),
             torch.randn((n, n), generator=gen, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
    ref = _ds_reference(x, t, "domainstudio", grads)
    gi, gh, gs = (g.to(_gram_dtype(dtype)).to(DEVICE) for g in grads)
    out = K_ds.domainstudio_grams_backward(gi.T.contiguous().T, gh, gs, x, t, R.STENCILS["domainstudio"])
    # PyTorch's baseline keeps the maps in float32, as the fused kernel does
    t32 = None if t is None else t.float()
    torch_out = _vjp(lambda x: _ds_outputs(x.float(), t32, "domainstudio"), x, (gi, gh, gs)) if dtype in HALF else None
    _check(out, ref, dtype, torch_out=torch_out)


@pytest.mark.parametrize("splits", [1, 3], ids=["direct", "splitk"])
@pytest.mark.slow
def test_domainstudio_grams_multi_tile(monkeypatch, splits, gen):
    """Off-diagonal tile pairs (which must not add to the hf-MSE sum), the mirrored halves, split-K."""
    monkeypatch.setattr(K_hfgram, "gram_config", _forced_gram_config(16, splits))
    monkeypatch.setattr(K_hfgram, "gram_backward_config", lambda *a: K_gram.GramBackwardConfig(16, 32, 16, 4, 1))
    x, t = (_rand((33, 3, 8, 6), torch.float32, gen, noncontig=True) for _ in range(2))
    for out, ref in zip(K_ds.domainstudio_grams(x, t, R.STENCILS["domainstudio"]), _ds_reference(x, t, "domainstudio")):
        _check(out, ref, torch.float32)
    grads = tuple(torch.randn(s, generator=gen, dtype=torch.float64) for s in ((33, 33), (33, 33), ()))
    out = K_ds.domainstudio_grams_backward(*(g.float() for g in grads), x, t, R.STENCILS["domainstudio"])
    _check(out, _ds_reference(x, t, "domainstudio", grads), torch.float32)


# --------------------------------------------------------------------------------------------------
# domainstudio_grams / _pair_grams / _backward with per-sample hf-MSE weights (sse_weights)
# --------------------------------------------------------------------------------------------------
def _sample_weights(n, gen, dtype=torch.float32):
    """Random non-negative per-sample weights with zeros (the first always), on DEVICE."""
    w = torch.rand(n, generator=gen, dtype=torch.float64) * 3 * (torch.rand(n, generator=gen) > 0.3)
    w[0] = 0.0
    return w.to(dtype).to(DEVICE)


def _ds_weighted_outputs(x, t, stencil, sw):
    """(image Gram, hf Gram, Σ_i sw_i Σ (hf(x_i) - hf(t_i))²) in x's dtype (t None: hf(t) = 0)."""
    hf = R.high_frequency(x, stencil)
    diff = hf if t is None else hf - R.high_frequency(t, stencil)
    return R.gram(x), R.gram(hf), (sw.to(device=diff.device, dtype=diff.dtype) * diff.flatten(1).pow(2).sum(1)).sum()


def _ds_weighted_reference(x, t, stencil, sw, grads=None):
    x64 = x.double().cpu()
    t64 = None if t is None else t.double().cpu()
    if grads is None:
        return _ds_weighted_outputs(x64, t64, stencil, sw)
    return _vjp(lambda x: _ds_weighted_outputs(x, t64, stencil, sw), x64, grads)


# every dtype with a target (the loss's adapted batch), float32 without one (weights then scale Σ hf(x_i)²)
SSE_W_CASES = [(s, d, True) for s, d in DS_CASES] + [(*DS_CASES[0], False)]


@pytest.mark.parametrize("shape,dtype,with_target", SSE_W_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{d}-{'target' if t else 'no-target'}" for s, d, t in SSE_W_CASES])
def test_domainstudio_grams_sse_weights(shape, dtype, with_target, gen):
    n = shape[0]
    x = _rand(shape, dtype, gen, noncontig=n == 5)
    t = _rand(shape, dtype, gen, noncontig=n == 3) if with_target else None
    sw = _sample_weights(n, gen)
    outs = K_ds.domainstudio_grams(x, t, R.STENCILS["pywt"], sw)
    torch_outs = _ds_weighted_outputs(x.float(), None if t is None else t.float(), "pywt", sw)  # maps in fp32
    for out, ref, torch_out in zip(outs, _ds_weighted_reference(x, t, "pywt", sw), torch_outs):
        _check(out, ref, _gram_tol_dtype(dtype), _gram_dtype(dtype), torch_out=torch_out)
    grads = (torch.randn((n, n), generator=gen, dtype=torch.float64),
             torch.randn((n, n), generator=gen, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
    gi, gh, gs = (g.to(_gram_dtype(dtype)).to(DEVICE) for g in grads)
    out = K_ds.domainstudio_grams_backward(gi, gh, gs, x, t, R.STENCILS["domainstudio"], sw)
    t32 = None if t is None else t.float()
    torch_out = _vjp(lambda x: _ds_weighted_outputs(x.float(), t32, "domainstudio", sw), x,
                     (gi, gh, gs)) if dtype in HALF else None
    _check(out, _ds_weighted_reference(x, t, "domainstudio", sw, grads), dtype, torch_out=torch_out)


@pytest.mark.parametrize("splits", [1, 3], ids=["direct", "splitk"])
@pytest.mark.slow
def test_domainstudio_grams_sse_weights_multi_tile(monkeypatch, splits, gen):
    """Three 16-row tiles (the last one partial): each diagonal tile weights its own samples' rows, each
    backward row tile its own rows; split-K sums of weighted partials. float64 weights on float32 inputs."""
    monkeypatch.setattr(K_hfgram, "gram_config", _forced_gram_config(16, splits))
    monkeypatch.setattr(K_hfgram, "gram_backward_config", lambda *a: K_gram.GramBackwardConfig(16, 32, 16, 4, 1))
    x, t = (_rand((33, 1, 8, 6), torch.float32, gen, noncontig=True) for _ in range(2))
    sw = _sample_weights(33, gen, torch.float64)
    st = "domainstudio"
    for out, ref in zip(K_ds.domainstudio_grams(x, t, R.STENCILS[st], sw), _ds_weighted_reference(x, t, st, sw)):
        _check(out, ref, torch.float32)
    grads = tuple(torch.randn(s, generator=gen, dtype=torch.float64) for s in ((33, 33), (33, 33), ()))
    out = K_ds.domainstudio_grams_backward(*(g.float() for g in grads), x, t, R.STENCILS[st], sw)
    _check(out, _ds_weighted_reference(x, t, st, sw, grads), torch.float32)


@pytest.mark.slow
def test_domainstudio_pair_grams_sse_weights(monkeypatch, gen):
    """Both batches in one launch (three 16-row tiles, split-K): the adapted batch's partial sums weighted (they
    add up to the weighted sum), the Grams untouched; all-ones weights give the unweighted launch's bits."""
    monkeypatch.setattr(K_hfgram, "gram_config", _forced_gram_config(16, 2))
    n = 33
    s, a, t = (_rand((n, 1, 4, 6), torch.float64, gen) for _ in range(3))
    sw = _sample_weights(n, gen, torch.float64)
    st = "domainstudio"
    hf, image, sse = K_ds.domainstudio_pair_grams(s, a, t, R.STENCILS[st], sw)
    for b, x in enumerate((s, a)):
        ref_image, ref_hf, _ = _ds_weighted_reference(x, None, st, sw)
        _check(hf[b], ref_hf, torch.float64)
        _check(image[b], ref_image, torch.float64)
    _check(sse[1].sum(), _ds_weighted_reference(a, t, st, sw)[2], torch.float64)
    ones = K_ds.domainstudio_pair_grams(s, a, t, R.STENCILS[st], torch.ones(n, dtype=torch.float64, device=DEVICE))
    for x, y in zip(ones, K_ds.domainstudio_pair_grams(s, a, t, R.STENCILS[st])):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_domainstudio_grams_sse_weights_of_one_are_none(dtype, gen):
    """All-ones weights give the unweighted kernels' bits (products by 1 are exact), forward and backward."""
    x, t = (_rand((17, 1, 4, 6), dtype, gen) for _ in range(2))
    w = R.STENCILS["domainstudio"]
    ones = torch.ones(17, dtype=torch.float32, device=DEVICE)
    for out, ref in zip(K_ds.domainstudio_grams(x, t, w, ones), K_ds.domainstudio_grams(x, t, w)):
        assert torch.equal(out, ref)
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(_gram_dtype(dtype)).to(DEVICE)
             for s in ((17, 17), (17, 17), ())]
    assert torch.equal(K_ds.domainstudio_grams_backward(*grads, x, t, w, ones),
                       K_ds.domainstudio_grams_backward(*grads, x, t, w))


@pytest.mark.parametrize(
    "sse_weights, error",
    [(torch.ones(4), ValueError), (torch.ones(5, 1), ValueError), (torch.ones(5, dtype=torch.int64), TypeError),
     (torch.ones(5, device="meta"), ValueError)],
    ids=["short", "2-D", "int", "device"],
)
def test_domainstudio_grams_bad_sse_weights(sse_weights, error):
    x = torch.zeros((5, 3, 4, 4), device=DEVICE)
    g = torch.zeros((5, 5), device=DEVICE)
    sw = sse_weights.to(DEVICE) if sse_weights.device.type != "meta" else sse_weights
    w = R.STENCILS["domainstudio"]
    with pytest.raises(error, match="sse_weights"):
        K_ds.domainstudio_grams(x, x, w, sw)
    with pytest.raises(error, match="sse_weights"):
        K_ds.domainstudio_pair_grams(x, x, x, w, sw)
    with pytest.raises(error, match="sse_weights"):
        K_ds.domainstudio_grams_backward(g, g, g[0, 0], x, x, w, sw)


@pytest.mark.slow
def test_domainstudio_loss_launch_count_with_hfmse_weights(monkeypatch):
    """Per-sample hf-MSE weights add no launch: the whole loss launches exactly what it launches unweighted
    (tests/test_triton_launch.py: at most 3 forward and 3 backward)."""
    from dsfast import ops
    from dsfast.kernels._launch_count import LaunchCounter

    monkeypatch.setenv("DSFAST_POISON_OUTPUTS", "0")  # NaN-filling outputs is a debugging launch
    s, a, r = (torch.randn((16, 2, 8, 8), device=DEVICE) for _ in range(3))  # the count does not depend on C, H, W
    counts = {}
    for weighted in (False, True):
        adapted = a.clone().requires_grad_()
        weights = torch.rand(16, device=DEVICE) if weighted else None
        with LaunchCounter() as forward:
            total = ops.domainstudio_loss(s, adapted, r, backend="triton", check_finite=False,
                                          hfmse_weights=weights).total
        with LaunchCounter() as backward:
            total.backward()
        assert torch.isfinite(adapted.grad).all()
        counts[weighted] = (forward.triton, forward.torch, backward.triton, backward.torch)
    assert counts[True] == counts[False], counts
    assert len(counts[True][0]) + len(counts[True][1]) <= 3 and len(counts[True][2]) + len(counts[True][3]) <= 3


@pytest.mark.parametrize("n", [17, 33])
@pytest.mark.slow
def test_hf_gram_backward_multi_tile(monkeypatch, n, gen):
    monkeypatch.setattr(K_hfgram, "gram_backward_config",
                        lambda *a: K_gram.GramBackwardConfig(16, 16, 16, 4, 1))
    x = _rand((n, 3, 8, 6), torch.float32, gen, noncontig=True)
    g = torch.randn((n, n), generator=gen, dtype=torch.float64)
    x64 = x.double().cpu().requires_grad_(True)
    hf = R.high_frequency(x64, "pywt").reshape(n, -1)
    (hf @ hf.T).backward(g)
    _check(K_hfgram.hf_gram_backward(g.float().to(DEVICE), x, R.STENCILS["pywt"]), x64.grad, torch.float32)


# --------------------------------------------------------------------------------------------------
# The interpreter's own block sizes (few big programs), all eight kernels
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 3, 16, 10), (3, 2, 8, 300)], ids=["5x3x16x10", "3x2x8x300"])
def test_interpreter_tiles(monkeypatch, shape, gen):
    monkeypatch.setenv("DSFAST_TRITON_GPU_TILES", "0")
    n, c, hh, ww = shape
    x = _rand(shape, torch.float32, gen, noncontig=True)
    w, st = R.STENCILS["domainstudio"], "domainstudio"
    ll, (h, v, d) = R.haar_dwt2(x.double())
    bands = K_haar.haar_dwt2(x)
    _check(bands, torch.stack((ll, h, v, d)), torch.float32)
    _check(K_haar.haar_idwt2(bands), x, torch.float32)
    _check(K_hf.high_frequency(x, w), R.high_frequency(x.double(), st), torch.float32)
    grad = _rand((n, c, hh // 2, ww // 2), torch.float32, gen)
    xg = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    R.high_frequency(xg, st).backward(grad.double().cpu())
    _check(K_hf.high_frequency_backward(grad, w), xg.grad, torch.float32)
    flat = x.reshape(n, -1)
    _check(K_gram.gram(flat), R.gram(flat.double()), torch.float32)
    g = torch.randn((n, n), generator=gen, dtype=torch.float64)
    _check(K_gram.gram_backward(g.float().to(DEVICE), flat), (g + g.T) @ flat.double().cpu(), torch.float32)
    x64 = x.double().cpu().requires_grad_(True)
    hf = R.high_frequency(x64, st).reshape(n, -1)
    _check(K_hfgram.hf_gram(x, w), hf.detach() @ hf.detach().T, torch.float32)
    (hf @ hf.T).backward(g)
    _check(K_hfgram.hf_gram_backward(g.float().to(DEVICE), x, w), x64.grad, torch.float32)


# --------------------------------------------------------------------------------------------------
# Poisoning and bad input
# --------------------------------------------------------------------------------------------------
def test_poisoning_switch(monkeypatch):
    assert torch.isnan(_launch.new_output((2, 3), torch.float32, DEVICE)).all()
    monkeypatch.setenv("DSFAST_POISON_OUTPUTS", "0")
    assert _launch.new_output((2, 3), torch.float32, DEVICE).shape == (2, 3)


def test_bad_input():
    with pytest.raises(ValueError):
        K_haar.haar_dwt2(torch.zeros((1, 1, 3, 4), device=DEVICE))
    with pytest.raises(ValueError):
        K_hf.high_frequency(torch.zeros((1, 1, 4, 4), device=DEVICE), (1.0, 2.0))
    with pytest.raises(TypeError):
        K_gram.gram(torch.zeros((3, 4), dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError):
        K_hfgram.hf_gram_backward(torch.zeros((2, 2), device=DEVICE), torch.zeros((3, 1, 4, 4), device=DEVICE),
                                  R.STENCILS["pywt"])
