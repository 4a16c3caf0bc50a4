"""Plain fine-tuning: the diffusion loss only (L_simple, + L_vlb for learned-sigma UNet2DModels;
the instance MSE, + λ_prior · class MSE when ``loss.prior > 0``, on Stable-Diffusion-family models)."""
from __future__ import annotations

from .text2image import TextToImageMethod
from .unconditional import UnconditionalMethod

_OFF = dict(image=0.0, hf=0.0, hfmse=0.0, prior=0.0, source="frozen")


class Finetune(UnconditionalMethod):
    name = "finetune"
    defaults = dict(_OFF, lr=1e-4, ema=0.9999, batch_size=4)


class FinetuneSD(TextToImageMethod):
    name = "finetune"
    defaults = dict(_OFF, lr=5e-6, ema=0.0, batch_size=4)
