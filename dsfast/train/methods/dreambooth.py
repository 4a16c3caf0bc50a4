"""DreamBooth with prior preservation (text-to-image models): instance MSE + λ_prior · MSE on class images of the
pretrained model (``PriorPreservationLoss``)."""
from __future__ import annotations

from ..families import TEXT2IMAGE
from .denoise import DenoisingMethod


class DreamBooth(DenoisingMethod):
    name = "dreambooth"
    kinds = (TEXT2IMAGE,)
    defaults = {TEXT2IMAGE: dict(image=0.0, hf=0.0, hfmse=0.0, prior=1.0, source="frozen", lr=5e-6, ema=0.0,
                                 batch_size=1)}
