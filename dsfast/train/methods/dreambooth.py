"""DreamBooth with prior preservation (text-to-image models): instance MSE + λ_prior · MSE on class images of the
pretrained model (``PriorPreservationLoss``)."""
from __future__ import annotations

from ..families import TEXT2IMAGE
from .denoise import DenoisingMethod


class DreamBooth(DenoisingMethod):
    name = "dreambooth"
    kinds = (TEXT2IMAGE,)
    defaults = {TEXT2IMAGE: dict(prior=1.0, lr=5e-6, ema=0.0, batch_size=1)}
