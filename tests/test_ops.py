"""Every public op on every available backend against the float64 reference, forward and backward.

Inputs are random draws from the per-test seed (``seed`` / ``gen`` fixtures of conftest, printed
on failure, ``DSFAST_TEST_SEED`` draws others); outputs of the compiled backends are poisoned with NaN before the kernels write them (DSFAST_POISON_OUTPUTS=1,
set in conftest), so an unwritten element fails the comparison.
"""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsfast import ops, reference
from tests.conftest import (
    BACKEND_CASES,
    REQUIRED_BACKENDS,
    assert_close_in_low_precision,
    interpreter_atol,
    missing_backends,
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in flatten(item)]


def forward_backward(fn, inputs, seed, scale=1.0):
    """Outputs of ``fn`` and the input gradients for a fixed random cotangent (times ``scale``)."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = flatten(fn(*inputs))
    gen = torch.Generator().manual_seed(seed + 1)
    cotangents = [(scale * torch.randn(o.shape, generator=gen, dtype=torch.float64)).to(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs, cotangents, allow_unused=True)
    return outs, grads


def assert_gradcheck(fn, inputs, seed):
    """gradcheck w.r.t. every input the op differentiates (a detached source is a constant)."""
    inputs = [x[:4, :1].clone() for x in inputs]
    _, grads = forward_backward(fn, inputs, seed)
    inputs = [x.requires_grad_(g is not None) for x, g in zip(inputs, grads)]
    assert torch.autograd.gradcheck(lambda *xs: tuple(flatten(fn(*xs))), inputs, fast_mode=True)


IMAGE = (5, 3, 8, 12)  # N, C, H, W: small enough for the Triton interpreter


def images(count, shape=IMAGE):
    return lambda gen: [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(count)]


PAIRWISE_OPTIONS = [
    dict(),
    dict(direction="adapted||source", reduction="batchmean", tau=0.5),
    dict(reduction="sum", detach_source=False),
    dict(anchors=torch.tensor([0, 2, 3])),
]

HFMSE_WEIGHTS = torch.tensor([0.5, 0.0, 2.0, 1.25, 0.75])  # per-sample hf-MSE weights of an IMAGE batch

# name -> (callable taking the backend, input builder)
OP_CASES = {
    "haar_dwt2": (lambda b: lambda x: ops.haar_dwt2(x, backend=b), images(1)),
    "haar_idwt2": (lambda b: lambda ll, h, v, d: ops.haar_idwt2(ll, (h, v, d), backend=b), images(4, (5, 3, 4, 6))),
    "haar_wavedec2": (lambda b: lambda x: ops.haar_wavedec2(x, 2, backend=b), images(1)),
    "haar_waverec2": (
        lambda b: lambda ll, h2, v2, d2, h1, v1, d1: ops.haar_waverec2([ll, (h2, v2, d2), (h1, v1, d1)], backend=b),
        lambda gen: images(4, (5, 3, 2, 3))(gen) + images(3, (5, 3, 4, 6))(gen),
    ),
    "high_frequency[domainstudio]": (lambda b: lambda x: ops.high_frequency(x, "domainstudio", backend=b), images(1)),
    "high_frequency[pywt]": (lambda b: lambda x: ops.high_frequency(x, "pywt", backend=b), images(1)),
    "hf_mse": (lambda b: lambda a, t: ops.hf_mse(a, t, backend=b), images(2)),
    **{
        f"pairwise_similarity_kl[{i}]": (
            lambda b, o=o: lambda s, a: ops.pairwise_similarity_kl(s, a, backend=b, **o), images(2)
        )
        for i, o in enumerate(PAIRWISE_OPTIONS)
    },
    **{
        f"hf_pairwise_similarity_kl[{i}]": (
            lambda b, o=o: lambda s, a: ops.hf_pairwise_similarity_kl(s, a, backend=b, **o), images(2)
        )
        for i, o in enumerate(PAIRWISE_OPTIONS)
    },
    "hf_pairwise_similarity_kl[pywt]": (
        lambda b: lambda s, a: ops.hf_pairwise_similarity_kl(s, a, stencil="pywt", backend=b), images(2)
    ),
    **{
        f"domainstudio_loss[{i}]": (
            lambda b, o=o: lambda s, a, r: ops.domainstudio_loss(s, a, r, backend=b, **o), images(3)
        )
        for i, o in enumerate(PAIRWISE_OPTIONS + [dict(stencil="pywt", lambda_img=0.5)])
    },
    # per-sample hf-MSE weights (with a zero; the first N of them: gradcheck slices the batch to N = 4)
    "domainstudio_loss[hfmse-weights]": (
        lambda b: lambda s, a, r: ops.domainstudio_loss(
            s, a, r, backend=b, hfmse_weights=HFMSE_WEIGHTS[: a.shape[0]].to(a.device)), images(3)
    ),
    # a zero weight: the separate ops (the skipped term is a constant 0, so only the total is compared)
    "domainstudio_loss[no-hf]": (
        lambda b: lambda s, a, r: ops.domainstudio_loss(s, a, r, lambda_hf=0, backend=b).total, images(3)
    ),
}

# Ops whose entry point is distinct (the pairwise option variants share their op's memory handling).
BASE_OPS = ["haar_dwt2", "haar_idwt2", "haar_wavedec2", "haar_waverec2", "high_frequency[domainstudio]", "hf_mse",
            "pairwise_similarity_kl[0]", "hf_pairwise_similarity_kl[0]"]
# Every op contiguous; the distinct entry points also with a non-contiguous (transposed) layout.
LAYOUT_CASES = [(name, "contiguous") for name in sorted(OP_CASES)] + [(name, "transposed") for name in BASE_OPS]


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, non-contiguous memory for ``transposed``."""
    return x if layout == "contiguous" else x.transpose(-1, -2).contiguous().transpose(-1, -2)


