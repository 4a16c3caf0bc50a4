"""The released unconditional DomainStudio step (``training_fewshot_losses`` of bbzhu-jy16/DomainStudio at
cc69341), on an unconditional UNet2DModel.

It differs from :class:`~dsfast.train.methods.domainstudio.DomainStudio` in: the pairwise terms are taken within
each micro-batch (the released per-GPU batch), on a random subset of 3 of its samples, with the source
side's gradient kept; the source copy is in train mode (dropout active); a model that learns sigma gets
L_simple + L_vlb + λ_img·KL_img + λ_hf·KL_hf + λ_hfmse·hfMSE (unweighted), a fixed-sigma model
L_simple + λ_img·KL_img only.
"""
from __future__ import annotations

from ...data import to_device
from ...families import UNCONDITIONAL
from ..base import OfficialPairwise
from ..domainstudio import DomainStudio

SIM_SIZE = 3  # the released code's subset of each per-GPU batch entering the pairwise terms


class OfficialDomainStudio(DomainStudio):
    kinds = (UNCONDITIONAL,)
    mode = "official"

    def __init__(self, *, bundle, **kw):
        super().__init__(bundle=bundle, **kw)
        self.has_global = False  # every term is local to the micro-batch
        if bundle.source is not None:
            bundle.source.train()  # as released: the source copy is in train mode (dropout active)
        self.pairwise = OfficialPairwise(self.loss)

    def micro_batch(self, step, ks):
        mb = super().micro_batch(step, ks)
        if self.terms.pairwise:
            mb["subset"] = to_device(self.draws.subset(step, ks[0], len(ks), SIM_SIZE), self.device)
        return mb

    def forward(self, model, mb, need_source):
        out, x_t, eps, _, _ = self.denoise(model, mb)
        t, lam = mb["t"], self.loss
        full = "vlb" in out.terms  # the released code drops hf and hf-MSE for a fixed-sigma model
        if not ((lam.hfmse > 0 and full) or self.terms.pairwise):
            return out
        ada = self.process.x0(eps, x_t, t)
        if lam.hfmse > 0 and full:
            self.add_hfmse(out, ada, mb)
        if self.terms.pairwise:
            image, hf = self.pairwise(self.source_x0(model, mb, x_t, t, None, None), ada, mb["subset"])
            for key, weight, value in (("image", lam.image, image), ("hf", lam.hf if full else 0.0, hf)):
                if weight > 0:
                    out.loss = out.loss + weight * value
                    out.terms[key], out.heads[key] = value, weight * value
        return out
