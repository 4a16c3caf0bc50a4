"""Mixed floating dtypes: an op with several tensor inputs promotes them as PyTorch does.

Each multi-input op (and ``DomainStudioLoss``), on every backend, takes inputs of two floating dtypes
and must equal the float64 reference of the same values; its outputs have the promoted dtype
(``torch.promote_types``), each gradient its own input's dtype. Compiled backends' outputs are
NaN-poisoned before the kernels write them (``DSFAST_POISON_OUTPUTS=1``, set in conftest).
"""
import pytest
import torch
from torch import nn

import dsfast
from dsfast import ops
from tests.conftest import BACKEND_CASES
from tests.test_ops import OP_CASES, forward_backward, images, rel_err

BACKENDS = [("cpu", "torch")] + BACKEND_CASES
DTYPE_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float64)]


def domainstudio_terms(out):
    return out.total, out.image, out.high_frequency, out.hf_mse


# name -> (callable taking the backend, input builder). `real` detached: the one-pass path of the compiled
# backends (a `real` needing a gradient takes the separate ops: the "composed" case).
MIXED_CASES = {
    "haar_idwt2": OP_CASES["haar_idwt2"],
    "haar_waverec2": OP_CASES["haar_waverec2"],
    "hf_mse": OP_CASES["hf_mse"],
    "pairwise_similarity_kl": (
        lambda b: lambda s, a: ops.pairwise_similarity_kl(s, a, detach_source=False, backend=b), images(2)),
    "hf_pairwise_similarity_kl": (
        lambda b: lambda s, a: ops.hf_pairwise_similarity_kl(s, a, detach_source=False, backend=b), images(2)),
    "domainstudio_loss": (lambda b: lambda s, a, r: ops.domainstudio_loss(s, a, r.detach(), backend=b), images(3)),
    "domainstudio_loss[composed]": (
        lambda b: lambda s, a, r: ops.domainstudio_loss(s, a, r, detach_source=False, backend=b), images(3)),
    "DomainStudioLoss": (
        lambda b: lambda s, a, r: domainstudio_terms(dsfast.DomainStudioLoss(backend=b)(s, a, r.detach())),
        images(3)),
}
# Relative error allowed in the promoted compute dtype (test_ops allows 1e-5 for float32).
COMPUTE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("low_first", [True, pytest.param(False, marks=pytest.mark.slow)],  # fast set: one order
                         ids=["low-first", "low-second"])
@pytest.mark.parametrize("low,high", DTYPE_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", sorted(MIXED_CASES))
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_mixed_dtypes_match_reference(device, backend, name, low, high, low_first, gen, seed):
    """Inputs alternate between the two dtypes (``low_first``: the 1st, 3rd, ... input is the low one;
    for DomainStudio that is (low source, high adapted, low real), else (high source, low adapted, high real))."""
    make, build = MIXED_CASES[name]
    inputs = [x.to(device=device, dtype=low if (i % 2 == 0) == low_first else high) for i, x in enumerate(build(gen))]
    # loss-scaled cotangents, as in mixed-precision training, keep half gradients out of the subnormals
    outs, grads = forward_backward(make(backend), inputs, seed, scale=1e4)
    # the truth: the float64 reference of the same (upcast) values
    ref_outs, ref_grads = forward_backward(make("torch"), [x.double() for x in inputs], seed, scale=1e4)
    rtol = COMPUTE_RTOL[high]
    assert len(outs) == len(ref_outs)
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert out.dtype == high, f"{name} output {i} on {backend}: dtype {out.dtype}, expected {high}"
        assert torch.isfinite(out).all(), f"{name} output {i} on {backend}: non-finite (unwritten) elements"
        assert rel_err(out, ref) <= rtol, f"{name} output {i} on {backend}: {rel_err(out, ref):.2e}"
    for i, (x, grad, ref) in enumerate(zip(inputs, grads, ref_grads)):
        assert (grad is None) == (ref is None), f"{name} gradient {i} on {backend}"
        if grad is not None:
            assert grad.dtype == x.dtype, f"{name} gradient {i} on {backend}: dtype {grad.dtype}, expected {x.dtype}"
            assert torch.isfinite(grad).all(), f"{name} gradient {i} on {backend}: non-finite elements"
            # computed in the promoted dtype, then rounded once to the input's dtype
            bound = rtol + torch.finfo(x.dtype).eps / 2
            assert rel_err(grad, ref) <= bound, f"{name} gradient {i} on {backend}: {rel_err(grad, ref):.2e}"


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_domainstudio_loss_under_autocast(device, backend, gen):
    """bfloat16 x̂0 predictions of a model under autocast with float32 real images, as in mixed-precision training."""
    source_model, adapted_model = (nn.Conv2d(3, 3, 3, padding=1).to(device) for _ in range(2))
    x_t, real = (torch.randn((4, 3, 8, 8), generator=gen).to(device) for _ in range(2))
    loss_fn = dsfast.DomainStudioLoss(backend=backend)
    with torch.autocast(device, dtype=torch.bfloat16):
        with torch.no_grad():
            source = source_model(x_t)
        adapted = adapted_model(x_t)
        assert (source.dtype, adapted.dtype, real.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
        out = loss_fn(source, adapted, real)
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    out.total.backward()
    grads = [p.grad for p in adapted_model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