def test_required_backends_are_available():
    """``DSFAST_REQUIRE_BACKENDS`` (set by ``make test``): a backend CI must have is really there."""
    assert not missing_backends(), f"required backends {REQUIRED_BACKENDS}, missing {missing_backends()}"


# -- the reference itself --------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 1, 4, 10), (3, 2, 16, 6)])
def test_reference_dwt_matches_pywt(shape, gen):
    pywt = pytest.importorskip("pywt")  # PyWavelets: not on every GPU image
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    ll, (h, v, d) = reference.haar_dwt2(x)
    p_ll, (p_h, p_v, p_d) = pywt.dwt2(x.numpy(), "haar")
    for ours, theirs in zip((ll, h, v, d), (p_ll, p_h, p_v, p_d)):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(reference.haar_idwt2(ll, (h, v, d)).numpy(), x.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        reference.haar_idwt2(ll, (h, v, d)).numpy(), pywt.idwt2((p_ll, (p_h, p_v, p_d)), "haar"), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_reference_wavedec_matches_pywt(levels, gen):
    pywt = pytest.importorskip("pywt")
    x = torch.randn((2, 3, 16, 24), generator=gen, dtype=torch.float64)
    ours = reference.haar_wavedec2(x, levels)
    theirs = pywt.wavedec2(x.numpy(), "haar", level=levels)
    assert len(ours) == len(theirs) == levels + 1
    np.testing.assert_allclose(ours[0].numpy(), theirs[0], rtol=1e-12, atol=1e-12)
    for ours_level, theirs_level in zip(ours[1:], theirs[1:]):
        for a, b in zip(ours_level, theirs_level):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(reference.haar_waverec2(ours).numpy(), x.numpy(), rtol=1e-12, atol=1e-12)


def test_reference_stencils_are_sums_of_bands(gen):
    x = torch.randn((2, 3, 8, 8), generator=gen, dtype=torch.float64)
    _, (h, v, d) = reference.haar_dwt2(x)
    torch.testing.assert_close(reference.high_frequency(x, "pywt"), h + v + d)
    torch.testing.assert_close(reference.high_frequency(x, "domainstudio"), -v - h + d)
    torch.testing.assert_close(reference.high_frequency(x, "domainstudio"), reference.official_high_frequency(x))


@pytest.mark.parametrize("n", [3, 4, 9])
def test_reference_pairwise_matches_official_double_loop(n, gen):
    s = torch.randn((n, 3, 4, 4), generator=gen, dtype=torch.float64)
    a = torch.randn((n, 3, 4, 4), generator=gen, dtype=torch.float64, requires_grad=True)
    ours = reference.pairwise_similarity_kl(s, a)
    theirs = reference.official_pairwise_similarity_kl(s, a)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
    (g_ours,) = torch.autograd.grad(ours, a)
    (g_theirs,) = torch.autograd.grad(theirs, a)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-15)


