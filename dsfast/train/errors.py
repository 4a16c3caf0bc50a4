"""The trainer's user-facing errors; ``dsfast train`` prints them as one line and exits 1."""
from __future__ import annotations

from dsfast.images import ImageFolderError


class ConfigError(ValueError):
    """A bad configuration value or an unknown key (the message names the key)."""


class DataError(ImageFolderError):
    """Bad training data (missing folder, no images, a corrupt image, too few images)."""


class ModelError(ValueError):
    """The pretrained model cannot be used (not a diffusers pipeline, unsupported family or option)."""


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message names the last good checkpoint."""


class NonFiniteLoss(FloatingPointError):
    """A loss or x0 prediction is NaN/inf on some rank (raised on every rank alike)."""


USER_ERRORS = (ConfigError, ImageFolderError, ModelError, TrainingError)
