"""DomainStudio on an unconditional UNet2DModel (pixel space).

Loss = L_simple (+ L_vlb) + λ_img·KL_pair(x0_src, x0_ada) + λ_hf·KL_pair(hf x0_src, hf x0_ada)
+ λ_hfmse·hfMSE(x0_ada, x0), the DomainStudio terms on the global batch; source = a frozen copy
of the pretrained UNet on the same x_t.
"""
from __future__ import annotations

import torch

from .base import DomainStudioTerms, MicroOut, Needs
from .unconditional import UnconditionalMethod


class DomainStudio(UnconditionalMethod):
    name = "domainstudio"
    defaults = dict(image=4.0, hf=4.0, hfmse=1.0, prior=0.0, source="frozen", lr=1e-4, ema=0.9999, batch_size=4)

    @classmethod
    def needs(cls, loss) -> Needs:
        pairwise = loss.image > 0 or loss.hf > 0
        return Needs(frozen_source=pairwise, pairwise=pairwise)

    def __init__(self, *, bundle, images, draws, loss, data, sample, dtype):
        super().__init__(bundle=bundle, images=images, draws=draws, loss=loss, data=data, sample=sample, dtype=dtype)
        self.terms = DomainStudioTerms(loss, draws)
        self.has_global = self.terms.active
        self.source = bundle.source

    def forward(self, model, mb, need_source):
        loss, terms, x_t, out = self.denoise(model, mb)
        x0, t = mb["x0"], mb["t"]
        if not self.has_global:
            return MicroOut(loss=loss, terms=terms)
        src = None
        if need_source and self.terms.pairwise:
            with torch.no_grad():
                s = self.source(x_t.to(self.dtype), t).sample.float()[:, :x0.shape[1]]
                src = self.x0(s, x_t, t)
        return MicroOut(loss=loss, terms=terms, adapted=self.x0(out, x_t, t), source=src, real=x0)

    def global_loss(self, source, adapted, real, step):
        return self.terms(source, adapted, real, step)
