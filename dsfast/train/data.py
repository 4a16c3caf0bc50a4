"""Few-shot image folders, and stateless per-sample randomness.

Every random choice of a training step (which image, flip, timestep, noise) is a function
of ``(seed, step, global sample index)``. So the data order and draws do not depend on
the number of ranks or micro-batches, and resuming at step s reproduces exactly what the
uninterrupted run would have done.
"""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """Bad training data (missing folder, no images, a corrupt image, too few images)."""


def list_images(folder: str | Path, what: str = "data.instance_dir") -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what}: image folder does not exist: {folder}")
    if not folder.is_dir():
        raise DataError(f"{what}: not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{what}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def load_image(path: Path, resolution: int, channels: int = 3, center_crop: bool = True) -> torch.Tensor:
    """One image as ``(C, R, R)`` float32 in [-1, 1]; a corrupt file raises :class:`DataError` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB" if channels == 3 else "L")
    except Exception as exc:  # PIL raises many types
        raise DataError(f"cannot read image {path}: {exc}") from None
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = 0, 0
    im = im.crop((left, top, left + resolution, top + resolution))
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).clone()
    t = t.view(resolution, resolution, channels).permute(2, 0, 1).float()
    return t / 127.5 - 1.0


def load_folder(folder, resolution: int, channels: int = 3, center_crop: bool = True,
                what: str = "data.instance_dir") -> torch.Tensor:
    files = list_images(folder, what)
    return torch.stack([load_image(p, resolution, channels, center_crop) for p in files])


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``(seed, *keys)``."""
    h = 0x9E3779B97F4A7C15
    for k in (seed, *keys):
        h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


def sample_index(seed: int, step: int, k: int, batch_size: int, n: int, stream: int = 0) -> int:
    """Dataset index of global sample k of a step: shuffled epochs, a fresh permutation per epoch."""
    pos = step * batch_size + k
    epoch, offset = divmod(pos, n)
    perm = torch.randperm(n, generator=generator(seed, 1_000_003 + stream, epoch))
    return int(perm[offset])


def draw(seed: int, step: int, k: int, shape, num_timesteps: int, stream: int = 0):
    """``(flip: bool, t: int, noise: Tensor[shape])`` of global sample k at ``step``."""
    g = generator(seed, 7 + stream, step, k)
    flip = bool(torch.rand((), generator=g) < 0.5)
    t = int(torch.randint(0, num_timesteps, (), generator=g))
    noise = torch.randn(shape, generator=g)
    return flip, t, noise


def make_batch(images: torch.Tensor, *, seed: int, step: int, ks, batch_size: int, noise_shape,
               num_timesteps: int, random_flip: bool, stream: int = 0, timesteps=None):
    """Images, timesteps and noise of the global samples ``ks`` of ``step`` (deterministic).

    ``timesteps`` (optional) forces the timesteps (shared t of instance and class batches).
    """
    xs, ts, noises, idx = [], [], [], []
    for j, k in enumerate(ks):
        i = sample_index(seed, step, k, batch_size, images.shape[0], stream)
        flip, t, noise = draw(seed, step, k, noise_shape, num_timesteps, stream)
        x = images[i]
        if random_flip and flip:
            x = x.flip(-1)
        xs.append(x)
        ts.append(t if timesteps is None else int(timesteps[j]))
        noises.append(noise)
        idx.append(i)
    return torch.stack(xs), torch.tensor(ts, dtype=torch.long), torch.stack(noises), idx
