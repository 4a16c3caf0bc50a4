"""DeepSpeed trainer for DomainStudio, DreamBooth and plain fine-tuning of diffusers models.

``train(config, overrides) -> run dir``; ``python -m dsfast.train --config run.yaml`` under
``deepspeed``/``torchrun``; ``dsfast train --config run.yaml [key=value ...] [--resume latest]``.
"""
from __future__ import annotations

from pathlib import Path


def train(config, overrides=(), *, resume: str | None = None) -> Path:
    """Train from a config dict or YAML path plus ``key=value`` overrides; returns the run folder."""
    from .trainer import train as _train

    return _train(config, overrides, resume=resume)


__all__ = ["train"]
