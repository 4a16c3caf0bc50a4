"""What is compared: the benchmarked ops, their inputs, and the providers that implement each op.

A *provider* turns the canonical inputs of an op into a zero-argument ``call`` (one forward) plus the
leaf tensors it differentiates with respect to (``None`` when it has no autograd, e.g. pywt). Anything a
provider needs to convert (numpy arrays, another library's coefficient layout) is converted in
:func:`build`, outside the timed region.

Providers
---------
``reference``          the eager plain-PyTorch reference (:mod:`dsfast.reference`): the speed-up baseline.
``official``           the official DomainStudio/CDC code form (``reference.official_high_frequency``: three
                       stride-2 convolutions; ``reference.official_pairwise_similarity_kl``: the Python double
                       loop of CosineSimilarity calls). Pairwise ops only for N <= ``OFFICIAL_MAX_N``.
``compile``            ``torch.compile(reference)`` (default options; one compiled function per op, so
                       shapes after the first recompile with automatic dynamic shapes). Compile time is in
                       the row's ``warmup_s``, never in the timings.
``pywt``               PyWavelets on numpy arrays (CPU, float32/64, forward only; DWT ops only).
``pytorch_wavelets``   ``DWTForward``/``DWTInverse`` (``mode='zero'``: equal to pywt for even sizes with Haar);
                       also its band sum as a high-frequency map.
``ptwt``               ``ptwt.wavedec2``/``waverec2`` (``mode='zero'``).
``dsfast-<backend>``   the public ``dsfast.ops`` API with ``backend=<backend>`` for every available backend
                       (``dsfast-torch`` is the reference behind dsfast's dispatch and float64 N x N KL).
``dsfast-cpp-baseline`` ``dsfast-cpp`` with the baseline (SSE2) copy of the C++ CPU loops forced for the
                       whole measurement (``DSFAST_CPU_ISA=baseline``; csrc/cpu/isa.h), where the CPU
                       runs a wider one: what the run-time ISA dispatch gains, in the same run.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsfast import reference

# The official double loop launches O(N^2) tiny kernels, and its backward materialises a full-size
# gradient buffer per pair (select/reshape backward): O(N^2) x (bytes of one batch) of memory traffic.
# Slow by design, so only small batches and a cap on that traffic (CPU ~1 GiB: seconds per call).
OFFICIAL_MAX_N = 16
OFFICIAL_MAX_WORK = {"cpu": int(0.8 * 2**30), "cuda": 64 * 2**30}

# DomainStudio's official weights (lambda_img, lambda_hf, lambda_hfmse).
LAMBDAS = (4.0, 4.0, 1.0)


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple[str, ...]  # canonical input names (see make_inputs)
    levels: int = 0  # Haar levels for the DWT ops
    pairwise: bool = False  # has an O(N^2) official form
    # Ideal bytes moved, as multiples of one input tensor's bytes E: each input read once and each
    # output written once per pass (fwd+bwd = fwd + bwd). Used for GB/s and % of copy bandwidth.
    fwd_bytes: float = 2.0
    bwd_bytes: float = 2.0
    doc: str = ""


OPS: dict[str, OpSpec] = {
    s.name: s
    for s in (
        OpSpec("haar_dwt2", ("x",), levels=1, doc="one-level Haar DWT (LL, H, V, D)"),
        OpSpec("haar_wavedec2_l3", ("x",), levels=3, doc="three-level Haar DWT"),
        OpSpec("haar_idwt2", ("coeffs1",), levels=1, doc="one-level inverse Haar DWT"),
        OpSpec("haar_waverec2_l3", ("coeffs3",), levels=3, doc="three-level inverse Haar DWT"),
        OpSpec("high_frequency", ("x",), fwd_bytes=1.25, bwd_bytes=1.25, doc="hf map (N, C, H/2, W/2)"),
        OpSpec("pairwise_similarity_kl", ("source", "adapted"), pairwise=True, fwd_bytes=2, bwd_bytes=2,
               doc="image-level pairwise-similarity KL"),
        OpSpec("hf_pairwise_similarity_kl", ("source", "adapted"), pairwise=True, fwd_bytes=2, bwd_bytes=2,
               doc="pairwise-similarity KL of the hf maps (fused in dsfast)"),
        OpSpec("hf_mse", ("adapted", "target"), fwd_bytes=2, bwd_bytes=3, doc="mean((hf(a) - hf(t))^2)"),
        OpSpec("domainstudio_loss", ("source", "adapted", "real"), pairwise=True, fwd_bytes=3, bwd_bytes=3,
               doc="DomainStudioLoss: 4*KL_img + 4*KL_hf + 1*hfMSE"),
    )
}

# Which canonical inputs get gradients (the source branch never does; targets/real images never do).
GRAD_INPUTS = {"x", "coeffs1", "coeffs3", "adapted"}


class Inputs(dict):
    """The canonical inputs; the DWT coefficients of the inverse ops are computed on first use."""

    def __missing__(self, key):
        levels = {"coeffs1": 1, "coeffs3": 3}.get(key)
        if levels is None:
            raise KeyError(key)
        with torch.no_grad():
            self[key] = _detach_coeffs(reference.haar_wavedec2(self["adapted"], levels))
        return self[key]


def make_inputs(n: int, c: int, h: int, w: int, dtype: torch.dtype, device, seed: int = 0) -> Inputs:
    """The canonical inputs of every op for one (N, C, H, W, dtype): plain detached tensors, drawn on
    ``device`` (a GPU row of several GiB would take seconds to draw on the CPU)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand():
        return torch.randn(n, c, h, w, generator=gen, dtype=torch.float32, device=device).to(dtype)

    source = rand()
    adapted = source + 0.5 * rand()  # correlated, as a fine-tuned model's predictions
    target = rand()
    return Inputs(source=source, adapted=adapted, target=target, real=target, x=adapted)