def test_reference_direction_and_reductions(gen):
    s, a = (torch.randn((6, 10), generator=gen, dtype=torch.float64) for _ in range(2))
    p = torch.softmax(reference.similarity_logits(reference.gram(s)), 1)
    q = torch.softmax(reference.similarity_logits(reference.gram(a)), 1)
    kl_pq = (p * (p.log() - q.log())).sum()
    kl_qp = (q * (q.log() - p.log())).sum()
    torch.testing.assert_close(reference.pairwise_similarity_kl(s, a, reduction="sum"), kl_pq)
    torch.testing.assert_close(reference.pairwise_similarity_kl(s, a, reduction="mean"), kl_pq / 30)
    torch.testing.assert_close(reference.pairwise_similarity_kl(s, a, reduction="batchmean"), kl_pq / 6)
    torch.testing.assert_close(
        reference.pairwise_similarity_kl(s, a, reduction="sum", direction="adapted||source"), kl_qp
    )


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_reference_gradcheck(name, gen, seed):
    make, build = OP_CASES[name]
    assert_gradcheck(make("torch"), build(gen), seed)


# -- every compiled backend against the reference ----------------------------------------------
@pytest.mark.parametrize("name,layout", LAYOUT_CASES)
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_backend_matches_reference_fp32(device, backend, name, layout, gen, seed):
    make, build = OP_CASES[name]
    inputs64 = build(gen)
    inputs32 = [with_layout(x.float().to(device), layout) for x in inputs64]
    outs, grads = forward_backward(make(backend), inputs32, seed)
    ref_outs, ref_grads = forward_backward(make("torch"), inputs64, seed)
    assert len(outs) == len(ref_outs)
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == torch.float32 and out.device.type == device
        assert rel_err(out, ref) <= 1e-5, f"{name} forward on {backend}: {rel_err(out, ref):.2e}"
    for grad, ref in zip(grads, ref_grads):
        assert (grad is None) == (ref is None)
        if grad is not None:
            assert rel_err(grad, ref) <= 1e-5, f"{name} backward on {backend}: {rel_err(grad, ref):.2e}"


