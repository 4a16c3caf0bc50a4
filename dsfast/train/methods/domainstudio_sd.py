"""DomainStudio on a Stable-Diffusion-family pipeline (text-to-image).

Loss = instance MSE + λ_prior · class MSE + the DomainStudio terms on the global batch, on x0
latents from the scheduler parameterisation; ``loss.space=pixel`` decodes them with the VAE *with
gradients* (checkpointed), ``latent`` compares latents. Source side (``loss.source``):
``class_prompt`` (official: the class-prompt predictions of the same batch, no grad), ``frozen``
(a frozen pretrained UNet on the instance x_t with the class prompt) or ``lora_off`` (the trained
UNet with its LoRA adapters disabled, class prompt).
"""
from __future__ import annotations

import torch

from ..diffusion import predicted_x0
from .base import DomainStudioTerms, MicroOut, Needs
from .text2image import TextToImageMethod


class DomainStudioSD(TextToImageMethod):
    name = "domainstudio"
    defaults = dict(image=100.0, hf=100.0, hfmse=0.1, prior=1.0, source="class_prompt", lr=5e-6, ema=0.0,
                    batch_size=4)

    @classmethod
    def needs(cls, loss) -> Needs:
        pairwise = loss.image > 0 or loss.hf > 0
        return Needs(prompts=True, class_images=loss.prior > 0 or loss.source == "class_prompt",
                     frozen_source=pairwise and loss.source == "frozen", pairwise=pairwise)

    def __init__(self, *, bundle, images, draws, loss, data, sample, dtype):
        super().__init__(bundle=bundle, images=images, draws=draws, loss=loss, data=data, sample=sample, dtype=dtype)
        self.terms = DomainStudioTerms(loss, draws)
        self.has_global = self.terms.active
        self.pixel, self.source = loss.space == "pixel", loss.source

    def forward(self, model, mb, need_source):
        loss, terms, zt, pred_i, zct, pred_c = self.denoise(model, mb)
        if not self.has_global:
            return MicroOut(loss=loss, terms=terms)
        sch, t = self.scheduler, mb["t"]
        x0_lat = predicted_x0(sch, pred_i, zt, t)
        ada = self.decode(x0_lat, torch.is_grad_enabled()) if self.pixel else x0_lat
        src = None
        if need_source and self.terms.pairwise:
            with torch.no_grad():
                src = self.source_x0(model, zt, t, zct, pred_c)
                src = self.decode(src, False) if self.pixel else src
        return MicroOut(loss=loss, terms=terms, adapted=ada, source=src, real=mb["x0"] if self.pixel else mb["z"])

    def source_x0(self, model, zt, t, zct, pred_c):
        """Source x0 latents (no grad) per ``loss.source``."""
        if self.source == "class_prompt":
            return predicted_x0(self.scheduler, pred_c.detach(), zct, t)
        emb = (self.emb_inst if self.emb_class is None else self.emb_class).expand(zt.shape[0], -1, -1)
        if self.source == "frozen":
            s = self.unet(self.bundle.source, zt, t, emb)
        else:  # lora_off
            module = getattr(model, "module", model)
            module.disable_adapters()
            try:
                s = self.unet(model, zt, t, emb)
            finally:
                module.enable_adapters()
        return predicted_x0(self.scheduler, s, zt, t)

    def global_loss(self, source, adapted, real, step):
        return self.terms(source, adapted, real, step)