def _detach_coeffs(coeffs):
    return [coeffs[0].detach().contiguous()] + [tuple(b.detach().contiguous() for b in d) for d in coeffs[1:]]


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)  # a new leaf sharing the storage (no copy)


def _coeff_leaves(coeffs):
    ll = _leaf(coeffs[0], True)
    details = [tuple(_leaf(b, True) for b in d) for d in coeffs[1:]]
    return [ll] + details, [ll] + [b for d in details for b in d]


class Unsupported(Exception):
    """This provider does not implement this op / dtype / device / size (recorded as a skip)."""


# -- the reference forms of every op (also what torch.compile compiles) -------------------------
def _ref_domainstudio(source, adapted, real):
    li, lh, lm = LAMBDAS
    return (li * reference.pairwise_similarity_kl(source, adapted)
            + lh * reference.hf_pairwise_similarity_kl(source, adapted)
            + lm * reference.hf_mse(adapted, real))


REFERENCE_FNS = {
    "haar_dwt2": reference.haar_dwt2,
    "haar_wavedec2_l3": lambda x: reference.haar_wavedec2(x, 3),
    "haar_idwt2": reference.haar_waverec2,
    "haar_waverec2_l3": reference.haar_waverec2,
    "high_frequency": reference.high_frequency,
    "pairwise_similarity_kl": reference.pairwise_similarity_kl,
    "hf_pairwise_similarity_kl": reference.hf_pairwise_similarity_kl,
    "hf_mse": reference.hf_mse,
    "domainstudio_loss": _ref_domainstudio,
}


# -- the official code's forms ------------------------------------------------------------------
def _official_hf_pairwise(source, adapted):
    return reference.official_pairwise_similarity_kl(
        reference.official_high_frequency(source), reference.official_high_frequency(adapted))


def _official_hf_mse(adapted, target):
    return F.mse_loss(reference.official_high_frequency(adapted), reference.official_high_frequency(target))


def _official_domainstudio(source, adapted, real):
    li, lh, lm = LAMBDAS
    return (li * reference.official_pairwise_similarity_kl(source, adapted)
            + lh * _official_hf_pairwise(source, adapted)
            + lm * _official_hf_mse(adapted, real))


OFFICIAL_FNS = {
    "high_frequency": reference.official_high_frequency,
    "pairwise_similarity_kl": reference.official_pairwise_similarity_kl,
    "hf_pairwise_similarity_kl": _official_hf_pairwise,
    "hf_mse": _official_hf_mse,
    "domainstudio_loss": _official_domainstudio,
}


@functools.cache
def _compiled(op: str):
    return torch.compile(REFERENCE_FNS[op])


