"""Few-shot generation metrics: intra-cluster diversity (Intra-LPIPS protocol), memorisation, fidelity.

All functions take image tensors ``(N, 3, H, W)`` in [0, 1] and a distance object from
:mod:`dsfast.eval.distances` (the weight-free fallback by default).

**Intra-cluster diversity** (the Intra-LPIPS protocol of CDC, Ojha et al. 2021): every
generated image is assigned to the training image nearest to it under the distance (ties:
the lower training index). Within each cluster the first ``max_per_cluster`` (= 50) members
in sample order are kept and the mean distance over all their unordered pairs is the
cluster's score. The result is the mean ± (population) standard deviation of the scores over
the clusters with at least two members; empty and singleton clusters are skipped and counted.
With LPIPS as the distance this is Intra-LPIPS; with the fallback it is labelled
"fallback" everywhere, since the numbers are on a different scale.

**Memorisation rate**: the threshold ``tau`` is the smallest distance between two *distinct*
training images (the smallest positive pairwise distance; exact duplicates in the training set
are ignored). A sample is *memorised* when its distance to the nearest training image is
strictly below ``tau`` — it is closer to a training image than any two training images are to
each other. The rate is the share of memorised samples. Needs at least two distinct training images.
Caveat: when every training image carries its own fine noise (grain, texture), the training
images are far apart at the fine scales, so the threshold is large and smooth samples that copy
no training image can fall below it; read the rate together with ``nn_dist`` and the samples.

**Domain fidelity** (two figures, both lower-is-closer / 1-is-matched):

* ``nn_dist``: the mean over samples of the distance to the nearest training image (how close
  samples come to the target set; 0 for perfect copies, so read it with the diversity).
* ``hf_ratio``: the mean high-frequency energy of the samples divided by that of the training
  images, where an image's HF energy is the mean squared level-1 Haar detail coefficient
  (H, V and D bands, all channels; pixels in [0, 1]). 1.0 = the target's amount of fine
  detail; a model that has not picked up the target's texture scores well below 1.
"""
from __future__ import annotations

import math

import torch

from dsfast.eval.distances import HaarDistance
from dsfast.reference import haar_dwt2


def _check(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected an image tensor (N, 3, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: no images")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name}: non-finite pixel values")


def assign_clusters(samples: torch.Tensor, train: torch.Tensor, distance=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest training image of every sample, and that distance: ``(N,), (N,)``."""
    distance = distance or HaarDistance()
    d = distance.pairwise(samples, train)
    nn_dist, nn_idx = d.min(dim=1)  # torch.min returns the first minimum on ties
    return nn_idx, nn_dist


def intra_cluster_diversity(samples: torch.Tensor, train: torch.Tensor, distance=None,
                            max_per_cluster: int = 50, assignment: torch.Tensor | None = None) -> dict:
    """Intra-LPIPS-style diversity (see the module docstring)."""
    _check(samples, "samples")
    _check(train, "train")
    if max_per_cluster < 2:
        raise ValueError(f"max_per_cluster must be >= 2, got {max_per_cluster}")
    distance = distance or HaarDistance()
    if assignment is None:
        assignment, _ = assign_clusters(samples, train, distance)
    scores, sizes = [], []
    n_empty = n_single = 0
    for k in range(len(train)):
        members = torch.nonzero(assignment == k).flatten()
        sizes.append(int(len(members)))
        if len(members) == 0:
            n_empty += 1
            continue
        if len(members) == 1:
            n_single += 1
            continue
        members = members[:max_per_cluster]
        d = distance.pairwise(samples[members])
        iu = torch.triu_indices(len(members), len(members), offset=1)
        scores.append(float(d[iu[0], iu[1]].mean()))
    mean = sum(scores) / len(scores) if scores else float("nan")
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)) if scores else float("nan")
    return {"mean": mean, "std": std, "clusters_used": len(scores), "clusters_empty": n_empty,
            "clusters_singleton": n_single, "cluster_sizes": sizes, "cluster_scores": scores}


def memorisation_threshold(train: torch.Tensor, distance=None) -> float:
    """Smallest positive distance between two training images."""
    _check(train, "train")
    if len(train) < 2:
        raise ValueError("the memorisation rate needs at least two training images")
    distance = distance or HaarDistance()
    d = distance.pairwise(train)
    iu = torch.triu_indices(len(train), len(train), offset=1)
    pairs = d[iu[0], iu[1]]
    pairs = pairs[pairs > 0]
    if len(pairs) == 0:
        raise ValueError("the memorisation rate needs at least two distinct training images (all are identical)")
    return float(pairs.min())


def memorisation_rate(samples: torch.Tensor, train: torch.Tensor, distance=None,
                      nn_dist: torch.Tensor | None = None) -> dict:
    """Share of samples strictly closer to their nearest training image than the threshold (module docstring)."""
    _check(samples, "samples")
    distance = distance or HaarDistance()
    tau = memorisation_threshold(train, distance)
    if nn_dist is None:
        _, nn_dist = assign_clusters(samples, train, distance)
    memorised = nn_dist < tau
    return {"rate": float(memorised.float().mean()), "count": int(memorised.sum()), "threshold": tau,
            "memorised": torch.nonzero(memorised).flatten().tolist()}


def hf_energy(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared level-1 Haar detail coefficient, ``(N,)`` (pixels in [0, 1])."""
    x = images.to(torch.float64)
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    _, (h, v, d) = haar_dwt2(x)
    return torch.stack([h, v, d]).pow(2).mean(dim=(0, 2, 3, 4))


def evaluate(samples: torch.Tensor, train: torch.Tensor, distance=None, max_per_cluster: int = 50) -> dict:
    """All the metrics of this module in one dict (the ``dsfast eval`` and demo output)."""
    _check(samples, "samples")
    _check(train, "train")
    if samples.shape[1:] != train.shape[1:]:
        raise ValueError(f"samples {tuple(samples.shape[1:])} and training images {tuple(train.shape[1:])} "
                         "differ in size; resize them to a common size first")
    distance = distance or HaarDistance()
    assignment, nn_dist = assign_clusters(samples, train, distance)
    intra = intra_cluster_diversity(samples, train, distance, max_per_cluster, assignment=assignment)
    out = {
        "metric": distance.name,
        "metric_label": distance.label,
        "num_samples": int(len(samples)),
        "num_train": int(len(train)),
        "intra_cluster": intra,
        "nn_dist": float(nn_dist.mean()),
        "hf_energy_samples": float(hf_energy(samples).mean()),
        "hf_energy_train": float(hf_energy(train).mean()),
    }
    out["hf_ratio"] = out["hf_energy_samples"] / out["hf_energy_train"] if out["hf_energy_train"] > 0 else float("nan")
    try:
        out["memorisation"] = memorisation_rate(samples, train, distance, nn_dist=nn_dist)
    except ValueError as e:
        out["memorisation"] = {"rate": None, "error": str(e)}
    return out
