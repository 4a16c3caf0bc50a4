"""The demo's two image domains, both made from scikit-learn's bundled handwritten digits (no download).

* **source**: the 1,797 8x8 digits of ``sklearn.datasets.load_digits``, bilinearly resized to 16x16,
  one channel, white strokes on black.
* **target** ("bold on grey"): the same kind of digit drawn as a bold white stroke on grey paper. A
  render applies a small random affine jitter (rotation, scale, shift: seeded per image), then the
  style: the stroke thickened by one pixel (a 2x2 max filter), on paper of grey level 0.35 instead of
  black. The style is a global, deterministic, monotone map of the content (no per-pixel random
  grain, bright stays bright), so a model that copies a training image reproduces it closely, a copy
  can be measured, and "the same noise gives the same digit" can be checked against the source.

Target image ``i`` of a set depends only on ``(seed, i)``: it draws its digit and its jitter from
``numpy.random.default_rng([seed, i])``, so fresh target images can be rendered without limit and
a prefix of a larger set equals the smaller set. Tensors are ``(N, 1, 16, 16)`` float32 in
``[-1, 1]`` (what the models see) unless a function says [0, 1].
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16
PAPER = 0.35  # grey level of the target's background, in [0, 1]
STROKE = 1.0  # grey level of the target's stroke, in [0, 1]


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)  # (1797, 8, 8) in [0, 1]


def source_digits(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 source digits ``(N, 1, size, size)`` in [-1, 1] (bilinear from 8x8) and their labels 0-9."""
    images, labels = _digits()
    x = torch.from_numpy(images)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.from_numpy(labels)


def _jitter(x01: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A small random affine map (rotation +-10 deg, scale 0.9-1.1, shift +-1 px at 16 px) of ``(1, 1, H, W)``."""
    angle = np.deg2rad(rng.uniform(-10, 10))
    scale = rng.uniform(0.9, 1.1)
    tx, ty = rng.uniform(-1, 1, size=2) * 2 / x01.shape[-1]
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    theta = torch.tensor([[[c, -s, tx], [s, c, ty]]], dtype=torch.float32)
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    return F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def target_style(x01: torch.Tensor) -> torch.Tensor:
    """The target style of ``(N, 1, H, W)`` digits in [0, 1] (white on black): a bold white stroke on grey paper."""
    bold = F.max_pool2d(F.pad(x01, (0, 1, 0, 1)), 2, stride=1)  # each stroke one pixel wider
    return PAPER + (STROKE - PAPER) * bold


def target_images(n: int = 10, seed: int = 0, start: int = 0, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Target images ``start .. start+n-1`` of ``seed``: ``(n, 1, size, size)`` in [-1, 1], and their digit labels."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    source, labels = source_digits(size)
    out, classes = [], []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        k = int(rng.integers(len(source)))
        x01 = _jitter((source[k: k + 1] + 1) / 2, rng)
        out.append(target_style(x01))
        classes.append(int(labels[k]))
    images = torch.cat(out) if out else torch.empty(0, 1, size, size)
    return images * 2 - 1, torch.tensor(classes, dtype=torch.long)


def write_target_dir(directory: str | Path, n: int = 10, seed: int = 0) -> list[Path]:
    """The demo's target training set as lossless 8-bit PNG files ``target_00000.png`` ..."""
    from dsfast.images import save_images

    images, _ = target_images(n, seed)
    return save_images((images + 1) / 2, directory, prefix="target_")
