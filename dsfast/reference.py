"""Plain-PyTorch reference of every dsfast op: readable, float64-capable, the ground truth.

Every backend (C++, Triton, CUDA) is tested against these functions. They assume valid
input; argument checking lives in :mod:`dsfast.ops.validate` so every backend rejects bad
input the same way.

Conventions follow ``pywt`` for the Haar transform and the official DomainStudio / CDC
code for the pairwise-similarity loss (the formulas are in the docstrings below).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Weights (a, b, c, d) of the 2x2 high-frequency stencil, block [[a, b], [c, d]].
# "domainstudio": LH + HL + HH of the official code (LH=-V, HL=-H, HH=D) -> (-a - b - c + 3d) / 2.
# "pywt":         H + V + D of pywt.dwt2                                  -> (3a - b - c - d) / 2.
STENCILS: dict[str, tuple[float, float, float, float]] = {
    "domainstudio": (-0.5, -0.5, -0.5, 1.5),
    "pywt": (1.5, -0.5, -0.5, -0.5),
}

# Clamp on each vector norm, as torch.nn.CosineSimilarity (eps=1e-8) does.
COSINE_EPS = 1e-8

DIRECTIONS = ("source||adapted", "adapted||source")
REDUCTIONS = ("mean", "batchmean", "sum")


def _blocks(x: torch.Tensor):
    """The four pixels of every 2x2 block: a (top-left), b (top-right), c, d (bottom)."""
    return x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]


def haar_dwt2(x: torch.Tensor):
    """One-level 2-D Haar DWT, equal to ``pywt.dwt2(x, 'haar')``: ``(LL, (H, V, D))``."""
    a, b, c, d = _blocks(x)
    ll = (a + b + c + d) / 2
    h = (a + b - c - d) / 2
    v = (a - b + c - d) / 2
    dd = (a - b - c + d) / 2
    return ll, (h, v, dd)


def haar_idwt2(ll: torch.Tensor, details) -> torch.Tensor:
    """Inverse of :func:`haar_dwt2`, equal to ``pywt.idwt2``."""
    h, v, d = details
    a = (ll + h + v + d) / 2
    b = (ll + h - v - d) / 2
    c = (ll - h + v - d) / 2
    dd = (ll - h - v + d) / 2
    top = torch.stack((a, b), dim=-1).flatten(-2)  # interleave columns
    bottom = torch.stack((c, dd), dim=-1).flatten(-2)
    return torch.stack((top, bottom), dim=-2).flatten(-3, -2)  # interleave rows


def haar_wavedec2(x: torch.Tensor, levels: int):
    """Multi-level DWT in ``pywt.wavedec2`` order: ``[LL_J, (H_J, V_J, D_J), ..., (H_1, V_1, D_1)]``."""
    coeffs = []
    ll = x
    for _ in range(levels):
        ll, details = haar_dwt2(ll)
        coeffs.append(details)
    return [ll] + coeffs[::-1]


def haar_waverec2(coeffs) -> torch.Tensor:
    """Inverse of :func:`haar_wavedec2`, equal to ``pywt.waverec2``."""
    ll = coeffs[0]
    for details in coeffs[1:]:
        ll = haar_idwt2(ll, details)
    return ll


def high_frequency(x: torch.Tensor, stencil: str = "domainstudio") -> torch.Tensor:
    """Sum of the three detail bands, ``(N, C, H/2, W/2)``: a fixed 2x2 stride-2 stencil."""
    wa, wb, wc, wd = STENCILS[stencil]
    a, b, c, d = _blocks(x)
    return wa * a + wb * b + wc * c + wd * d


def gram(x: torch.Tensor) -> torch.Tensor:
    """``X Xᵀ`` of the per-sample flattened batch as float32 (float64 for float64 x), accumulated in float64.

    A float32 matmul would follow torch's global TF32 switch (``torch.backends.cuda.matmul.allow_tf32``,
    ``set_float32_matmul_precision``; ~1e-3 relative on a GPU): the float64 product is immune, and its one
    rounding to float32 is the exact Gram to float32 precision.
    """
    flat = x.reshape(x.shape[0], -1).double()
    return (flat @ flat.T).to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def similarity_logits(g: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Cosine similarities from a Gram matrix with the diagonal removed: ``(N, N-1)``, divided by tau.

    Row i holds ``cos(x_i, x_j) / tau`` for ``j != i`` in increasing j, as the official double loop.
    """
    n = g.shape[0]
    norms = g.diagonal().clamp_min(0).sqrt().clamp_min(COSINE_EPS)
    cos = g / (norms[:, None] * norms[None, :])
    # Drop the diagonal by strides, not a boolean mask (which would wait for the device to count it):
    # after the first element, the flat N x N matrix is N-1 rows of N+1 whose last entry is diagonal.
    return cos.reshape(-1)[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1) / tau


