"""The roof of a CPU op: the least time its work can take on this machine, measured in the same run.

    roof = max(traffic bytes / copy bandwidth, FMAs / FMA peak)

* **copy bandwidth**: ``dst.copy_(src)`` of 128 MiB on the run's threads, read + write bytes / time
  (``bench.kernels.copy_bandwidth_gbps``);
* **FMA peak**: a ``torch.mm`` of two 2048 x 2048 float32 matrices on the same threads (MKL/oneDNN,
  the best FMA code on the machine), 2048^3 FMAs (flop / 2) / time (:func:`fma_peak_gfmas`);
* **traffic and FMAs** of an op: the functions below, one per op and pass, for a batch of N samples of
  D = C*H*W elements of ``elem`` bytes (E = N * D * elem, the bytes of one input). Traffic is the minimum:
  every input read once and every output written once per pass (the N x N Grams and the scalar loss are
  negligible next to E). FMAs count the multiply-adds the op cannot avoid: the 2x2 stencil (4 per hf
  value, hf map of D/4 per sample), the Grams' upper triangle (N(N+1)/2 dot products of length D), the
  backward products M @ X (N^2 D), and the N x N cosine/softmax/KL tail (~3 N^2 per KL and pass, noise).
  The Haar butterflies are additions (no FMA): the DWT ops' roof is their traffic.

``share`` (bench rows' ``pct_roof``) = roof / measured time: 100 % is the machine's limit for that op.
fwd+bwd = fwd + bwd (the backward re-reads what it needs: nothing is kept between the passes but the
N x N Grams).
"""
from __future__ import annotations

import time

import torch


def fma_peak_gfmas(size: int = 2048, min_time: float = 0.3, clock: str = "wall") -> float:
    """FMAs per second (1e9) of a float32 ``torch.mm`` of two ``size`` x ``size`` matrices on the current
    threads (the best of the repeats: a peak); ``clock="thread"``: the calling thread's CPU time, as the
    bench's ``--clock thread`` (one thread)."""
    timer = time.thread_time if clock == "thread" else time.perf_counter
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up
    best, spent = float("inf"), 0.0
    while spent < min_time:
        t0 = timer()
        torch.mm(a, b, out=out)
        t = timer() - t0
        best, spent = min(best, t), spent + t
    return size**3 / best / 1e9


def _gram(n: int, d: float) -> float:
    """FMAs of the upper triangle of an N x N Gram of rows of length d."""
    return n * (n + 1) / 2 * d


def _kl(n: int) -> float:
    """FMAs of the N x N tail of one pairwise KL (cosines, softmaxes, KL) in one pass."""
    return 3 * n * n


# Each: (bytes, FMAs) of one pass ("fwd" or "bwd") for N samples of D elements of `elem` bytes.
def haar_dwt2(p: str, n: int, d: int, elem: int):
    """fwd: read x, write the 4 bands (E each); bwd: read the band gradients, write grad x. Additions only."""
    return 2 * n * d * elem, 0.0


def haar_idwt2(p: str, n: int, d: int, elem: int):
    """As haar_dwt2, the other way round."""
    return 2 * n * d * elem, 0.0


def haar_wavedec2_l3(p: str, n: int, d: int, elem: int):
    """Three levels: the bands of every level together hold E, so still read E + write E (the coarser
    levels' inputs, E/4 and E/16, can stay in cache)."""
    return 2 * n * d * elem, 0.0


def haar_waverec2_l3(p: str, n: int, d: int, elem: int):
    """As haar_wavedec2_l3, the other way round."""
    return 2 * n * d * elem, 0.0


def high_frequency(p: str, n: int, d: int, elem: int):
    """fwd: read x (E), write the hf map (E/4), 4 FMAs per hf value; bwd: the transpose (E/4 in, E out)."""
    return 1.25 * n * d * elem, n * d


def hf_mse(p: str, n: int, d: int, elem: int):
    """fwd: read adapted and target (2E), stencil on both, squares of the D/4 differences; bwd: read them
    again and write grad adapted (3E), the stencil on both and its transpose."""
    if p == "fwd":
        return 2 * n * d * elem, 2 * n * d + n * d / 4
    return 3 * n * d * elem, 3 * n * d


def pairwise_similarity_kl(p: str, n: int, d: int, elem: int):
    """fwd: read source and adapted (2E), their two Grams; bwd: read adapted, write its gradient (2E),
    (G + G^T) @ adapted (N^2 D)."""
    if p == "fwd":
        return 2 * n * d * elem, 2 * _gram(n, d) + 2 * _kl(n)
    return 2 * n * d * elem, n * n * d + _kl(n)


def hf_pairwise_similarity_kl(p: str, n: int, d: int, elem: int):
    """fwd: read source and adapted (2E), stencil on both (N D each), Grams of the two hf maps (length D/4);
    bwd: read adapted, write its gradient (2E), the stencil again, M @ hf (N^2 D/4), the transposed stencil."""
    if p == "fwd":
        return 2 * n * d * elem, 2 * n * d + 2 * _gram(n, d / 4) + 2 * _kl(n)
    return 2 * n * d * elem, 2 * n * d + n * n * d / 4 + _kl(n)


def domainstudio_loss(p: str, n: int, d: int, elem: int):
    """4 KL_img + 4 KL_hf + hfMSE in one pass per batch. fwd: read source, adapted, real (3E); image and hf
    Grams of source and adapted, the stencil on all three, the squared differences; bwd: read adapted and
    real, write grad adapted (3E); Mi @ adapted (N^2 D), the stencil on both, Mh @ hf (N^2 D/4), the
    transposed stencil."""
    if p == "fwd":
        return 3 * n * d * elem, 2 * (_gram(n, d) + _gram(n, d / 4)) + 3 * n * d + n * d / 4 + 4 * _kl(n)
    return 3 * n * d * elem, n * n * d + n * n * d / 4 + 3 * n * d + 2 * _kl(n)


MODELS = {f.__name__: f for f in (haar_dwt2, haar_idwt2, haar_wavedec2_l3, haar_waverec2_l3, high_frequency, hf_mse, pairwise_similarity_kl,
                                  hf_pairwise_similarity_kl, domainstudio_loss)}


def work(op: str, pass_: str, n: int, d: int, elem: int) -> tuple[float, float] | None:
    """(bytes, FMAs) of ``op``'s ``pass_`` ("fwd", "bwd" or "fwd+bwd"), or None for ops without a model."""
    model = MODELS.get(op)
    if model is None:
        return None
    passes = ("fwd", "bwd") if pass_ == "fwd+bwd" else (pass_,)
    parts = [model(p, n, d, elem) for p in passes]
    return sum(b for b, _ in parts), sum(f for _, f in parts)


def roof(op: str, pass_: str, n: int, d: int, elem: int, copy_gbps: float, fma_gfmas: float) -> dict | None:
    """``roof_s``, the bound that sets it (``traffic`` or ``fma``) and the model's bytes and FMAs."""
    w = work(op, pass_, n, d, elem)
    if w is None:
        return None
    nbytes, fmas = w
    traffic_s, fma_s = nbytes / (copy_gbps * 1e9), fmas / (fma_gfmas * 1e9)
    return {"roof_s": max(traffic_s, fma_s), "roof_bound": "traffic" if traffic_s >= fma_s else "fma",
            "roof_bytes": nbytes, "roof_fmas": fmas}
