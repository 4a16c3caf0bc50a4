"""DomainStudio on a Stable-Diffusion-family pipeline (text-to-image).

Loss = instance MSE + λ_prior · class MSE + λ_hfmse·w_t·hfMSE(x0, real) per sample (w_t per
``loss.hfmse_weighting``) + the pairwise DomainStudio terms on the global batch, on x0
latents from the scheduler parameterisation; ``loss.space=pixel`` decodes them with the VAE *with
gradients* (checkpointed), ``latent`` compares latents. Source side (``loss.source``):
``class_prompt`` (official: the class-prompt predictions of the same batch, no grad), ``frozen``
(a frozen pretrained UNet on the instance x_t with the class prompt) or ``lora_off`` (the trained
UNet with its LoRA adapters disabled, class prompt); without a class prompt these two take the instance
conditioning (each image's caption with ``data.captions``). Captions are refused in official mode.

The released step (``loss.mode=official``) is
:class:`dsfast.train.methods.official.sd.OfficialDomainStudioSD`.
"""
from __future__ import annotations

import torch

from ..families.base import expand
from .base import DomainStudioTerms, Needs, hfmse_weights, weighted_hf_mse
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

    def __init__(self, *, bundle, images, draws, loss, data, sample, dtype, device):
        super().__init__(bundle=bundle, images=images, draws=draws, loss=loss, data=data, sample=sample, dtype=dtype,
                         device=device)
        self.loss, self.draws = loss, draws
        self.terms = DomainStudioTerms(loss, draws)
        self.has_global = self.terms.pairwise
        self.global_weights = self.terms.weights
        self.pixel, self.source = loss.space == "pixel", loss.source

    def forward(self, model, mb, need_source):
        out, zt, pred_i, zct, pred_c = self.denoise(model, mb)
        lam = self.loss
        if not (self.has_global or lam.hfmse > 0):
            return out
        t = mb["t"]
        x0_lat = self.process.x0(pred_i, zt, t)
        ada = self.family.decode(x0_lat, torch.is_grad_enabled()) if self.pixel else x0_lat
        if lam.hfmse > 0:
            w = hfmse_weights(self.process, t, lam.hfmse_weighting, ada.device)
            hfmse = weighted_hf_mse(ada, mb["x0"] if self.pixel else mb["z"], w, lam.stencil, lam.backend)
            out.loss = out.loss + lam.hfmse * hfmse
            out.terms["hfmse"], out.heads["hfmse"] = hfmse, lam.hfmse * hfmse
        if not self.has_global:
            return out
        out.adapted = ada
        if need_source:
            with torch.no_grad():
                src = self.source_x0(model, mb, zt, t, zct, pred_c)
                out.source = self.family.decode(src, False) if self.pixel else src
        return out

    def source_x0(self, model, mb, zt, t, zct, pred_c):
        """Source x0 latents (no grad) per ``loss.source``."""
        if self.source == "class_prompt":
            return self.process.x0(pred_c.detach(), zct, t)
        cond = self.instance_cond(mb) if self.emb_class is None else expand(self.emb_class, zt.shape[0])
        if self.source == "frozen":
            s = self.family.predict(self.bundle.source, zt, t, cond)
        else:  # lora_off
            module = getattr(model, "module", model)
            module.disable_adapters()
            try:
                s = self.family.predict(model, zt, t, cond)
            finally:
                module.enable_adapters()
        return self.process.x0(s, zt, t)

    def global_loss(self, source, adapted, real, step):
        return self.terms(source, adapted, real, step)
