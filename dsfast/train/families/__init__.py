"""Model families, one file each; the registry recognises a pipeline folder by its ``model_index.json``.

A new family: a file here with a :class:`~dsfast.train.families.base.Family` subclass, and its class in
``FAMILIES`` (the first family whose ``matches`` accepts a folder takes it).
"""
from __future__ import annotations

from diffusers import DiffusionPipeline

from ..errors import ConfigError, ModelError
from .base import QUANTIZERS, TEXT2IMAGE, UNCONDITIONAL, Family, FamilyOptions, ModelInfo, model_index
from .flux import Flux
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL
from .unet2d import UNet2D, down_factor

FAMILIES: tuple[type[Family], ...] = (UNet2D, SD, SDXL, SD3, Flux)
NAMES = tuple(f.name for f in FAMILIES)


def get(name: str) -> type[Family]:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ConfigError(f"unknown model family {name!r} (known: {', '.join(NAMES)})")


def family_of(pretrained: str, index: dict | None = None) -> type[Family]:
    index = model_index(pretrained) if index is None else index
    for f in FAMILIES:
        if f.matches(index):
            return f
    raise ModelError(f"unsupported pipeline {index.get('_class_name')}: dsfast trains "
                     f"{', '.join(NAMES)} (UNet2DModel + scheduler, Stable Diffusion 1/2, SDXL, SD3, FLUX.1)")


def load_pipeline(folder: str, **kwargs):
    """``DiffusionPipeline.from_pretrained(folder)`` with the parts the folder saved as absent passed as None (an SD3
    pipeline without T5 cannot be loaded otherwise)."""
    absent = {k: None for k, v in model_index(folder).items()
              if not k.startswith("_") and isinstance(v, (list, tuple)) and v[0] is None}
    return DiffusionPipeline.from_pretrained(folder, **{**absent, **kwargs})


def describe(pretrained: str) -> ModelInfo:
    """What the pipeline folder (or cached hub id) ``pretrained`` is, from its config files."""
    index = model_index(pretrained)
    return family_of(pretrained, index).info(pretrained, index)


__all__ = ["FAMILIES", "NAMES", "QUANTIZERS", "TEXT2IMAGE", "UNCONDITIONAL", "Family", "FamilyOptions", "ModelInfo", "describe",
           "down_factor", "family_of", "get",
           "load_pipeline"]