# Ops tested in half precision. Each output's error against the float64 reference (of the same half
# inputs) may be 2x PyTorch's error plus an atol (relative to the reference's size) from half_atol.
HALF_OPS = ["haar_dwt2", "haar_idwt2", "high_frequency[domainstudio]", "hf_mse", "hf_pairwise_similarity_kl[0]",
            "pairwise_similarity_kl[0]", "domainstudio_loss[0]", "domainstudio_loss[hfmse-weights]"]
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def half_atol(name: str, dtype: torch.dtype, scalar: bool) -> float:
    if scalar and name != "pairwise_similarity_kl[0]":
        # PyTorch rounds intermediates (the difference in hf_mse, the stencil sum, the hf map before
        # the Gram) to the half dtype, the fused kernels keep them in float32: a sum of many roundings
        # of the same values, which differ by chance up to a fraction of the unit roundoff u.
        # pairwise_similarity_kl has no half intermediate (Grams of half inputs are exact products
        # summed in float32), so it gets no such slack.
        return UNIT_ROUNDOFF[dtype] / 2
    return 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", HALF_OPS)
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_backend_half_precision(device, backend, name, dtype, gen, seed):
    """No worse than 2x PyTorch's own error (the ``torch`` backend on the same half inputs) against the
    float64 reference of those inputs, plus ``half_atol``; the same output dtype as PyTorch's."""
    make, build = OP_CASES[name]
    inputs = [x.to(device=device, dtype=dtype) for x in build(gen)]
    # loss-scaled cotangents, as in mixed-precision training, keep half gradients out of the subnormals
    outs, grads = forward_backward(make(backend), inputs, seed, scale=1e4)
    torch_outs, torch_grads = forward_backward(make("torch"), inputs, seed, scale=1e4)
    ref_outs, ref_grads = forward_backward(make("torch"), [x.double() for x in inputs], seed, scale=1e4)
    for i, (out, torch_out, ref) in enumerate(zip(outs + list(grads), torch_outs + list(torch_grads),
                                                  ref_outs + list(ref_grads))):
        assert (out is None) == (ref is None)
        if out is not None:
            atol = interpreter_atol(dtype, device, backend, half_atol(name, dtype, scalar=out.dim() == 0))
            assert_close_in_low_precision(out, torch_out, ref, k=2.0, atol=atol, msg=f"{name} {dtype} on {backend}, output {i}")


@pytest.mark.parametrize("device,backend", [c for c in BACKEND_CASES if c[1] == "cpp"])
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_cpp_float64_gradcheck(device, backend, name, gen, seed):
    make, build = OP_CASES[name]
    assert_gradcheck(make(backend), build(gen), seed)


# Batch sizes N: the minimum, many and (not under the slow Triton interpreter) a few hundred.
MANY_CASES = [(d, b, n) for d, b in BACKEND_CASES for n in (3, 64, 300) if not (b == "triton" and d == "cpu" and n > 64)]


@pytest.mark.parametrize("device,backend,n", MANY_CASES)
def test_pairwise_many_samples(device, backend, n, gen):
    s, a = (torch.randn((n, 2, 4, 4), generator=gen, dtype=torch.float64) for _ in range(2))
    for op in (ops.pairwise_similarity_kl, ops.hf_pairwise_similarity_kl):
        ref = op(s, a, backend="torch")
        out = op(s.float().to(device), a.float().to(device), backend=backend)
        assert rel_err(out, ref) <= 1e-5, f"{op.__name__} N={n} on {backend}"


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [("cpu", "torch")])
@pytest.mark.slow
def test_torch_compile_fullgraph(device, backend, gen, seed):
    """fullgraph=True fails on any graph break; aot_eager runs the fake impls and the autograd formulas."""
    s, a = (torch.randn((4, 3, 8, 8), generator=gen).to(device) for _ in range(2))

    def loss(s, a):
        return (
            ops.hf_pairwise_similarity_kl(s, a, backend=backend)
            + ops.pairwise_similarity_kl(s, a, backend=backend)
            + ops.hf_mse(a, s, backend=backend)
        )

    (eager_out,), eager_grads = forward_backward(loss, [s, a], seed)
    (out,), grads = forward_backward(torch.compile(loss, fullgraph=True, backend="aot_eager"), [s, a], seed)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], eager_grads[1], rtol=1e-5, atol=1e-7)


