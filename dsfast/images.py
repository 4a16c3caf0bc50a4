"""Image files in and out: the one folder loader and the one grid maker every part of dsfast uses.

Tensors are ``(N, C, H, W)`` float32; ``range01`` selects [0, 1] (evaluation, figures) or [-1, 1]
(training data, as diffusion models see it).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageFolderError(ValueError):
    """A folder of images cannot be used: missing, not a folder, empty, or holding an unreadable file."""


def list_images(folder: str | Path, what: str = "image folder") -> list[Path]:
    """Image files directly in ``folder`` (by extension, case-insensitive), sorted by name."""
    folder = Path(folder)
    if not folder.exists():
        raise ImageFolderError(f"{what}: folder does not exist: {folder}")
    if not folder.is_dir():
        raise ImageFolderError(f"{what}: not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ImageFolderError(f"{what}: no images ({', '.join(IMAGE_EXTENSIONS)}) directly in {folder}")
    return files


# Pixel modes whose values are not 8-bit: PIL's convert() to "L"/"RGB" clips them at 255 (a 16-bit PNG of an
# ordinary picture would load as solid white). 16-bit ones are scaled to 8 bits (x/257: exact for an 8-bit
# picture saved as 16 bits); the others have no range dsfast can assume and are refused by name.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_REFUSED = {"I": "32-bit integer", "F": "32-bit float", "I;32": "32-bit integer", "I;32L": "32-bit integer",
            "I;32B": "32-bit integer"}


def _open(path: Path, mode: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in _REFUSED:
                raise ImageFolderError(f"cannot read image {path}: {_REFUSED[im.mode]} pixels (PIL mode {im.mode!r}) "
                                       "have no known range; save it as an 8- or 16-bit image")
            if im.mode in _SIXTEEN_BIT:
                im = im.point(lambda v: v / 257)  # 0..65535 -> 0..255, still a 16-bit image
            return im.convert(mode)
    except ImageFolderError:
        raise
    except Exception as exc:  # PIL raises many types for a bad file
        raise ImageFolderError(f"cannot read image {path}: {exc}") from None


def _to_tensor(im, range01: bool) -> torch.Tensor:
    arr = np.asarray(im, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1) / 255.0
    return t if range01 else t * 2.0 - 1.0


def read_image(path: str | Path, *, channels: int = 3, size: int | tuple[int, int] | None = None,
               square: int | None = None, shorter: int | None = None, center_crop: bool = True,
               range01: bool = True) -> torch.Tensor:
    """One image as ``(channels, H, W)``.

    ``size`` resizes to exactly ``(H, W)`` (bicubic); ``square=R`` instead scales the shorter side to R
    and crops an R x R square (centred, or top-left when ``center_crop`` is False), as training does;
    ``shorter=R`` only scales the shorter side to R (random crops are taken from it).
    """
    from PIL import Image

    im = _open(Path(path), "RGB" if channels == 3 else "L")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        if im.size != (w, h):
            im = im.resize((w, h), Image.BICUBIC)
    elif square is not None or shorter is not None:
        r = square or shorter
        nh, nw, top, left = square_crop(im.size[1], im.size[0], r, center_crop)
        im = im.resize((nw, nh), Image.BICUBIC)
        if square is not None:
            im = im.crop((left, top, left + r, top + r))
    return _to_tensor(im, range01)


def square_crop(h: int, w: int, square: int, center_crop: bool = True) -> tuple[int, int, int, int]:
    """How :func:`read_image` makes an ``H x W`` image ``square``: ``(resized H, resized W, crop top, crop left)``
    (shorter side scaled to ``square``, then an R x R crop, centred or at the top left)."""
    scale = square / min(w, h)
    nw, nh = max(square, round(w * scale)), max(square, round(h * scale))
    top, left = ((nh - square) // 2, (nw - square) // 2) if center_crop else (0, 0)
    return nh, nw, top, left


def image_sizes(files: list[Path]) -> list[tuple[int, int]]:
    """``(H, W)`` of each file, reading headers only."""
    from PIL import Image

    sizes = []
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.append((im.size[1], im.size[0]))
        except Exception as exc:
            raise ImageFolderError(f"cannot read image {f}: {exc}") from None
    return sizes


def load_folder(folder: str | Path, *, what: str = "image folder", **read) -> tuple[torch.Tensor, list[Path]]:
    """Every image of ``folder`` stacked as ``(N, C, H, W)``, and their paths; ``read`` goes to :func:`read_image`.

    Without ``size``/``square`` all images must have the same size (else one error naming the sizes).
    """
    files = list_images(folder, what)
    images = [read_image(f, **read) for f in files]
    shapes = sorted({tuple(im.shape[1:]) for im in images})
    if len(shapes) > 1:
        raise ImageFolderError(f"{what}: images in {folder} have different sizes {shapes}; give a common size")
    return torch.stack(images), files


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Values in [0, 1] to uint8, rounded and clipped."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def make_grid(images: torch.Tensor, cols: int | None = None, pad: int = 0, background: float = 1.0) -> np.ndarray:
    """``(N, C, H, W)`` in [0, 1] -> a ``(rows*H, cols*W, 3)`` uint8 grid, ``pad`` pixels between cells."""
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.full((3, rows * (h + pad) - pad, cols * (w + pad) - pad), float(background))
    for k in range(n):
        r, q = divmod(k, cols)
        grid[:, r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = images[k].float().expand(3, h, w)
    return to_uint8(grid.permute(1, 2, 0))


def save_grid(images: torch.Tensor, path: str | Path, cols: int | None = None, pad: int = 0) -> Path:
    """Write :func:`make_grid` of ``images`` (in [0, 1]) as a PNG; the folder must exist."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(make_grid(images, cols, pad)).save(path)
    return path


def save_images(images: torch.Tensor, folder: str | Path, prefix: str = "") -> list[Path]:
    """Each image of ``(N, C, H, W)`` in [0, 1] as ``<folder>/<prefix><index:05d>.png``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        arr = to_uint8(im.float().permute(1, 2, 0))
        p = folder / f"{prefix}{i:05d}.png"
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(p)
        paths.append(p)
    return paths
