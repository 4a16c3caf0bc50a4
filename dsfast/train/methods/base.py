"""What a training method is: the interface the engine drives, and the DomainStudio terms two methods share.

A method is a class with

* ``name`` (the config's ``method``), ``family`` (the model kind it trains: ``unconditional`` or
  ``text2image``) and ``defaults`` (the official values of the config keys left empty);
* ``needs(loss)``: what it needs from the model and data (a frozen source UNet? class images?
  prompts? batch-coupled terms?), and ``check(loss, data)`` for errors found at resolve time;
* ``__init__(bundle=, images=, draws=, loss=, data=, sample=, dtype=)``: set-up before the engine exists
  (caching latents, generating class images);
* ``micro_batch(step, ks)``: the inputs of global samples ``ks`` of ``step``;
* ``forward(model, mb, need_source)``: one micro-batch's per-sample loss and its x0 features;
* ``has_global`` / ``global_loss(source, adapted, real, step)``: terms of the whole gathered global batch
  (the engine runs them with exact gradients whatever the ranks and micro-batches).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dsfast.losses import DomainStudioLoss

from ..data import Draws


@dataclass(frozen=True)
class Needs:
    prompts: bool = False  # data.instance_prompt (text-to-image)
    class_images: bool = False  # data.class_prompt and class images (prior preservation / class-prompt source)
    frozen_source: bool = False  # a frozen copy of the pretrained UNet
    pairwise: bool = False  # batch-coupled terms: at least 3 images and a global batch of at least 3


@dataclass
class MicroOut:
    loss: torch.Tensor  # scalar: this micro-batch's per-sample terms (means over the micro-batch)
    terms: dict = field(default_factory=dict)  # name -> scalar tensor, for logging
    adapted: torch.Tensor | None = None  # (m, ...) x0 features entering the global terms (with grad)
    source: torch.Tensor | None = None  # (m, ...) source x0 features (no grad); None if not needed
    real: torch.Tensor | None = None  # (m, ...) the real x0 the hf-MSE compares with


class Method:
    name: ClassVar[str]
    family: ClassVar[str]
    defaults: ClassVar[dict]
    has_global: bool = False

    @classmethod
    def needs(cls, loss) -> Needs:
        return Needs()

    @classmethod
    def check(cls, loss, data) -> None:
        """Raise ConfigError for a resolved config this method cannot train."""

    def micro_batch(self, step: int, ks) -> dict:
        raise NotImplementedError

    def forward(self, model, mb: dict, need_source: bool) -> MicroOut:
        raise NotImplementedError

    def global_loss(self, source, adapted, real, step: int):
        raise NotImplementedError


class DomainStudioTerms:
    """``dsfast.losses.DomainStudioLoss`` on the gathered global batch: λ_img·KL_pair(x0_src, x0_ada)
    + λ_hf·KL_pair(hf x0_src, hf x0_ada) + λ_hfmse·hfMSE(x0_ada, x0); anchor rows drawn per step."""

    def __init__(self, loss, draws: Draws):
        self.fn = DomainStudioLoss(lambda_img=loss.image, lambda_hf=loss.hf, lambda_hfmse=loss.hfmse,
                                   stencil=loss.stencil, tau=loss.tau, direction=loss.direction,
                                   reduction=loss.reduction, backend=loss.backend)
        self.num_anchors, self.draws = loss.num_anchors, draws
        self.pairwise = loss.image > 0 or loss.hf > 0
        self.active = self.pairwise or loss.hfmse > 0

    def __call__(self, source, adapted, real, step: int):
        anchors = self.draws.anchors(step, adapted.shape[0], self.num_anchors)
        out = self.fn(adapted.detach() if source is None else source, adapted, real,
                      anchors=None if anchors is None else anchors.to(adapted.device))
        terms = {}
        for key, weight, value in (("image", self.fn.lambda_img, out.image), ("hf", self.fn.lambda_hf,
                                   out.high_frequency), ("hfmse", self.fn.lambda_hfmse, out.hf_mse)):
            if weight > 0:
                terms[key] = value
        return out.total, terms
