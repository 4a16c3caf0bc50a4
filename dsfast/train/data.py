"""Training data: the instance (and class) images, their captions, and every random draw of a step.

Every random choice of a training step (which image, flip, timestep, noise) is a function
of ``(seed, step, global sample index)``. So the data order and draws do not depend on
the number of ranks or micro-batches, and resuming at step s reproduces exactly what the
uninterrupted run would have done.
"""
from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dsfast.images import IMAGE_EXTENSIONS, ImageFolderError, image_sizes, list_images, load_folder, read_image, square_crop

from .errors import DataError

__all__ = ["CachedImages", "Captions", "DataError", "Draws", "LatentBatches", "RandomCrops", "count_images", "generator",
           "image_geometry", "instance_prompts", "load_images", "random_crops_matter", "read_captions", "to_device"]


def load_images(folder: str | Path, resolution: int, *, channels: int = 3, center_crop: bool = True,
                what: str = "data.instance_dir") -> torch.Tensor:
    """Every image of ``folder`` as ``(N, C, R, R)`` float32 in [-1, 1] (shorter side scaled to R, cropped)."""
    try:
        images, _ = load_folder(folder, what=what, channels=channels, square=resolution, center_crop=center_crop,
                                range01=False)
    except ImageFolderError as exc:
        raise DataError(str(exc)) from None
    return images


def image_geometry(folder: str | Path, resolution: int, *, center_crop: bool = True,
                   what: str = "data.instance_dir") -> torch.Tensor:
    """Where each image of :func:`load_images` comes from: ``(2, N, 4)`` longs ``(original H, original W, crop
    top, crop left)``, the crop in the resized image (SDXL's size and crop conditioning), for the images as
    given (0) and mirrored (1: the crop's left offset measured from the mirrored image's left edge). Reads the
    files' headers only."""
    rows = []
    for h, w in _sizes(folder, what):
        nh, nw, top, left = square_crop(h, w, resolution, center_crop)
        rows.append([(h, w, top, left), (h, w, top, nw - resolution - left)])
    return torch.tensor(rows, dtype=torch.long).permute(1, 0, 2).contiguous()