def similarity_kl_from_gram(
    g_source: torch.Tensor,
    g_adapted: torch.Tensor,
    *,
    tau: float = 1.0,
    direction: str = "source||adapted",
    reduction: str = "mean",
    anchors: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL divergence between the row-wise softmaxes of the off-diagonal similarities.

    ``direction="source||adapted"`` is ``KLDivLoss()(log p_adapted, p_source)`` of the official code.
    ``anchors`` (row indices) restricts the loss to those rows; softmax still runs over all N-1 others.
    """
    log_p_source = F.log_softmax(similarity_logits(g_source, tau), dim=1)
    log_p_adapted = F.log_softmax(similarity_logits(g_adapted, tau), dim=1)
    if anchors is not None:
        log_p_source, log_p_adapted = log_p_source[anchors], log_p_adapted[anchors]
    if direction == "source||adapted":
        log_p, log_q = log_p_source, log_p_adapted
    else:
        log_p, log_q = log_p_adapted, log_p_source
    pointwise = log_p.exp() * (log_p - log_q)
    if reduction == "mean":
        return pointwise.mean()
    if reduction == "batchmean":
        return pointwise.sum() / pointwise.shape[0]
    return pointwise.sum()


def pairwise_similarity_kl(
    source: torch.Tensor,
    adapted: torch.Tensor,
    *,
    tau: float = 1.0,
    direction: str = "source||adapted",
    reduction: str = "mean",
    detach_source: bool = True,
    anchors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairwise-similarity KL between a source batch and an adapted batch (DomainStudio / CDC)."""
    if detach_source:
        source = source.detach()
    return similarity_kl_from_gram(
        gram(source), gram(adapted), tau=tau, direction=direction, reduction=reduction, anchors=anchors
    )


def hf_pairwise_similarity_kl(source, adapted, *, stencil: str = "domainstudio", **kwargs) -> torch.Tensor:
    """:func:`pairwise_similarity_kl` of the high-frequency maps."""
    return pairwise_similarity_kl(high_frequency(source, stencil), high_frequency(adapted, stencil), **kwargs)


def hf_mse(adapted: torch.Tensor, target: torch.Tensor, *, stencil: str = "domainstudio",
           weights: torch.Tensor | None = None) -> torch.Tensor:
    """``mean((hf(adapted) - hf(target))²)``; with per-sample ``weights`` (N,):
    ``(1/N) Σ_i weights_i · mean((hf(adapted_i) - hf(target_i))²)`` (all ones: the unweighted value)."""
    squared = (high_frequency(adapted, stencil) - high_frequency(target, stencil)).pow(2)
    if weights is None:
        return squared.mean()
    return (squared.flatten(1).mean(1) * weights).mean()


# -- The official code's forms, kept as an independent check of the vectorised reference above and as
# -- the "official" peer in bench/. Written from a description of the DomainStudio/CDC code (no code copied).
def official_high_frequency(x: torch.Tensor) -> torch.Tensor:
    """LH + HL + HH by stride-2 cross-correlation with filters built from L=[1,1]/√2, H=[-1,1]/√2."""
    low = torch.tensor([1.0, 1.0], dtype=x.dtype, device=x.device) / 2**0.5
    high = torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device) / 2**0.5
    filters = [torch.outer(low, high), torch.outer(high, low), torch.outer(high, high)]  # LH, HL, HH
    channels = x.shape[1]
    bands = [
        F.conv2d(x, f.expand(channels, 1, 2, 2), stride=2, groups=channels) for f in filters
    ]
    return bands[0] + bands[1] + bands[2]


def official_pairwise_similarity_kl(source: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
    """The official double loop: CosineSimilarity per pair into an N x (N-1) matrix, Softmax, KLDivLoss('mean')."""
    n = source.shape[0]
    sim = torch.nn.CosineSimilarity()
    sfm = torch.nn.Softmax(dim=1)
    kl = torch.nn.KLDivLoss(reduction="mean")
    dist_source = torch.zeros(n, n - 1, dtype=source.dtype, device=source.device)
    dist_adapted = torch.zeros(n, n - 1, dtype=adapted.dtype, device=adapted.device)
    for i in range(n):
        column = 0
        for j in range(n):
            if i != j:
                dist_source[i, column] = sim(source[j].reshape(1, -1), source[i].reshape(1, -1))
                dist_adapted[i, column] = sim(adapted[j].reshape(1, -1), adapted[i].reshape(1, -1))
                column += 1
    return kl(torch.log(sfm(dist_adapted)), sfm(dist_source.detach()))
