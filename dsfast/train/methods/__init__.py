"""Training methods, one file each; the registry maps (config ``method``, the kind of model: unconditional or
text-to-image) to the class. A text-to-image method trains every text-to-image family (sd, sdxl, sd3, flux)
through the family interface (``dsfast.train.families``).

A new method: a file here with a :class:`~dsfast.train.methods.base.Method` subclass (``name``,
``family``, ``defaults``, ``needs``, ``forward``, optionally ``global_loss``), added to ``METHODS``.
"""
from __future__ import annotations

from .. import families
from ..errors import ConfigError
from ..families import TEXT2IMAGE
from .base import Method, MicroOut, Needs
from .domainstudio import DomainStudio
from .domainstudio_sd import DomainStudioSD
from .dreambooth import DreamBooth
from .finetune import Finetune, FinetuneSD
from .official import OfficialDomainStudio, OfficialDomainStudioSD, OfficialDreamBooth, OfficialFinetuneSD

METHODS: tuple[type[Method], ...] = (DomainStudio, DomainStudioSD, DreamBooth, Finetune, FinetuneSD,
                                     OfficialDomainStudio, OfficialDomainStudioSD, OfficialDreamBooth, OfficialFinetuneSD)
NAMES = tuple(sorted({m.name for m in METHODS}))


def get(name: str, family: str, mode: str = "dsfast") -> type[Method]:
    """The method class of config ``method`` for a model of ``family`` (a family name, e.g. ``sdxl``) in
    ``loss.mode`` ``mode``: the released step's own class where there is one (DomainStudio), else the method's
    (``official`` then only sets the released defaults)."""
    kind = families.get(family).kind
    found = [m for m in METHODS if m.name == name and m.family == kind and m.mode == "dsfast"]
    official = [m for m in METHODS if m.name == name and m.family == kind and m.mode == mode != "dsfast"]
    if official or found:
        return (official or found)[0]
    if name not in NAMES:
        raise ConfigError(f"config key 'method' must be one of {', '.join(NAMES)}; got {name!r}")
    need = "a text-to-image" if kind != TEXT2IMAGE else "an unconditional"
    raise ConfigError(f"method '{name}' needs {need} model; the pretrained model is {family} ({kind})")


__all__ = ["METHODS", "NAMES", "Method", "MicroOut", "Needs", "get"]