def configure_compile() -> None:
    """Let the sweep's many shapes recompile instead of silently falling back to eager."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 4096


# -- dsfast -------------------------------------------------------------------------------------
def _dsfast_fn(op: str, backend: str):
    from dsfast import ops
    from dsfast.losses import DomainStudioLoss

    fns = {
        "haar_dwt2": lambda x: ops.haar_dwt2(x, backend=backend),
        "haar_wavedec2_l3": lambda x: ops.haar_wavedec2(x, 3, backend=backend),
        "haar_idwt2": lambda c: ops.haar_waverec2(c, backend=backend),
        "haar_waverec2_l3": lambda c: ops.haar_waverec2(c, backend=backend),
        "high_frequency": lambda x: ops.high_frequency(x, backend=backend),
        "pairwise_similarity_kl": lambda s, a: ops.pairwise_similarity_kl(s, a, backend=backend),
        "hf_pairwise_similarity_kl": lambda s, a: ops.hf_pairwise_similarity_kl(s, a, backend=backend),
        "hf_mse": lambda a, t: ops.hf_mse(a, t, backend=backend),
    }
    if op == "domainstudio_loss":
        li, lh, lm = LAMBDAS
        loss = DomainStudioLoss(lambda_img=li, lambda_hf=lh, lambda_hfmse=lm, backend=backend)
        return lambda s, a, r: loss(s, a, r).total
    return fns[op]


# -- wavelet libraries --------------------------------------------------------------------------
def _pywt_call(op: str, inputs: dict):
    import numpy as np
    import pywt

    if inputs["x"].dtype not in (torch.float32, torch.float64):
        raise Unsupported("numpy has no bfloat16/float16 path in pywt")
    if op in ("haar_dwt2", "haar_wavedec2_l3"):
        arr = inputs["x"].cpu().numpy()
        level = OPS[op].levels
        if level == 1:
            return lambda: pywt.dwt2(arr, "haar", axes=(-2, -1))
        return lambda: pywt.wavedec2(arr, "haar", level=level, axes=(-2, -1))
    if op in ("haar_idwt2", "haar_waverec2_l3"):
        coeffs = inputs["coeffs1" if op == "haar_idwt2" else "coeffs3"]
        arrs = [coeffs[0].cpu().numpy()] + [tuple(np.ascontiguousarray(b.cpu().numpy()) for b in d) for d in coeffs[1:]]
        if op == "haar_idwt2":
            return lambda: pywt.idwt2((arrs[0], arrs[1]), "haar", axes=(-2, -1))
        return lambda: pywt.waverec2(arrs, "haar", axes=(-2, -1))
    raise Unsupported(f"pywt has no {op}")


def _pytorch_wavelets_build(op: str, inputs: dict, dtype, device):
    from pytorch_wavelets import DWTForward, DWTInverse

    if op in ("haar_dwt2", "haar_wavedec2_l3", "high_frequency"):
        level = 1 if op == "high_frequency" else OPS[op].levels
        mod = DWTForward(J=level, wave="haar", mode="zero").to(device=device, dtype=dtype)
        x = _leaf(inputs["x"], True)
        if op == "high_frequency":  # its three detail bands summed (pywt-type stencil: same cost)
            return (lambda: mod(x)[1][0].sum(2)), [x]
        return (lambda: mod(x)), [x]
    if op in ("haar_idwt2", "haar_waverec2_l3"):
        coeffs = inputs["coeffs1" if op == "haar_idwt2" else "coeffs3"]
        mod = DWTInverse(wave="haar", mode="zero").to(device=device, dtype=dtype)
        yl = _leaf(coeffs[0], True)
        # pytorch_wavelets: finest level first, bands stacked as (N, C, 3, h, w).
        yh = [_leaf(torch.stack(d, dim=2), True) for d in reversed(coeffs[1:])]
        return (lambda: mod((yl, yh))), [yl, *yh]
    raise Unsupported(f"pytorch_wavelets has no {op}")


def _ptwt_build(op: str, inputs: dict):
    import ptwt

    if op in ("haar_dwt2", "haar_wavedec2_l3"):
        x = _leaf(inputs["x"], True)
        level = OPS[op].levels
        return (lambda: ptwt.wavedec2(x, "haar", mode="zero", level=level)), [x]
    if op in ("haar_idwt2", "haar_waverec2_l3"):
        coeffs, leaves = _coeff_leaves(inputs["coeffs1" if op == "haar_idwt2" else "coeffs3"])
        return (lambda: ptwt.waverec2(coeffs, "haar")), leaves
    raise Unsupported(f"ptwt has no {op}")


# -- the registry -------------------------------------------------------------------------------
def providers_for(device: torch.device) -> list[str]:
    """Every provider that can run on ``device``, the reference first (it is the speed-up baseline)."""
    from dsfast.ops import available_backends

    names = ["reference", "official", "compile"]
    if device.type == "cpu":
        names.append("pywt")
    names += ["pytorch_wavelets", "ptwt"]
    # peers that are not installed (a GPU machine without a package index) are left out, not errors
    names = [p for p in names if p not in ("pywt", "pytorch_wavelets", "ptwt") or importlib.util.find_spec(p)]
    for b in available_backends(device):
        if device.type == "cpu" and b == "triton":
            continue  # the Triton interpreter is a test tool, not a CPU backend
        names.append(f"dsfast-{b}")
    if "dsfast-cpp" in names and device.type == "cpu":
        from dsfast._extension import cpu_isa

        if cpu_isa() != "baseline":
            names.append(BASELINE_ISA)
    return names


BASELINE_ISA = "dsfast-cpp-baseline"


@contextlib.contextmanager
def isa_for(provider: str):
    """The C++ CPU loops ``provider`` measures: the baseline copy for ``dsfast-cpp-baseline`` (restored
    after), the active (best) one for every other provider."""
    if provider != BASELINE_ISA:
        yield
        return
    set_isa = torch.ops.dsfast._set_cpu_isa
    before = set_isa("baseline")
    try:
        yield
    finally:
        set_isa(before)


def official_work(op: str, n: int, tensor_bytes: int) -> int:
    """Bytes of per-pair gradient buffers the official double loop's backward writes (see OFFICIAL_MAX_WORK)."""
    if not OPS[op].pairwise:
        return 0
    if op == "hf_pairwise_similarity_kl":
        return n * n * tensor_bytes // 4  # on the hf maps (H/2 x W/2)
    return n * n * tensor_bytes  # the image-level KL (also inside domainstudio_loss)


