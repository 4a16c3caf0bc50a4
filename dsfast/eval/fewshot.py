"""Metrics of few-shot adaptation that need a *reference* set: fresh images of the target domain.

With a generator that renders the target domain without limit (the demo's), memorisation and
fidelity can be calibrated instead of guessed. Images are ``(N, C, H, W)`` in [0, 1];
``distance`` is any object of :mod:`dsfast.eval.distances` (the fallback Haar distance by default).

**Copy rate.** ``threshold`` = the ``quantile`` (default 5 %) of the distances from fresh target
images (not in the training set) to their nearest training image: only 5 % of genuinely new
target images come that close to a training image. A sample is a *copy* when its nearest
training image is closer than the threshold; the rate is the share of copies (about 0.05 for
a model that draws new target images, 1 for one that reproduces the training set).

**Label diversity** (labels from a content classifier, e.g. a digit classifier): the number of
distinct labels (coverage) and the entropy of the label histogram in bits (log2 of the number
of classes for a uniform spread, 0 when every sample has one label).

**Correspondence**: the share of samples whose label equals the label of the sample another
model drew from the same noise (the paper's claim: an adapted model keeps the source's content).

**MMD²** to the reference: the unbiased squared maximum mean discrepancy with a Gaussian kernel
on pixels, bandwidth = the median pairwise distance of the reference set; about 0 for samples
from the reference's distribution, larger the further they are from it.
"""
from __future__ import annotations

import math

import torch

from dsfast.eval.distances import HaarDistance


def nearest_distance(images: torch.Tensor, train: torch.Tensor, distance=None) -> torch.Tensor:
    """``(N,)`` distance of every image to its nearest training image."""
    distance = distance or HaarDistance()
    return distance.pairwise(images, train).min(dim=1).values


def copy_threshold(fresh: torch.Tensor, train: torch.Tensor, distance=None, quantile: float = 0.05) -> float:
    """The ``quantile`` of the fresh target images' nearest-training distances."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if len(fresh) < 20:
        raise ValueError(f"the copy threshold needs at least 20 fresh reference images, got {len(fresh)}")
    return float(torch.quantile(nearest_distance(fresh, train, distance).double(), quantile))


def copy_rate(samples: torch.Tensor, train: torch.Tensor, threshold: float, distance=None) -> dict:
    """Share of samples closer to a training image than ``threshold`` (see the module docstring)."""
    d = nearest_distance(samples, train, distance)
    copies = d < threshold
    return {"rate": float(copies.float().mean()), "count": int(copies.sum()), "threshold": threshold,
            "nn_dist_mean": float(d.mean())}


def label_diversity(labels: torch.Tensor, num_classes: int) -> dict:
    """Coverage (distinct labels), entropy of the label histogram (bits) and the histogram."""
    labels = torch.as_tensor(labels).long().flatten()
    if len(labels) == 0:
        raise ValueError("no labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes})")
    hist = torch.bincount(labels, minlength=num_classes)
    p = hist[hist > 0].double() / len(labels)
    return {"coverage": int((hist > 0).sum()), "entropy_bits": float(-(p * p.log2()).sum()),
            "max_entropy_bits": math.log2(num_classes), "histogram": hist.tolist()}


def correspondence(labels: torch.Tensor, reference_labels: torch.Tensor) -> float:
    """Share of positions where ``labels`` equals ``reference_labels`` (same noise, another model)."""
    a, b = torch.as_tensor(labels).flatten(), torch.as_tensor(reference_labels).flatten()
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"correspondence needs two label lists of one non-zero length, got {len(a)} and {len(b)}")
    return float((a == b).double().mean())


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b).pow(2)


def mmd2(samples: torch.Tensor, reference: torch.Tensor, bandwidth: float | None = None) -> dict:
    """Unbiased Gaussian-kernel MMD² between two image sets (pixels flattened); see the module docstring."""
    x = samples.flatten(1).double()
    y = reference.flatten(1).double()
    if len(x) < 2 or len(y) < 2:
        raise ValueError("MMD needs at least two images in each set")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"image sizes differ: {tuple(samples.shape[1:])} vs {tuple(reference.shape[1:])}")
    dyy = _sq_dists(y, y)
    if bandwidth is None:
        iu = torch.triu_indices(len(y), len(y), offset=1)
        bandwidth = float(dyy[iu[0], iu[1]].sqrt().median())
    g = 1.0 / (2 * bandwidth ** 2)
    kxx, kyy, kxy = (-g * _sq_dists(x, x)).exp(), (-g * dyy).exp(), (-g * _sq_dists(x, y)).exp()
    n, m = len(x), len(y)
    value = ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
             - 2 * kxy.mean())
    return {"mmd2": float(value), "bandwidth": bandwidth}
