"""DomainStudio on an unconditional UNet2DModel (pixel space).

``loss.mode=dsfast``: loss = L_simple (+ L_vlb) + λ_hfmse·w_t·hfMSE(x0_ada, x0) per sample, plus
λ_img·KL_pair(x0_src, x0_ada) + λ_hf·KL_pair(hf x0_src, hf x0_ada) on the global batch; source = a
frozen copy of the pretrained UNet (eval mode) on the same x_t; w_t per ``loss.hfmse_weighting``.

``loss.mode=official``: the released step (DomainStudio ``training_fewshot_losses``, commit cc69341):
the pairwise terms within each micro-batch on a random subset of 3 of its samples, the source copy in
train mode (dropout active); a model that learns sigma gets L_simple + L_vlb + λ_img·KL_img + λ_hf·KL_hf
+ λ_hfmse·hfMSE, a fixed-sigma model L_simple + λ_img·KL_img only.
"""
from __future__ import annotations

import torch

from ..data import to_device
from .base import DomainStudioTerms, Needs, OfficialPairwise, hfmse_weights, weighted_hf_mse
from .unconditional import UnconditionalMethod

SIM_SIZE = 3  # the released code's subset of each per-GPU batch entering the pairwise terms


class DomainStudio(UnconditionalMethod):
    name = "domainstudio"
    defaults = dict(image=4.0, hf=4.0, hfmse=1.0, prior=0.0, source="frozen", lr=1e-4, ema=0.9999, batch_size=4)

    @classmethod
    def needs(cls, loss) -> Needs:
        pairwise = loss.image > 0 or loss.hf > 0
        return Needs(frozen_source=pairwise, pairwise=pairwise)

    def __init__(self, *, bundle, images, draws, loss, data, sample, dtype, device):
        super().__init__(bundle=bundle, images=images, draws=draws, loss=loss, data=data, sample=sample, dtype=dtype,
                         device=device)
        self.loss, self.draws = loss, draws
        self.official = loss.mode == "official"
        self.terms = DomainStudioTerms(loss, draws)
        self.has_global = self.terms.pairwise and not self.official
        self.global_weights = self.terms.weights
        self.source = bundle.source
        if self.official and self.source is not None:
            self.source.train()  # as released: the source copy is in train mode (dropout active)
        self.pairwise_official = OfficialPairwise(loss)

    def micro_batch(self, step, ks):
        mb = super().micro_batch(step, ks)
        if self.official and self.terms.pairwise:
            mb["subset"] = to_device(self.draws.subset(step, ks[0], len(ks), SIM_SIZE), self.device)
        return mb

    def forward(self, model, mb, need_source):
        out, x_t, eps = self.denoise(model, mb)
        x0, t = mb["x0"], mb["t"]
        full = "vlb" in out.terms or not self.official  # the released code drops hf and hf-MSE for fixed sigma
        lam = self.loss
        if lam.hfmse > 0 or self.terms.pairwise:
            ada = self.x0(eps, x_t, t)
        if lam.hfmse > 0 and full:
            w = hfmse_weights(self.process, t, lam.hfmse_weighting, x0.device)
            hfmse = weighted_hf_mse(ada, x0, w, lam.stencil, lam.backend)
            out.loss = out.loss + lam.hfmse * hfmse
            out.terms["hfmse"], out.heads["hfmse"] = hfmse, lam.hfmse * hfmse
        if not self.terms.pairwise:
            return out
        if self.official:
            image, hf = self.pairwise_official(self.source_x0(x_t, t, x0.shape[1]), ada, mb["subset"])
            for key, weight, value in (("image", lam.image, image), ("hf", lam.hf if full else 0.0, hf)):
                if weight > 0:
                    out.loss = out.loss + weight * value
                    out.terms[key], out.heads[key] = value, weight * value
            return out
        out.adapted = ada
        if need_source:
            out.source = self.source_x0(x_t, t, x0.shape[1])
        return out

    def source_x0(self, x_t, t, channels):
        with torch.no_grad():
            s = self.family.predict(self.source, x_t, t, {})[:, :channels]
            return self.x0(s, x_t, t)

    def global_loss(self, source, adapted, real, step):
        return self.terms(source, adapted, real, step)
