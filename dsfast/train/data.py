"""Training data: the instance (and class) images, and every random draw of a step.

Every random choice of a training step (which image, flip, timestep, noise) is a function
of ``(seed, step, global sample index)``. So the data order and draws do not depend on
the number of ranks or micro-batches, and resuming at step s reproduces exactly what the
uninterrupted run would have done.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dsfast.images import ImageFolderError, list_images, load_folder

from .errors import DataError

__all__ = ["DataError", "Draws", "LatentBatches", "PixelBatches", "count_images", "generator", "load_images",
           "to_device"]


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
    sample_t: Callable[[torch.Generator], int] | None = None  # a timestep index from a generator; None = uniform

    def index(self, step: int, k: int, n: int, stream: int = 0) -> int:
        """Dataset index of global sample k of a step: shuffled epochs, a fresh permutation per epoch."""
        epoch, offset = divmod(step * self.batch_size + k, n)
        perm = torch.randperm(n, generator=generator(self.seed, 1_000_003 + stream, epoch))
        return int(perm[offset])

    def draw(self, step: int, k: int, shape, stream: int = 0) -> tuple[bool, int, torch.Tensor]:
        """``(flip, t, noise[shape])`` of global sample k at ``step`` (flip already False without random_flip)."""
        g = generator(self.seed, 7 + stream, step, k)
        flip = bool(torch.rand((), generator=g) < 0.5)
        t = self.sample_t(g) if self.sample_t is not None else int(torch.randint(0, self.num_timesteps, (), generator=g))
        noise = torch.randn(shape, generator=g)
        return flip and self.random_flip, t, noise

    def batch(self, step: int, ks, n: int, shape, stream: int = 0) -> tuple[torch.Tensor, ...]:
        """``(index, flip, t, noise)`` of the global samples ``ks`` (:meth:`index`, :meth:`draw`) as CPU tensors:
        three ``(m,)`` longs and ``(m, *shape)`` noise."""
        draws = [self.draw(step, k, shape, stream) for k in ks]
        return (torch.tensor([self.index(step, k, n, stream) for k in ks]),
                torch.tensor([int(flip) for flip, _, _ in draws]), torch.tensor([t for _, t, _ in draws]),
                torch.stack([noise for _, _, noise in draws]))

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


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU-drawn tensor on the training device: on a GPU pinned and copied asynchronously (no pageable copy,
    no host sync)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _with_mirror(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``(2, N, ...)`` on ``device``: the images as given (0) and mirrored (1), indexed by ``[flip, index]``."""
    return torch.stack([images, images.flip(-1)]).to(device)


class PixelBatches:
    """Micro-batches ``{x0, t, noise}`` of pixel-space training images (kept on ``device``; only the draws,
    made on the CPU, travel each step)."""

    def __init__(self, images: torch.Tensor, draws: Draws, device: torch.device):
        self.images, self.draws, self.device = _with_mirror(images, device), draws, device

    def __call__(self, step: int, ks) -> dict:
        n, shape = self.images.shape[1], self.images.shape[2:]
        i, flip, t, noise = (to_device(x, self.device) for x in self.draws.batch(step, ks, n, shape))
        return {"x0": self.images[flip, i], "t": t, "noise": noise}


class LatentBatches:
    """Micro-batches of cached VAE latents: ``{z, x0 (pixels), t, noise}`` and, with class latents,
    ``{zc, noise_c, t_c}`` (a class sample per instance sample; dsfast shares the instance's timestep,
    ``t_c`` is the class sample's own draw, for loss.mode=official). Latents are ``(2, N, ...)`` (the images
    as given and mirrored, see :func:`_with_mirror`) on ``device``; given as ``(mean, std)`` (official) a latent
    is sampled afresh each step, mean + std·n with n a draw of its own stream."""

    def __init__(self, images: torch.Tensor, latents, draws: Draws, device: torch.device, class_latents=None):
        self.images, self.latents, self.class_latents = _with_mirror(images, device), latents, class_latents
        self.draws, self.device = draws, device

    @property
    def latent_shape(self):
        return tuple(_mean(self.latents).shape[2:])

    def _latent(self, cached, flip, i, step: int, ks, stream: int) -> torch.Tensor:
        if not isinstance(cached, tuple):
            return cached[flip, i]
        mean, std = cached
        n = torch.stack([self.draws.draw(step, k, self.latent_shape, stream=stream)[2] for k in ks])
        return mean[flip, i] + std[flip, i] * to_device(n, self.device)

    def __call__(self, step: int, ks) -> dict:
        d, shape = self.draws, self.latent_shape
        i, flip, t, noise = (to_device(x, self.device) for x in d.batch(step, ks, self.images.shape[1], shape))
        mb = {"z": self._latent(self.latents, flip, i, step, ks, 2), "x0": self.images[flip, i], "t": t,
              "noise": noise}
        if self.class_latents is not None:
            n_class = _mean(self.class_latents).shape[1]
            j, cflip, tc, nc = (to_device(x, self.device) for x in d.batch(step, ks, n_class, shape, stream=1))
            mb.update(zc=self._latent(self.class_latents, cflip, j, step, ks, 3), noise_c=nc, t_c=tc)
        return mb


def _mean(cached):
    return cached[0] if isinstance(cached, tuple) else cached