class RecordOps(TorchDispatchMode):
    """The names of the ops dispatched while active."""

    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "hfmse-weights"])
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_domainstudio_loss_reads_each_batch_once(device, backend, weighted, gen):
    """With every term on, the loss reads each batch once forward (one domainstudio_grams per batch; on the
    Triton backend one domainstudio_pair_grams for both) and the adapted batch once backward; per-sample
    hf-MSE weights change none of that."""
    s, a, r = (torch.randn(IMAGE, generator=gen).to(device) for _ in range(3))
    a.requires_grad_()
    weights = torch.rand(IMAGE[0], generator=gen).to(device) if weighted else None
    with RecordOps() as forward:
        total = ops.domainstudio_loss(s, a, r, backend=backend, hfmse_weights=weights).total
    with RecordOps() as backward:
        total.backward()
    # the N x N tail (its own op on the Triton backend) never reads a batch
    kernels = [n for n in forward.names + backward.names
               if n.startswith("dsfast") and "similarity_kl" not in n and "domainstudio_terms" not in n]
    if backend == "triton":
        assert kernels == ["dsfast_triton.domainstudio_pair_grams.default",
                           "dsfast_triton.domainstudio_grams_backward.default"]
    else:
        assert kernels == ["dsfast.domainstudio_grams.default"] * 2 + ["dsfast.domainstudio_grams_backward.default"]


@pytest.mark.slow  # an inductor compile: ~30 s on two cores
def test_torch_compile_inductor_domainstudio_loss(gen):
    import dsfast

    s, a, x0 = (torch.randn((4, 3, 8, 8), generator=gen) for _ in range(3))
    module = dsfast.DomainStudioLoss()
    compiled = torch.compile(lambda s, a, x0: module(s, a, x0).total, fullgraph=True)
    torch.testing.assert_close(compiled(s, a, x0), module(s, a, x0).total, rtol=1e-5, atol=1e-6)


# 3x1024x1024 per sample: too slow for the Triton interpreter.
LARGE_CASES = [(d, b) for d, b in BACKEND_CASES if not (b == "triton" and d == "cpu")]


@pytest.mark.parametrize("device,backend", LARGE_CASES)
def test_pairwise_large_samples(device, backend, gen, seed):
    """3x1024x1024 per sample: near-orthogonal random samples make the loss sensitive to Gram rounding."""
    s, a = (torch.randn((3, 3, 1024, 1024), generator=gen, dtype=torch.float64) for _ in range(2))
    for op in (ops.pairwise_similarity_kl, ops.hf_pairwise_similarity_kl):
        outs, grads = forward_backward(lambda s, a, op=op: op(s, a, backend=backend), [s.float().to(device), a.float().to(device)], seed)
        ref_outs, ref_grads = forward_backward(lambda s, a, op=op: op(s, a, backend="torch"), [s, a], seed)
        assert rel_err(outs[0], ref_outs[0]) <= 1e-5, f"{op.__name__} on {backend}"
        assert rel_err(grads[1], ref_grads[1]) <= 1e-5, f"{op.__name__} grad on {backend}"


TRITON_CASES = [(d, b) for d, b in BACKEND_CASES if b == "triton"]
ONE_PASS_OPTIONS = {
    # the defaults, and the gradient of the total only (the other terms' gradients are never materialised)
    "total": (dict(), True),
    # every term's cotangent, the source differentiated too, anchors as row weights, another reduction
    "terms": (dict(detach_source=False, anchors=torch.tensor([2, 0, 2]), reduction="sum", tau=0.7,
                   direction="adapted||source", lambda_img=0.5), False),
}