def count_images(folder: str | Path, what: str) -> int:
    """Images in ``folder``; 0 when it does not exist or is empty."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return 0
    return len(list_images(folder, what))


METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Captions:
    """Per-image captions of a folder: ``texts[k]`` is the caption of its k-th image in :func:`list_images` order
    (the order :func:`load_images` stacks them in), None where an image has none."""

    source: str  # where they were read: "metadata.jsonl" | ".txt files"
    files: tuple[Path, ...]
    texts: tuple[str | None, ...]


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def _txt_captions(files: list[Path], what: str) -> list[str | None]:
    """``<image name without extension>.txt`` beside each image: its text, stripped (None without one)."""
    out = []
    for f in files:
        txt = f.with_suffix(".txt")
        out.append(_read_text(txt, what).strip() if txt.is_file() else None)
    return out


def _metadata_captions(folder: Path, files: list[Path], column: str, what: str) -> list[str | None]:
    """The ``column`` of each image's line of ``metadata.jsonl`` (Hugging Face imagefolder's: one JSON object per
    line with ``file_name`` and the caption), None for an image without a line."""
    path = folder / METADATA
    names = {f.name: k for k, f in enumerate(files)}
    texts: list[str | None] = [None] * len(files)
    first_line: dict[str, int] = {}
    for n, line in enumerate(_read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{what}: {path} line {n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(entry, dict):
            raise DataError(f"{where} is not a JSON object (a line is {{\"file_name\": ..., \"{column}\": ...}})")
        name = entry.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where} has no \"file_name\" (the image the caption belongs to)")
        if column not in entry:
            raise DataError(f"{where} has no \"{column}\" key (its keys: {', '.join(map(repr, entry))}); "
                            "data.caption_column names the key of the caption")
        text = entry[column]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{where}: \"{column}\" is not a string: {text!r}")
        key = posixpath.normpath(name.strip())
        if key not in names:
            inside = "/" not in key and (folder / key).is_file()
            why = (f"{key} is not an image ({', '.join(IMAGE_EXTENSIONS)})" if inside else
                   f"the images are read directly in {folder}, not in subfolders" if "/" in key else
                   f"no image {key} in {folder}")
            raise DataError(f"{where}: file_name {name!r} is not an image of the folder: {why}")
        if key in first_line:
            raise DataError(f"{where}: file_name {name!r} is listed twice (first on line {first_line[key]})")
        first_line[key] = n
        texts[names[key]] = None if text is None else text.strip()
    return texts


def read_captions(folder: str | Path, mode: str, *, column: str = "text",
                  what: str = "data.instance_dir") -> Captions | None:
    """The captions of the images of ``folder`` per ``mode`` (``data.captions``): ``txt`` (``<image stem>.txt``
    beside the image), ``metadata`` (``metadata.jsonl``, ``file_name`` + ``column``), ``auto`` (metadata.jsonl
    when there is one, else the .txt files when any image has one), ``none``. None when there are none
    (``none``, or ``auto`` finding neither). Bad input (missing file, not JSON lines, an unknown or repeated
    ``file_name``, no .txt file at all) is one :class:`DataError` naming the file and line."""
    if mode == "none":
        return None
    folder = Path(folder)
    try:
        files = list_images(folder, what)
    except ImageFolderError as exc:
        raise DataError(str(exc)) from None
    if mode == "auto":
        mode = "metadata" if (folder / METADATA).is_file() else "txt" if any(
            f.with_suffix(".txt").is_file() for f in files) else "none"
        if mode == "none":
            return None
    if mode == "metadata":
        if not (folder / METADATA).is_file():
            raise DataError(f"{what}: data.captions=metadata but {folder} has no {METADATA} (one JSON object per "
                            f"line: {{\"file_name\": \"{files[0].name}\", \"{column}\": \"...\"}})")
        return Captions(METADATA, tuple(files), tuple(_metadata_captions(folder, files, column, what)))
    if mode == "txt":
        texts = _txt_captions(files, what)
        if all(t is None for t in texts):
            raise DataError(f"{what}: data.captions=txt but no image of {folder} has a caption file (the caption of "
                            f"{files[0].name} is {files[0].with_suffix('.txt').name}, beside it)")
        return Captions(".txt files", tuple(files), tuple(texts))
    raise ValueError(f"unknown captions mode {mode!r}")


def instance_prompts(data) -> list[str] | None:
    """The prompt of each instance image of a run's ``data`` config (:class:`~dsfast.train.config.DataConfig`),
    in :func:`load_images` order: its caption (``data.captions``), else ``data.instance_prompt``. None when the
    run has no captions (every image takes the instance prompt). An image with no or an empty caption while
    no instance prompt is set is one :class:`DataError` naming it."""
    caps = read_captions(data.instance_dir, data.captions, column=data.caption_column)
    if caps is None:
        return None
    missing = [f.name for f, t in zip(caps.files, caps.texts) if not t]
    if missing and not data.instance_prompt:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"data.instance_dir: {missing[0]}{more} has no caption (or an empty one) in the "
                        f"{caps.source} and data.instance_prompt, the prompt of such images, is not set")
    return [t or data.instance_prompt for t in caps.texts]


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

    def window(self, step: int, k: int, rows: int, cols: int, stream: int = 0) -> tuple[int, int]:
        """``(top, left)`` of global sample k's random crop: uniform in ``[0, rows] x [0, cols]``."""
        g = generator(self.seed, 8191 + stream, step, k)
        return int(torch.randint(0, rows + 1, (), generator=g)), int(torch.randint(0, cols + 1, (), generator=g))

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


def _rows(cached, flip, i):
    """Rows ``[flip, i]`` of cached ``(2, N, ...)`` latents, or of each of ``(mean, std)``."""
    return tuple(c[flip, i] for c in cached) if isinstance(cached, tuple) else cached[flip, i]


class CachedImages:
    """Images cropped once (:func:`load_images`), their latents encoded once: the pixels (unless ``keep_pixels`` is
    False: class images), the latents and the :func:`image_geometry` rows, each ``(2, N, ...)`` (as given and
    mirrored) on the device. Latents given as ``(mean, std)`` (loss.mode=official) are sampled afresh each step by
    :class:`LatentBatches`."""

    def __init__(self, images: torch.Tensor, latents, geometry: torch.Tensor, device: torch.device, *,
                 keep_pixels: bool = True):
        self.pixels = _with_mirror(images, device) if keep_pixels else None
        self.latents, self.geometry, self.device = latents, geometry.to(device), device
        self.latent_shape = tuple(_mean(latents).shape[2:])

    def __len__(self) -> int:
        return self.geometry.shape[1]

    def crop(self, i, flip, draws: Draws, step: int, ks, stream: int):
        """``(pixels (m, C, R, R), geometry (m, 4))`` on the device of the samples ``ks`` showing images ``i``
        (``flip``: mirrored; both CPU tensors, as :meth:`Draws.batch` draws them)."""
        i, flip = to_device(i, self.device), to_device(flip, self.device)
        return None if self.pixels is None else self.pixels[flip, i], self.geometry[flip, i]

    def encode(self, x0, i, flip):
        return _rows(self.latents, flip, i)


