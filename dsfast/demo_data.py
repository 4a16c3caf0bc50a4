"""Procedural image domains for the demo: deterministic from a seed, no downloads.

Both domains draw the same kind of *content* — one or two simple shapes (disc, square,
triangle, ring, plus) at random positions, sizes, rotations and colours — from the same
scene generator, and differ only in how a scene is *rendered*:

* **source** ("flat"): flat-coloured, anti-aliased shapes on a smooth background (a solid
  colour or a linear gradient between two colours). Almost no high-frequency content.
* **target** ("sketch"): the same kind of scene — the same kind of smooth colour background —
  but each shape drawn in ink: a dark outline and diagonal hatching (period 3 px at 32 px)
  inside, the ink tinted by the shape's colour, and a per-pixel paper grain over the whole
  image. Same content and colours, different style and high-frequency detail: the few-shot
  target of DomainStudio.

Image ``i`` of a set depends only on ``(seed, i, domain, size)`` (its RNG is
``numpy.random.default_rng([seed, i, domain_id])``), so a prefix of a larger set equals the
smaller set and nothing depends on global random state. Arrays are ``(N, H, W, 3)``
float32 in ``[0, 1]``; :func:`to_tensor` gives the ``(N, 3, H, W)`` tensor in ``[-1, 1]``
that diffusers models train on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES = ("disc", "square", "triangle", "ring", "plus")
DOMAINS = {"source": 0, "target": 1}
SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliasing without dependencies


@dataclass(frozen=True)
class Shape:
    kind: str
    cx: float  # centre, in units of the image side (0..1)
    cy: float
    size: float  # "radius", in units of the image side
    angle: float  # radians
    color: tuple[float, float, float]


def _random_color(rng: np.random.Generator, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """A saturated-ish random colour (HSV with random hue)."""
    h = rng.uniform(0, 1)
    s = rng.uniform(0.5, 1.0)
    v = rng.uniform(0.55, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.clip(np.array(rgb, dtype=np.float64), lo, hi)


def random_scene(rng: np.random.Generator) -> list[Shape]:
    """One or two shapes; the content both domains share."""
    n = 1 if rng.uniform() < 0.6 else 2
    shapes = []
    for _ in range(n):
        kind = SHAPES[rng.integers(len(SHAPES))]
        size = rng.uniform(0.16, 0.30) if n == 1 else rng.uniform(0.12, 0.22)
        margin = size * 0.8
        cx, cy = rng.uniform(margin, 1 - margin, size=2)
        shapes.append(Shape(kind, float(cx), float(cy), float(size), float(rng.uniform(0, 2 * np.pi)),
                            tuple(_random_color(rng).tolist())))
    return shapes


def _signed_distance(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside, image-side units; exact for disc/ring, a bound otherwise)."""
    dx, dy = x - shape.cx, y - shape.cy
    c, s = np.cos(shape.angle), np.sin(shape.angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    r = shape.size
    if shape.kind == "disc":
        return np.hypot(u, v) - r
    if shape.kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    if shape.kind == "triangle":
        # equilateral, circumradius r: three half-planes at distance r/2 from the centre
        d = None
        for k in range(3):
            a = k * 2 * np.pi / 3 + np.pi / 2
            side = np.cos(a) * u + np.sin(a) * v - 0.5 * r
            d = side if d is None else np.maximum(d, side)
        return d
    if shape.kind == "ring":
        return np.abs(np.hypot(u, v) - 0.72 * r) - 0.28 * r
    if shape.kind == "plus":
        arm = 0.3 * r
        bar1 = np.maximum(np.abs(u) - r, np.abs(v) - arm)
        bar2 = np.maximum(np.abs(v) - r, np.abs(u) - arm)
        return np.minimum(bar1, bar2)
    raise ValueError(f"unknown shape {shape.kind!r}")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    return np.meshgrid(coords, coords)  # x (columns), y (rows)


def _downsample(img: np.ndarray, size: int) -> np.ndarray:
    """Box filter from the supersampled grid to ``size`` x ``size``."""
    return img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, -1).mean(axis=(1, 3))


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A solid colour (40 %) or a linear gradient between two colours, on the supersampled grid."""
    c0, c1 = _random_color(rng) * 0.85, _random_color(rng) * 0.85
    if rng.uniform() < 0.4:
        return np.broadcast_to(c0, x.shape + (3,)).copy()
    a = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(a) * (x - 0.5) + np.sin(a) * (y - 0.5)) + 0.5, 0, 1)[..., None]
    return (1 - t) * c0 + t * c1


def render_flat(shapes: list[Shape], rng: np.random.Generator, size: int) -> np.ndarray:
    """Source style: smooth background, flat-coloured shapes."""
    x, y = _grid(size)
    img = _background(rng, x, y)
    for shape in shapes:
        inside = (_signed_distance(shape, x, y) < 0)[..., None]
        img = np.where(inside, np.asarray(shape.color), img)
    return _downsample(img, size)


def render_sketch(shapes: list[Shape], rng: np.random.Generator, size: int) -> np.ndarray:
    """Target style: the same kind of background, grainy, with ink outlines and diagonal hatching for the shapes."""
    x, y = _grid(size)
    img = _background(rng, x, y)
    px = 1.0 / size  # one output pixel, in image-side units
    period, width = 3 * px, 1.1 * px  # hatching: 1 dark pixel in 3
    for k, shape in enumerate(shapes):
        d = _signed_distance(shape, x, y)
        ink = 0.08 + 0.3 * np.asarray(shape.color)  # dark ink tinted by the shape's colour
        hatch_angle = (np.pi / 4 if k % 2 == 0 else -np.pi / 4) + rng.uniform(-0.15, 0.15)
        phase = rng.uniform(0, period)
        w = np.cos(hatch_angle) * x + np.sin(hatch_angle) * y + phase
        hatch = ((w % period) < width) & (d < 0)
        outline = np.abs(d) < 0.6 * px
        mark = (hatch | outline)[..., None]
        img = np.where(mark, ink, img)
    out = _downsample(img, size)
    grain = rng.normal(0, 0.04, size=(size, size, 1))  # paper grain, per pixel
    return np.clip(out + grain, 0, 1)


def _image(domain: str, seed: int, i: int, size: int) -> np.ndarray:
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    if size < 4 or size % 2:
        raise ValueError(f"size must be an even integer >= 4, got {size}")
    rng = np.random.default_rng([seed, i, DOMAINS[domain]])
    shapes = random_scene(rng)
    render = render_flat if domain == "source" else render_sketch
    return render(shapes, rng, size).astype(np.float32)


def make_images(domain: str, n: int, seed: int = 0, size: int = 32, start: int = 0) -> np.ndarray:
    """``n`` images of a domain, ``(n, size, size, 3)`` float32 in [0, 1]; images ``start .. start+n-1``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = np.empty((n, size, size, 3), dtype=np.float32)
    for k in range(n):
        out[k] = _image(domain, seed, start + k, size)
    return out


def source_images(n: int, seed: int = 0, size: int = 32, start: int = 0) -> np.ndarray:
    """The source domain (flat shapes on smooth backgrounds)."""
    return make_images("source", n, seed, size, start)


def target_images(n: int = 10, seed: int = 1234, size: int = 32) -> np.ndarray:
    """The few-shot target domain (ink-sketch renderings of the same kind of scenes)."""
    return make_images("target", n, seed, size)


def to_tensor(images: np.ndarray):
    """``(N, H, W, 3)`` in [0, 1] -> torch ``(N, 3, H, W)`` float32 in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


def write_images(images: np.ndarray, directory: str | Path, prefix: str = "img") -> list[Path]:
    """Write ``(N, H, W, 3)`` images in [0, 1] as lossless PNGs ``prefix_000.png`` …; returns the paths."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, img in enumerate(to_uint8(images)):
        path = directory / f"{prefix}_{k:03d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def write_target_dir(directory: str | Path, n: int = 10, seed: int = 1234, size: int = 32) -> list[Path]:
    """The demo's target training set as PNG files."""
    return write_images(target_images(n, seed, size), directory, prefix="target")