@pytest.mark.parametrize("options", ONE_PASS_OPTIONS)
@pytest.mark.parametrize("n", [17, *(pytest.param(n, marks=pytest.mark.slow) for n in (3, 5, 16, 24, 32, 64))])
@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_domainstudio_loss_one_pass(device, backend, n, options, seed, gen):
    """The Triton backend's whole loss (both batches' Grams in one launch, the tail in one; backward the
    tail and the batches' gradients) against the float64 reference, forward and backward, outputs
    NaN-poisoned: the four terms and the gradients, masked rows (N < 16, N = 17) and two Gram tiles (N > 32)."""
    kwargs, total_only = ONE_PASS_OPTIONS[options]
    s, a, r = (torch.randn((n, 2, 4, 6), generator=gen, dtype=torch.float64) for _ in range(3))

    def loss(backend):
        def fn(s, a):
            terms = ops.domainstudio_loss(s, a, r.to(s.device), backend=backend, **kwargs)
            return terms.total if total_only else terms
        return fn

    outs, grads = forward_backward(loss(backend), [s.to(device), a.to(device)], seed)
    ref_outs, ref_grads = forward_backward(loss("torch"), [s, a], seed)
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == ref.dtype and rel_err(out, ref) <= 1e-10
    for grad, ref in zip(grads, ref_grads):
        assert (grad is None) == (ref is None)
        if ref is not None:
            assert rel_err(grad, ref) <= 1e-10


# -- per-sample hf-MSE weights (domainstudio_loss(..., hfmse_weights=w)) -------------------------
# hf_mse = (1/N) Σ_i w_i mean((hf(adapted_i) - hf(real_i))²): on the fused kernels (cpp, triton) w scales each
# sample's hf-MSE sum forward and its rows' gradient backward, in the same one pass; the torch backend (and any
# call where w or real needs a gradient) composes the separate ops.
ALL_BACKENDS = BACKEND_CASES + [("cpu", "torch")]


def random_weights(n, gen, dtype=torch.float64):
    """Non-negative per-sample weights, about a third of them zero (the first always), some above 1."""
    w = 3 * torch.rand(n, generator=gen, dtype=torch.float64) * (torch.rand(n, generator=gen) > 0.3)
    w[0] = 0.0
    return w.to(dtype)


def reference_loss(s, a, r, w, *, lambda_img=4.0, lambda_hf=4.0, lambda_hfmse=1.0, **options):
    """The four terms from dsfast.reference alone (``options``: tau, direction, reduction, anchors, detach_source)."""
    image = reference.pairwise_similarity_kl(s, a, **options)
    high = reference.hf_pairwise_similarity_kl(s, a, **options)
    mse = reference.hf_mse(a, r, weights=w)
    return lambda_img * image + lambda_hf * high + lambda_hfmse * mse, image, high, mse


def test_reference_weighted_hf_mse(gen, seed):
    """The reference's weights: the per-sample formula, ones = unweighted, and gradcheck (adapted, target, weights)."""
    a, t = (torch.randn((5, 2, 4, 6), generator=gen, dtype=torch.float64) for _ in range(2))
    w = random_weights(5, gen)
    d = reference.high_frequency(a) - reference.high_frequency(t)
    per_sample = torch.stack([d[i].pow(2).mean() for i in range(5)])
    torch.testing.assert_close(reference.hf_mse(a, t, weights=w), (w * per_sample).sum() / 5, rtol=1e-14, atol=0)
    torch.testing.assert_close(reference.hf_mse(a, t, weights=torch.ones(5, dtype=torch.float64)),
                               reference.hf_mse(a, t), rtol=1e-14, atol=0)
    inputs = (a.requires_grad_(), t.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, t, w: reference.hf_mse(a, t, weights=w), inputs)


WEIGHTED_OPTIONS = {
    "defaults": dict(),
    # the source differentiated too (its gradient has no hf-MSE part), anchors, another reduction and direction
    "source-grad": dict(detach_source=False, anchors=torch.tensor([2, 0, 1]), reduction="sum", tau=0.7,
                        direction="adapted||source", lambda_img=0.5),
}


