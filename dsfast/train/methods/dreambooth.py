"""DreamBooth with prior preservation (Stable-Diffusion-family models only):
instance MSE + λ_prior · MSE on class images of the pretrained model (``PriorPreservationLoss``)."""
from __future__ import annotations

from .text2image import TextToImageMethod


class DreamBooth(TextToImageMethod):
    name = "dreambooth"
    defaults = dict(image=0.0, hf=0.0, hfmse=0.0, prior=1.0, source="frozen", lr=5e-6, ema=0.0, batch_size=1)
