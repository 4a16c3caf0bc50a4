"""DomainStudio, for every model family.

Loss = the diffusion loss (+ λ_prior · class MSE) + λ_img·KL_pair(x̂0_src, x̂0_ada) + λ_hf·KL_pair(hf x̂0_src,
hf x̂0_ada) + λ_hfmse·mean_i w_t·hfMSE(x̂0_ada, real), x̂0 from the family's noise process, w_t per
``loss.hfmse_weighting``. With a pairwise term on, the three DomainStudio terms are one ``DomainStudioLoss``
call on the gathered global batch (each micro-batch's forward gives its x̂0, real x0 and hf-MSE weights);
with only the hf-MSE on, it is added to each micro-batch's per-sample loss. ``loss.space=pixel`` decodes the
latents with the VAE *with gradients* (checkpointed), ``latent`` compares latents (unet2d diffuses pixels: both are pixels).
Source side (``loss.source``): ``frozen`` (a frozen copy of the pretrained denoiser on the same x_t, with
the class prompt; unet2d's only one), ``class_prompt`` (the class-prompt predictions of the same batch, no
grad) or ``lora_off`` (the trained denoiser with its LoRA adapters disabled, class prompt); without a class
prompt ``frozen`` and ``lora_off`` take the instance conditioning (each image's caption with
``data.captions``). The released steps (``loss.mode=official``) are in ``methods/official/``.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..errors import ConfigError
from ..families import TEXT2IMAGE, UNCONDITIONAL
from .base import DomainStudioTerms, Needs, hfmse_weights, weighted_hf_mse
from .denoise import DenoisingLossConfig, DenoisingMethod


class DomainStudioLossConfig(DenoisingLossConfig):
    """The ``loss`` section of ``method: domainstudio``."""

    image: float | None = Field(None, description="lambda_img: pairwise-similarity KL of x0")
    hf: float | None = Field(None, description="lambda_hf: pairwise-similarity KL of hf(x0)")
    hfmse: float | None = Field(None, description="lambda_hfmse: MSE of hf(x0) to its real image")
    hfmse_weighting: Literal["none", "min_snr"] | None = Field(None, description="per-sample hf-MSE weight: none | min_snr (x min(SNR_t, 1)); None = min_snr on DDPM families, none on flow-matching ones and in official mode")
    stencil: Literal["domainstudio", "pywt"] = Field("domainstudio", description="hf stencil: the official code's or pywt bands'")
    space: Literal["pixel", "latent"] | None = Field(None, description="text-to-image: pixel (decode x0 with the VAE, with gradients, as released) | latent (compare latents: cheaper); None = pixel on sd, latent on sdxl/sd3/flux")
    source: Literal["frozen", "class_prompt", "lora_off"] | None = Field(None, description="the source side: frozen (a frozen copy) | class_prompt (the class-prompt predictions of the adapted model, as released for text-to-image) | lora_off (the same denoiser with its LoRA adapters off: no second copy)")
    tau: float = Field(1.0, description="softmax temperature of the pairwise similarities")
    direction: Literal["source||adapted", "adapted||source"] = Field("source||adapted", description="KL direction (default: as the official code)")
    reduction: Literal["mean", "batchmean", "sum"] = Field("mean", description="KL reduction (official: mean)")
    num_anchors: int | None = Field(None, ge=1, description="random anchor rows of the pairwise loss (None = all)")
    backend: str = Field("auto", description="dsfast.ops backend: auto | torch | cpp | triton | cuda")


class DomainStudio(DenoisingMethod):
    name = "domainstudio"
    loss_config = DomainStudioLossConfig
    defaults = {UNCONDITIONAL: dict(image=4.0, hf=4.0, hfmse=1.0, prior=0.0, source="frozen", lr=1e-4, ema=0.9999,
                                    batch_size=4),
                TEXT2IMAGE: dict(image=100.0, hf=100.0, hfmse=0.1, prior=1.0, source="class_prompt", lr=5e-6, ema=0.0,
                                 batch_size=4)}

    @classmethod
    def needs(cls, loss) -> Needs:
        pairwise = loss.image > 0 or loss.hf > 0
        return Needs(class_images=loss.prior > 0 or loss.source == "class_prompt",
                     frozen_source=pairwise and loss.source == "frozen", pairwise=pairwise)

    @classmethod
    def check(cls, loss, data, kind) -> None:
        super().check(loss, data, kind)
        if kind == UNCONDITIONAL and loss.source != "frozen":
            raise ConfigError("loss.source must be 'frozen' for an unconditional model")

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
        if not self.has_global:  # the hf-MSE alone: per sample, within the micro-batch
            self.add_hfmse(out, ada, mb)
            return out
        out.adapted = ada
        if lam.hfmse > 0:
            out.real, out.hfmse_weights = self.hfmse_inputs(ada, mb)
        if need_source:
            with torch.no_grad():
                src = self.source_x0(model, mb, zt, t, zct, pred_c)
                out.source = self.family.decode(src, False) if self.pixel else src
        return out

    def hfmse_inputs(self, ada, mb) -> tuple[torch.Tensor, torch.Tensor]:
        """The hf-MSE's target (the real x0, in ``ada``'s dtype) and per-sample weights w_t."""
        real = (mb["x0"] if self.pixel else mb["z"]).to(ada.dtype)
        return real, hfmse_weights(self.process, mb["t"], self.loss.hfmse_weighting, ada.device)

    def add_hfmse(self, out, ada, mb) -> None:
        """Adds λ_hfmse·mean_i w_t·hfMSE(ada_i, real_i) of the micro-batch to ``out`` (its per-sample loss)."""
        lam = self.loss
        real, w = self.hfmse_inputs(ada, mb)
        hfmse = weighted_hf_mse(ada, real, w, lam.stencil, lam.backend)
        out.loss = out.loss + lam.hfmse * hfmse
        out.terms["hfmse"], out.heads["hfmse"] = hfmse, lam.hfmse * hfmse

    def source_x0(self, model, mb, zt, t, zct, pred_c):
        """Source x0 latents (no grad) per ``loss.source``."""
        if self.source == "class_prompt":
            return self.process.x0(pred_c.detach(), zct, t)
        cond = self.instance_cond(mb, self.emb_class)  # the class prompt where there is one
        if self.source == "frozen":
            s = self.family.predict(self.bundle.source, zt, t, cond)
        else:  # lora_off
            module = getattr(model, "module", model)
            module.disable_adapters()
            try:
                s = self.family.predict(model, zt, t, cond)
            finally:
                module.enable_adapters()
        return self.process.x0(self.family.split_output(s, zt.shape[1])[0], zt, t)

    def global_loss(self, source, adapted, real, hfmse_weights, step):
        return self.terms(source, adapted, real, hfmse_weights, step)
