"""Plain fine-tuning: the diffusion loss only (L_simple, + L_vlb for learned-sigma UNet2DModels; the instance
MSE, + λ_prior · class MSE when ``loss.prior > 0``, on text-to-image models)."""
from __future__ import annotations

from ..families import TEXT2IMAGE, UNCONDITIONAL
from .denoise import DenoisingMethod


class Finetune(DenoisingMethod):
    name = "finetune"
    defaults = {UNCONDITIONAL: dict(prior=0.0, lr=1e-4, ema=0.9999, batch_size=4),
                TEXT2IMAGE: dict(prior=0.0, lr=5e-6, ema=0.0, batch_size=4)}
