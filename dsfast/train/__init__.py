"""DeepSpeed trainer for DomainStudio, DreamBooth and plain fine-tuning of diffusers models.

``train(config, overrides) -> run dir``; ``python -m dsfast.train --config run.yaml`` under
``deepspeed``/``torchrun``; ``dsfast train --config run.yaml [key=value ...] [--resume latest]``.

Layout, bottom to top: ``errors``, ``distributed``, ``diffusion`` (x0, targets, L_vlb), ``data``
(images, per-sample draws, micro-batches), ``models`` (loading, LoRA, EMA, export), ``checkpoint``,
``sample``; ``methods/`` (one file per training method, and the registry); ``config`` (schema and
the resolve step); ``engine`` (DeepSpeed, the step loop, logging); ``cli``.
"""
from . import distributed as _distributed

_distributed.accelerator_env()  # before DeepSpeed is first imported (below)

from .engine import train  # noqa: E402

__all__ = ["train"]
