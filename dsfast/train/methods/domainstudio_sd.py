"""DomainStudio on a Stable-Diffusion-family pipeline (text-to-image).

Loss = instance MSE + λ_prior · class MSE + λ_hfmse·w_t·hfMSE(x0, real) per sample (w_t per
``loss.hfmse_weighting``) + the pairwise DomainStudio terms on the global batch, on x0
latents from the scheduler parameterisation; ``loss.space=pixel`` decodes them with the VAE *with
gradients* (checkpointed), ``latent`` compares latents. Source side (``loss.source``):
``class_prompt`` (official: the class-prompt predictions of the same batch, no grad), ``frozen``
(a frozen pretrained UNet on the instance x_t with the class prompt) or ``lora_off`` (the trained
UNet with its LoRA adapters disabled, class prompt); without a class prompt these two take the instance
conditioning (each image's caption with ``data.captions``). Captions are refused in official mode.

``loss.mode=official``: the released ``Text-to-Image/train_domainstudio.py`` (commit cc69341). The
pairwise/hf branch is a second UNet forward on the instance and class latents, noised with the same
noise at one t shared by the micro-batch; x0 = the scheduler's ``pred_original_sample`` (clipped when
the scheduler clips), decoded with gradients *without* dividing by the VAE scaling factor; the source
side is the class half of that forward, with gradients; KL_img / KL_hf = KL(p_class || p_instance) of
the decoded images / their hf maps; hf-MSE = MSE of hf(decoded instance x0) to hf of a different random
batch of instance images; L_simple and the prior loss use per-sample t (the class samples their own).
"""
from __future__ import annotations

import torch

from ..data import to_device
from ..diffusion import predicted_x0
from ..errors import ConfigError
from ..families.base import cat, expand
from .base import DomainStudioTerms, Needs, OfficialPairwise, hfmse_weights, weighted_hf_mse
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

    @classmethod
    def check(cls, loss, data) -> None:
        super().check(loss, data)
        if loss.mode == "official" and loss.source != "class_prompt":
            raise ConfigError("loss.mode=official on a text-to-image model uses loss.source=class_prompt (the "
                              f"released code); got {loss.source!r}")

    def __init__(self, *, bundle, images, draws, loss, data, sample, dtype, device):
        super().__init__(bundle=bundle, images=images, draws=draws, loss=loss, data=data, sample=sample, dtype=dtype,
                         device=device)
        self.loss, self.draws, self.images = loss, draws, images.to(device)
        self.terms = DomainStudioTerms(loss, draws)
        self.has_global = self.terms.pairwise and not self.official
        self.pairwise_official = OfficialPairwise(loss)
        self.global_weights = self.terms.weights
        self.pixel, self.source = loss.space == "pixel", loss.source

    def micro_batch(self, step, ks):
        mb = super().micro_batch(step, ks)
        if self.official:
            mb["t_shared"] = torch.full((len(ks),), self.draws.shared_t(step, ks[0]), dtype=torch.long,
                                        device=self.device)
            other = self.draws.other_batch(step, ks[0], self.images.shape[0], len(ks))
            mb["x_other"] = self.images[to_device(other, self.device)]
        return mb

    def forward(self, model, mb, need_source):
        out, zt, pred_i, zct, pred_c = self.denoise(model, mb)
        if self.official:
            return self.official_terms(model, mb, out)
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

    def official_terms(self, model, mb, out):
        """The released pairwise/hf branch, added to ``out`` (see the module docstring)."""
        lam, sch, t = self.loss, self.process.scheduler, mb["t_shared"]
        if "zc" not in mb:  # the released script runs the branch only with prior preservation
            return out
        m = t.shape[0]
        z_t = torch.cat([sch.add_noise(mb["z"], mb["noise"], t), sch.add_noise(mb["zc"], mb["noise_c"], t)])
        pred = self.family.predict(model, z_t, torch.cat([t, t]), cat(self.instance_cond(mb), expand(self.emb_class, m)))
        x0 = predicted_x0(sch, pred, z_t, torch.cat([t, t]))
        if sch.config.get("clip_sample", False):  # as DDPMScheduler.step's pred_original_sample
            r = sch.config.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-r, r)
        grad = torch.is_grad_enabled()
        inst, cls = self.family.decode(x0[:m], grad, unscale=False), self.family.decode(x0[m:], grad, unscale=False)
        image, hf = self.pairwise_official(cls, inst)
        hfmse = weighted_hf_mse(inst, mb["x_other"], torch.ones(m, device=inst.device), "domainstudio",
                                lam.backend)
        for key, weight, value in (("image", lam.image, image), ("hf", lam.hf, hf), ("hfmse", lam.hfmse, hfmse)):
            if weight > 0:
                out.loss = out.loss + weight * value
                out.terms[key], out.heads[key] = value, weight * value
        out.outputs = (*out.outputs, pred)
        return out
