"""Loading a folder of images for evaluation, with clear errors for bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageFolderError(ValueError):
    """A folder of images could not be used (missing, empty, or an unreadable file)."""


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly in ``directory`` (by extension, case-insensitive), sorted by name."""
    directory = Path(directory)
    if not directory.exists():
        raise ImageFolderError(f"image folder not found: {directory}")
    if not directory.is_dir():
        raise ImageFolderError(f"not a folder: {directory}")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ImageFolderError(
            f"no images in {directory} (looked for {', '.join(IMAGE_EXTENSIONS)} files directly in the folder)")
    return files


def read_image(path: str | Path, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """One image as a ``(3, H, W)`` float32 tensor in [0, 1]; RGB (alpha dropped, grey expanded).

    ``size`` (``(H, W)`` or one int) resizes with a bicubic, antialiased filter.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
            if size is not None:
                h, w = (size, size) if isinstance(size, int) else size
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageFolderError(f"cannot read image file {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def image_sizes(files: list[Path]) -> list[tuple[int, int]]:
    """``(H, W)`` of each file (header only)."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.append((im.size[1], im.size[0]))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageFolderError(f"cannot read image file {f}: {e}") from e
    return sizes


def load_folder(directory: str | Path, size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, list[Path]]:
    """All images of a folder as ``(N, 3, H, W)`` in [0, 1] plus their paths (sorted by name).

    Without ``size`` every image must have the same size (else a clear error); with it all are resized.
    """
    files = list_images(directory)
    images = [read_image(f, size) for f in files]
    shapes = {tuple(im.shape[1:]) for im in images}
    if len(shapes) > 1:
        raise ImageFolderError(
            f"images in {directory} have different sizes {sorted(shapes)}; pass a common size (--size) to resize")
    return torch.stack(images), files
