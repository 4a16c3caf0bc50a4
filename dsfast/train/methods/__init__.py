"""Training methods, one file each; the registry maps (config ``method``, model family) to the class.

A new method: a file here with a :class:`~dsfast.train.methods.base.Method` subclass (``name``,
``family``, ``defaults``, ``needs``, ``forward``, optionally ``global_loss``), added to ``METHODS``.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..models import TEXT2IMAGE
from .base import Method, MicroOut, Needs
from .domainstudio import DomainStudio
from .domainstudio_sd import DomainStudioSD
from .dreambooth import DreamBooth
from .finetune import Finetune, FinetuneSD

METHODS: tuple[type[Method], ...] = (DomainStudio, DomainStudioSD, DreamBooth, Finetune, FinetuneSD)
NAMES = tuple(sorted({m.name for m in METHODS}))


def get(name: str, family: str) -> type[Method]:
    """The method class of config ``method`` for a model of ``family``."""
    for m in METHODS:
        if m.name == name and m.family == family:
            return m
    if name not in NAMES:
        raise ConfigError(f"config key 'method' must be one of {', '.join(NAMES)}; got {name!r}")
    kind = "a text-to-image (Stable Diffusion family)" if family != TEXT2IMAGE else "an unconditional"
    raise ConfigError(f"method '{name}' needs {kind} model; the pretrained model is {family}")


__all__ = ["METHODS", "NAMES", "Method", "MicroOut", "Needs", "get"]