@pytest.mark.parametrize("options", WEIGHTED_OPTIONS)
@pytest.mark.parametrize("n", [3, 5, 17])
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_domainstudio_loss_hfmse_weights(device, backend, n, options, seed, gen):
    """Weighted loss on every backend against dsfast.reference in float64: the four terms and the gradients of
    source and adapted for random cotangents of all four, fresh random inputs and weights (with zeros),
    outputs NaN-poisoned (conftest); N = 3, 5 and 17 (masked rows of a 32-row Gram tile)."""
    kwargs = WEIGHTED_OPTIONS[options]
    s, a, r = (torch.randn((n, 2, 4, 6), generator=gen, dtype=torch.float64) for _ in range(3))
    w = random_weights(n, gen)
    outs, grads = forward_backward(
        lambda s, a: ops.domainstudio_loss(s, a, r.to(device), backend=backend, hfmse_weights=w.to(device), **kwargs),
        [s.to(device), a.to(device)], seed)
    ref_options = {k: v for k, v in kwargs.items() if not k.startswith("lambda")}
    lambdas = {k: v for k, v in kwargs.items() if k.startswith("lambda")}
    ref_outs, ref_grads = forward_backward(lambda s, a: reference_loss(s, a, r, w, **lambdas, **ref_options), [s, a],
                                           seed)
    names = ("total", "image", "high_frequency", "hf_mse")
    for name, out, ref in zip(names, outs, ref_outs):
        assert out.dtype == torch.float64 and rel_err(out, ref) <= 1e-10, f"{name} on {backend}: {rel_err(out, ref):.2e}"
    for name, grad, ref in zip(("source", "adapted"), grads, ref_grads):
        assert (grad is None) == (ref is None), name
        if ref is not None:
            assert rel_err(grad, ref) <= 1e-10, f"grad {name} on {backend}: {rel_err(grad, ref):.2e}"
    # the weights matter: the unweighted hf-MSE differs
    assert rel_err(reference.hf_mse(a, r), ref_outs[3]) > 1e-3


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_domainstudio_loss_hfmse_weights_float32(device, backend, gen, seed):
    """float32 inputs with float32 weights (what a trainer passes): float32 terms within 1e-5 of the reference."""
    n = 17
    s, a, r = (torch.randn((n, 3, 8, 12), generator=gen, dtype=torch.float64) for _ in range(3))
    w = random_weights(n, gen)
    outs, grads = forward_backward(
        lambda s, a: ops.domainstudio_loss(s, a, r.float().to(device), backend=backend,
                                           hfmse_weights=w.float().to(device)),
        [s.float().to(device), a.float().to(device)], seed)
    ref_outs, ref_grads = forward_backward(lambda s, a: reference_loss(s, a, r, w), [s, a], seed)
    for out, ref in zip(outs, ref_outs):
        assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5
    assert grads[0] is None and rel_err(grads[1], ref_grads[1]) <= 1e-5


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_domainstudio_loss_hfmse_weights_none_is_ones(device, backend, gen, seed):
    """``hfmse_weights=None`` is all ones: bit for bit on the fused kernels (a product by 1 is exact), forward
    and backward; to rounding on the torch backend (there the weighted mean is another reduction order)."""
    n = 17
    s, a, r = (torch.randn((n, 2, 4, 6), generator=gen).to(device) for _ in range(3))
    weighted = forward_backward(
        lambda s, a: ops.domainstudio_loss(s, a, r, backend=backend, hfmse_weights=torch.ones(n, device=device),
                                           detach_source=False), [s, a], seed)
    plain = forward_backward(lambda s, a: ops.domainstudio_loss(s, a, r, backend=backend, detach_source=False),
                             [s, a], seed)
    for x, y in zip(flatten(weighted), flatten(plain)):
        if backend == "torch":
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
        else:
            assert torch.equal(x, y), f"{backend}: weights of one changed the bits"


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_domainstudio_loss_hfmse_weights_gradient(device, backend, gen, seed):
    """Weights that require grad (and a real batch that does): the separate ops, whose gradients in w and real
    match the reference's."""
    n = 5
    s, a, r = (torch.randn((n, 2, 4, 6), generator=gen, dtype=torch.float64) for _ in range(3))
    w = random_weights(n, gen)
    outs, grads = forward_backward(
        lambda a, r, w: ops.domainstudio_loss(s.to(device), a, r, backend=backend, hfmse_weights=w),
        [a.to(device), r.to(device), w.to(device)], seed)
    ref_outs, ref_grads = forward_backward(lambda a, r, w: reference_loss(s, a, r, w), [a, r, w], seed)
    for out, ref in zip(list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
        assert rel_err(out, ref) <= 1e-10


def test_domainstudio_loss_module_hfmse_weights(gen):
    import dsfast

    s, a, r = (torch.randn((5, 2, 4, 6), generator=gen) for _ in range(3))
    w = random_weights(5, gen, torch.float32)
    out = dsfast.DomainStudioLoss(backend="torch")(s, a, r, hfmse_weights=w)
    torch.testing.assert_close(out.hf_mse, ops.domainstudio_loss(s, a, r, backend="torch", hfmse_weights=w).hf_mse)
    torch.testing.assert_close(out.hf_mse, reference.hf_mse(a, r, weights=w))


BAD_WEIGHTS = {
    # name: (weights for N = 5, error, message)
    "list": (lambda: [1.0] * 5, TypeError, "must be a torch.Tensor"),
    "integer": (lambda: torch.ones(5, dtype=torch.int64), TypeError, "floating-point"),
    "short": (lambda: torch.ones(4), ValueError, r"shape \(N,\) = \(5,\)"),
    "2-D": (lambda: torch.ones(5, 1), ValueError, r"shape \(N,\) = \(5,\)"),
    "device": (lambda: torch.ones(5, device="meta"), ValueError, "device of the inputs"),
    "nan": (lambda: torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]), ValueError, "NaN or Inf"),
    "inf": (lambda: torch.tensor([1.0, 1.0, float("inf"), 1.0, 1.0]), ValueError, "NaN or Inf"),
    "negative": (lambda: torch.tensor([1.0, 1.0, 1.0, -0.5, 1.0]), ValueError, "non-negative"),
}


