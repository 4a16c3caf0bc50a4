"""DomainStudio on an unconditional UNet2DModel (pixel space).

loss = L_simple (+ L_vlb) + λ_hfmse·w_t·hfMSE(x0_ada, x0) per sample, plus λ_img·KL_pair(x0_src, x0_ada)
+ λ_hf·KL_pair(hf x0_src, hf x0_ada) on the global batch; source = a frozen copy of the pretrained UNet
(eval mode) on the same x_t; w_t per ``loss.hfmse_weighting``. The released step (``loss.mode=official``)
is :class:`dsfast.train.methods.official.unet2d.OfficialDomainStudio`.
"""
from __future__ import annotations

import torch

from .base import DomainStudioTerms, Needs, hfmse_weights, weighted_hf_mse
from .unconditional import UnconditionalMethod


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
        self.terms = DomainStudioTerms(loss, draws)
        self.has_global = self.terms.pairwise
        self.global_weights = self.terms.weights
        self.source = bundle.source

    def add_hfmse(self, out, ada, mb) -> None:
        """Adds λ_hfmse·w_t·hfMSE(x0_ada, x0) to ``out``."""
        lam = self.loss
        w = hfmse_weights(self.process, mb["t"], lam.hfmse_weighting, ada.device)
        hfmse = weighted_hf_mse(ada, mb["x0"], w, lam.stencil, lam.backend)
        out.loss = out.loss + lam.hfmse * hfmse
        out.terms["hfmse"], out.heads["hfmse"] = hfmse, lam.hfmse * hfmse

    def forward(self, model, mb, need_source):
        out, x_t, eps = self.denoise(model, mb)
        x0, t = mb["x0"], mb["t"]
        if not (self.loss.hfmse > 0 or self.terms.pairwise):
            return out
        ada = self.x0(eps, x_t, t)
        if self.loss.hfmse > 0:
            self.add_hfmse(out, ada, mb)
        if self.terms.pairwise:
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
