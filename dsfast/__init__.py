"""dsfast: fast, memory-lean few-shot adaptation of diffusion models (DomainStudio, DreamBooth).

The submodules and the loss classes load on first access (``dsfast.ops``, ``dsfast.DomainStudioLoss``),
so ``import dsfast`` and the ``dsfast`` command start without importing torch.
"""
import importlib

__version__ = "0.1.0"

_LOSSES = (
    "DomainStudioLoss",
    "DomainStudioLossOutput",
    "HighFrequencyMSELoss",
    "HighFrequencySimilarityLoss",
    "PairwiseSimilarityLoss",
    "PriorPreservationLoss",
)
__all__ = ["ops", "reference", *_LOSSES]


def __getattr__(name: str):
    if name in ("ops", "reference"):
        return importlib.import_module(f"dsfast.{name}")
    if name in _LOSSES:
        return getattr(importlib.import_module("dsfast.losses"), name)
    raise AttributeError(f"module 'dsfast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
