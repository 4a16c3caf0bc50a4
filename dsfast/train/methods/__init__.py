"""Training methods, one file each, written once for every model family (through ``dsfast.train.families``);
the released steps of ``loss.mode=official`` are their own classes in ``official/``. The registry maps
(config ``method``, the model's kind: unconditional or text-to-image, ``loss.mode``) to the class.

A new method: a file here with a :class:`~dsfast.train.methods.base.Method` subclass (``name``, ``kinds``,
``loss_config`` (its config keys), ``defaults`` per kind, ``needs``, ``forward``, optionally ``global_loss``; usually a
:class:`~dsfast.train.methods.denoise.DenoisingMethod`), added to ``METHODS``.
"""
from __future__ import annotations

from .. import families
from ..errors import ConfigError
from ..families import TEXT2IMAGE
from .base import Method, MicroOut, Needs
from .domainstudio import DomainStudio
from .dreambooth import DreamBooth
from .finetune import Finetune
from .official import OfficialDomainStudio, OfficialDomainStudioSD, OfficialDreamBooth, OfficialFinetuneSD

METHODS: tuple[type[Method], ...] = (DomainStudio, DreamBooth, Finetune, OfficialDomainStudio, OfficialDomainStudioSD,
                                     OfficialDreamBooth, OfficialFinetuneSD)
NAMES = tuple(sorted({m.name for m in METHODS}))
LOSS_CONFIGS = {m.name: m.loss_config for m in METHODS if m.mode == "dsfast"}  # method -> its loss section


def _loss_keys() -> dict[str, tuple]:
    """Every key of the loss sections -> (its pydantic field, as the first method that has it declares it; the
    methods that have it)."""
    keys: dict[str, tuple] = {}
    for name, section in LOSS_CONFIGS.items():
        for key, field in section.model_fields.items():
            keys.setdefault(key, (field, []))[1].append(name)
    return keys


LOSS_KEYS = _loss_keys()


def get(name: str, family: str, mode: str = "dsfast") -> type[Method]:
    """The method class of config ``method`` for a model of ``family`` (a family name, e.g. ``sdxl``) in ``loss.mode``
    ``mode``: the released step's own class where there is one for the model's kind, else the method's."""
    kind = families.get(family).kind
    fits = [m for m in METHODS if m.name == name and kind in m.kinds]
    for m in [m for m in fits if m.mode == mode] + [m for m in fits if m.mode == "dsfast"]:
        return m
    if name not in NAMES:
        raise ConfigError(f"config key 'method' must be one of {', '.join(NAMES)}; got {name!r}")
    need = "a text-to-image" if kind != TEXT2IMAGE else "an unconditional"
    raise ConfigError(f"method '{name}' needs {need} model; the pretrained model is {family} ({kind})")


__all__ = ["LOSS_CONFIGS", "LOSS_KEYS", "METHODS", "NAMES", "Method", "MicroOut", "Needs", "get"]