@pytest.mark.parametrize("bad", BAD_WEIGHTS)
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_domainstudio_loss_bad_hfmse_weights(device, backend, bad, gen):
    """Each bad ``hfmse_weights`` is one clear error, raised before any kernel runs (no dsfast op dispatched)."""
    make, error, message = BAD_WEIGHTS[bad]
    s, a, r = (torch.randn((5, 2, 4, 6), generator=gen).to(device) for _ in range(3))
    weights = make()
    if isinstance(weights, torch.Tensor) and weights.device.type != "meta":
        weights = weights.to(device)
    with RecordOps() as recorded, pytest.raises(error, match=message):
        ops.domainstudio_loss(s, a, r, backend=backend, hfmse_weights=weights)
    assert not [n for n in recorded.names if n.startswith("dsfast")], recorded.names


@pytest.mark.parametrize("device,backend", [c for c in ALL_BACKENDS if c[0] == "cpu"])
def test_domainstudio_loss_hfmse_weights_values_follow_check_finite(device, backend, gen):
    """The value checks (finite, non-negative) follow ``check_finite``, as the inputs' finite check: False skips
    them (the GPU default: no device->host sync), True always runs them."""
    s, a, r = (torch.randn((5, 2, 4, 6), generator=gen) for _ in range(3))
    negative = torch.tensor([1.0, 1.0, 1.0, -0.5, 1.0])
    out = ops.domainstudio_loss(s, a, r, backend=backend, hfmse_weights=negative, check_finite=False)
    torch.testing.assert_close(out.hf_mse.double(), reference.hf_mse(a.double(), r.double(), weights=negative.double()))
    with pytest.raises(ValueError, match="non-negative"):
        ops.domainstudio_loss(s, a, r, backend=backend, hfmse_weights=negative, check_finite=True)