class RandomCrops:
    """Images cropped at random afresh for every sample (``data.random_crop``, as diffusers' training scripts
    without ``--center_crop``): each image with its shorter side scaled to R, in host memory; a sample's R x R
    window is a draw of ``(seed, step, k)`` (:meth:`Draws.window`), mirrored with the sample, moved to the device,
    and its latents are encoded then by ``encode`` (a batch of pixels -> latents, or their ``(mean, std)``)."""

    def __init__(self, folder: str | Path, resolution: int, encode: Callable, device: torch.device, *,
                 channels: int = 3, what: str = "data.instance_dir"):
        try:
            files = list_images(folder, what)
            self.sizes = image_sizes(files)
            self.images = [read_image(f, channels=channels, shorter=resolution, range01=False) for f in files]
        except ImageFolderError as exc:
            raise DataError(str(exc)) from None
        self.resolution, self.encode_fn, self.device = resolution, encode, device
        probe = to_device(self.images[0][None, :, :resolution, :resolution].contiguous(), device)
        self.latent_shape = tuple(_mean(encode(probe)).shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def crop(self, i, flip, draws: Draws, step: int, ks, stream: int):
        r, pixels, rows = self.resolution, [], []
        for k, idx, f in zip(ks, i.tolist(), flip.tolist()):
            image = self.images[idx]
            nh, nw = image.shape[1:]
            top, left = draws.window(step, k, nh - r, nw - r, stream)
            window = image[:, top:top + r, left:left + r]
            pixels.append(window.flip(-1) if f else window)
            rows.append((*self.sizes[idx], top, nw - r - left if f else left))
        return to_device(torch.stack(pixels), self.device), to_device(torch.tensor(rows, dtype=torch.long), self.device)

    def encode(self, x0, i, flip):
        return self.encode_fn(x0)


def random_crops_matter(folder: str | Path, resolution: int, what: str) -> bool:
    """Whether a random crop of some image of ``folder`` can differ from its centre crop (not all are square)."""
    return any(square_crop(h, w, resolution)[:2] != (resolution, resolution) for h, w in _sizes(folder, what))


def _sizes(folder: str | Path, what: str) -> list[tuple[int, int]]:
    """``(H, W)`` of each image of ``folder`` (headers only); a bad folder or file is a :class:`DataError`."""
    try:
        return image_sizes(list_images(folder, what))
    except ImageFolderError as exc:
        raise DataError(str(exc)) from None


class LatentBatches:
    """Micro-batches of the instance (and class) images (:class:`CachedImages` or :class:`RandomCrops`):
    ``{z, x0 (pixels), t, noise, i, flip, geometry}`` (``i``: the dataset index of each sample, which picks its
    caption; a mirrored sample keeps its image's index; ``flip``: 1 where mirrored; ``geometry``: its image's
    original size and crop, :func:`image_geometry`) and, with class images, ``{zc, noise_c, t_c, j, flip_c,
    geometry_c}`` (a class sample per instance sample; dsfast shares the instance's timestep, ``t_c`` is the class
    sample's own draw, for loss.mode=official). Latents given as ``(mean, std)`` (official) are sampled afresh
    each step, mean + std·n with n a draw of its own stream."""

    def __init__(self, instances, draws: Draws, device: torch.device, classes=None):
        self.instances, self.classes, self.draws, self.device = instances, classes, draws, device
        self.latent_shape = instances.latent_shape

    def _latent(self, latents, step: int, ks, stream: int) -> torch.Tensor:
        if not isinstance(latents, tuple):
            return latents
        mean, std = latents
        n = torch.stack([self.draws.draw(step, k, self.latent_shape, stream=stream)[2] for k in ks])
        return mean + std * to_device(n, self.device)

    def _samples(self, images, step: int, ks, stream: int):
        """``(index, flip, t, noise, pixels, latents, geometry)`` of the samples ``ks`` of one image set."""
        drawn = self.draws.batch(step, ks, len(images), self.latent_shape, stream)
        x0, geometry = images.crop(*drawn[:2], self.draws, step, ks, stream)
        i, flip, t, noise = (to_device(x, self.device) for x in drawn)
        return i, flip, t, noise, x0, self._latent(images.encode(x0, i, flip), step, ks, stream + 2), geometry

    def __call__(self, step: int, ks) -> dict:
        i, flip, t, noise, x0, z, geometry = self._samples(self.instances, step, ks, 0)
        mb = {"z": z, "x0": x0, "t": t, "noise": noise, "i": i, "flip": flip, "geometry": geometry}
        if self.classes is not None:
            j, flip_c, t_c, noise_c, _, zc, geometry_c = self._samples(self.classes, step, ks, 1)
            mb.update(zc=zc, noise_c=noise_c, t_c=t_c, j=j, flip_c=flip_c, geometry_c=geometry_c)
        return mb


def _mean(cached):
    return cached[0] if isinstance(cached, tuple) else cached