def supports(provider: str, op: str, n: int, dtype: torch.dtype, device: torch.device,
             tensor_bytes: int | None = None) -> str | None:
    """``None`` when ``provider`` runs ``op`` for this case, else the reason it is skipped
    (``tensor_bytes``: bytes of one input batch, for the official loop's cost cap)."""
    spec = OPS[op]
    device = torch.device(device)
    if provider == "official":
        if op not in OFFICIAL_FNS:
            return "the official code has no standalone form of this op"
        if spec.pairwise and n > OFFICIAL_MAX_N:
            return f"official double loop restricted to N <= {OFFICIAL_MAX_N}"
        cap = OFFICIAL_MAX_WORK.get(device.type, OFFICIAL_MAX_WORK["cuda"])
        if tensor_bytes is not None and official_work(op, n, tensor_bytes) > cap:
            return f"official double loop: N^2 x batch bytes over {cap / 2**30:.1f} GiB"
    if provider == "pywt":
        if device.type != "cpu" or not op.startswith("haar_"):
            return "pywt: DWT ops on CPU only"
        if dtype not in (torch.float32, torch.float64):
            return "pywt: no bfloat16"
    if provider == "pytorch_wavelets" and not (op.startswith("haar_") or op == "high_frequency"):
        return "pytorch_wavelets: DWT ops only"
    if provider == "ptwt":
        if not op.startswith("haar_"):
            return "ptwt: DWT ops only"
        if dtype not in (torch.float32, torch.float64):
            return "ptwt: float32/float64 only"
    return None


def build(provider: str, op: str, inputs: dict):
    """``(call, leaves)``: ``call()`` runs one forward; ``leaves`` are the tensors it differentiates
    with respect to (``None``: no autograd). Raises :class:`Unsupported`."""
    x = inputs["x"]
    dtype, device = x.dtype, x.device
    reason = supports(provider, op, x.shape[0], dtype, device)  # (no work cap: the caller decided)
    if reason:
        raise Unsupported(reason)
    if provider == "pywt":
        return _pywt_call(op, inputs), None
    if provider == "pytorch_wavelets":
        return _pytorch_wavelets_build(op, inputs, dtype, device)
    if provider == "ptwt":
        return _ptwt_build(op, inputs)
    if provider == "reference":
        fn = REFERENCE_FNS[op]
    elif provider == "official":
        fn = OFFICIAL_FNS[op]
    elif provider == "compile":
        fn = _compiled(op)
    elif provider == BASELINE_ISA:
        fn = _dsfast_fn(op, "cpp")
    elif provider.startswith("dsfast-"):
        fn = _dsfast_fn(op, provider.removeprefix("dsfast-"))
    else:
        raise ValueError(f"unknown provider {provider!r}")

    names = OPS[op].inputs
    if names[0].startswith("coeffs"):
        coeffs, leaves = _coeff_leaves(inputs[names[0]])
        return (lambda: fn(coeffs)), leaves
    args = [_leaf(inputs[k], k in GRAD_INPUTS) for k in names]
    leaves = [a for k, a in zip(names, args) if k in GRAD_INPUTS]
    return (lambda: fn(*args)), leaves


def flatten_tensors(out) -> list[torch.Tensor]:
    """All tensors of a (nested) op output, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_tensors(o)]
    return []  # numpy arrays (pywt)
