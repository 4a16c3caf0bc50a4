"""Training data: the instance (and class) images, and every random draw of a step.

Every random choice of a training step (which image, flip, timestep, noise) is a function
of ``(seed, step, global sample index)``. So the data order and draws do not depend on
the number of ranks or micro-batches, and resuming at step s reproduces exactly what the
uninterrupted run would have done.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dsfast.images import ImageFolderError, list_images, load_folder

from .errors import DataError

__all__ = ["DataError", "Draws", "LatentBatches", "PixelBatches", "count_images", "generator", "load_images"]


def load_images(folder: str | Path, resolution: int, *, channels: int = 3, center_crop: bool = True,
                what: str = "data.instance_dir") -> torch.Tensor:
    """Every image of ``folder`` as ``(N, C, R, R)`` float32 in [-1, 1] (shorter side scaled to R, cropped)."""
    try:
        images, _ = load_folder(folder, what=what, channels=channels, square=resolution, center_crop=center_crop,
                                range01=False)
    except ImageFolderError as exc:
        raise DataError(str(exc)) from None
    return images


def count_images(folder: str | Path, what: str) -> int:
    """Images in ``folder``; 0 when it does not exist or is empty."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return 0
    return len(list_images(folder, what))


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``(seed, *keys)``."""
    h = 0x9E3779B97F4A7C15
    for k in (seed, *keys):
        h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class Draws:
    """The per-sample random draws of a run (stream 0: instance images, stream 1: class images)."""

    seed: int
    batch_size: int  # global batch
    num_timesteps: int
    random_flip: bool

    def index(self, step: int, k: int, n: int, stream: int = 0) -> int:
        """Dataset index of global sample k of a step: shuffled epochs, a fresh permutation per epoch."""
        epoch, offset = divmod(step * self.batch_size + k, n)
        perm = torch.randperm(n, generator=generator(self.seed, 1_000_003 + stream, epoch))
        return int(perm[offset])

    def draw(self, step: int, k: int, shape, stream: int = 0) -> tuple[bool, int, torch.Tensor]:
        """``(flip, t, noise[shape])`` of global sample k at ``step`` (flip already False without random_flip)."""
        g = generator(self.seed, 7 + stream, step, k)
        flip = bool(torch.rand((), generator=g) < 0.5)
        t = int(torch.randint(0, self.num_timesteps, (), generator=g))
        noise = torch.randn(shape, generator=g)
        return flip and self.random_flip, t, noise

    def subset(self, step: int, k: int, n: int, size: int) -> torch.Tensor:
        """``size`` distinct random indices among the ``n`` samples of the micro-batch starting at global
        sample k (the released code's ``np.random.choice(n, size, replace=False)``), in drawn order."""
        return torch.randperm(n, generator=generator(self.seed, 31337, step, k))[:size]

    def shared_t(self, step: int, k: int) -> int:
        """One timestep for the micro-batch starting at global sample k (the released text-to-image pairwise branch)."""
        return int(torch.randint(0, self.num_timesteps, (), generator=generator(self.seed, 99991, step, k)))

    def other_batch(self, step: int, k: int, n: int, m: int) -> torch.Tensor:
        """Indices of ``m`` images of a random batch drawn independently of the micro-batch at k (the released
        hf-MSE target: a fresh batch from a second data loader)."""
        return torch.randperm(n, generator=generator(self.seed, 4711, step, k))[torch.arange(m) % n]

    def anchors(self, step: int, n: int, num: int | None) -> torch.Tensor | None:
        """Sorted random anchor rows of the pairwise loss at ``step`` (None = all rows)."""
        if not num:
            return None
        return torch.randperm(n, generator=generator(self.seed, 424242, step))[: min(num, n)].sort().values


class PixelBatches:
    """Micro-batches ``{x0, t, noise}`` of pixel-space training images."""

    def __init__(self, images: torch.Tensor, draws: Draws):
        self.images, self.draws = images, draws

    def __call__(self, step: int, ks) -> dict:
        xs, ts, noises = [], [], []
        for k in ks:
            i = self.draws.index(step, k, self.images.shape[0])
            flip, t, noise = self.draws.draw(step, k, self.images.shape[1:])
            xs.append(self.images[i].flip(-1) if flip else self.images[i])
            ts.append(t)
            noises.append(noise)
        return {"x0": torch.stack(xs), "t": torch.tensor(ts, dtype=torch.long), "noise": torch.stack(noises)}


def _mean(cached):
    return cached[0] if isinstance(cached, tuple) else cached


class LatentBatches:
    """Micro-batches of cached VAE latents: ``{z, x0 (pixels), t, noise}`` and, with class latents,
    ``{zc, noise_c, t_c}`` (a class sample per instance sample; dsfast shares the instance's timestep,
    ``t_c`` is the class sample's own draw, for loss.mode=official). A latent given as ``(mean, std)``
    (official) is sampled afresh each step, mean + std·n with n a draw of its own stream."""

    def __init__(self, images: torch.Tensor, latents: tuple[torch.Tensor, torch.Tensor], draws: Draws,
                 class_latents: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.images, self.latents, self.class_latents, self.draws = images, latents, class_latents, draws

    @property
    def latent_shape(self):
        return tuple(_mean(self.latents[0]).shape[1:])

    def _latent(self, cached, i: int, step: int, k: int, stream: int) -> torch.Tensor:
        if not isinstance(cached, tuple):
            return cached[i]
        mean, std = cached
        return mean[i] + std[i] * self.draws.draw(step, k, mean.shape[1:], stream=stream)[2]

    def __call__(self, step: int, ks) -> dict:
        d, shape = self.draws, self.latent_shape
        z, zc, x, t, n, nc, tc = [], [], [], [], [], [], []
        for k in ks:
            i = d.index(step, k, self.images.shape[0])
            flip, tk, noise = d.draw(step, k, shape)
            z.append(self._latent(self.latents[flip], i, step, k, 2))
            x.append(self.images[i].flip(-1) if flip else self.images[i])
            t.append(tk)
            n.append(noise)
            if self.class_latents is not None:
                j = d.index(step, k, _mean(self.class_latents[0]).shape[0], stream=1)
                cflip, ctk, cnoise = d.draw(step, k, shape, stream=1)
                zc.append(self._latent(self.class_latents[cflip], j, step, k, 3))
                nc.append(cnoise)
                tc.append(ctk)
        mb = {"z": torch.stack(z), "x0": torch.stack(x), "t": torch.tensor(t), "noise": torch.stack(n)}
        if zc:
            mb["zc"], mb["noise_c"], mb["t_c"] = torch.stack(zc), torch.stack(nc), torch.tensor(tc)
        return mb
