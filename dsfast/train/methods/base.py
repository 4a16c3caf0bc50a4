"""What a training method is: the interface the engine drives, and the DomainStudio terms the corrected and the
released DomainStudio steps share.

A method is a class with

* ``name`` (the config's ``method``), ``kinds`` (the kinds of model it trains: ``unconditional``,
  ``text2image``), ``mode`` (``dsfast``, or ``official`` for the released step), ``loss_config`` (the pydantic
  schema of its ``loss`` section: the config is discriminated on ``method``) and ``defaults`` (per kind, the
  values of its ``loss`` keys and of ``train.lr`` / ``train.ema`` / ``train.batch_size`` left empty);
* ``needs(loss)``: what it needs from the model and data (a frozen source denoiser? class images? batch-coupled
  terms?), and ``check(loss, data, kind)`` for errors found at resolve time;
* ``__init__(bundle=, images=, draws=, loss=, data=, sample=, dtype=, device=)``: set-up before the engine
  exists (caching latents, generating class images), everything it keeps on the training ``device``;
* ``micro_batch(step, ks)``: the inputs of global samples ``ks`` of ``step``, on the training device;
* ``forward(model, mb, need_source)``: one micro-batch's per-sample loss and its x0 features;
* ``has_global`` / ``global_loss(source, adapted, real, hfmse_weights, step)``: terms of the whole gathered
  global batch (the engine gathers each micro-batch's ``MicroOut`` features across micro-batches and ranks and
  runs them with exact gradients whatever the ranks and micro-batches), and ``global_weights`` (their λ, for
  the logged gradient norms).

``MicroOut.heads`` (the per-sample terms times their λ) and ``MicroOut.outputs`` (the UNet outputs they
come from) give the logged ``grad_norm/<term>``: the norm of d(λ·term)/d(UNet output) over the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dsfast import ops
from dsfast.losses import DomainStudioLoss

from ..data import Draws, to_device


@dataclass(frozen=True)
class Needs:
    class_images: bool = False  # data.class_prompt and class images (prior preservation / class-prompt source)
    frozen_source: bool = False  # a frozen copy of the pretrained UNet
    pairwise: bool = False  # batch-coupled terms: at least 3 images and a global batch of at least 3


@dataclass
class MicroOut:
    loss: torch.Tensor  # scalar: this micro-batch's per-sample terms (means over the micro-batch)
    terms: dict = field(default_factory=dict)  # name -> scalar tensor, for logging
    adapted: torch.Tensor | None = None  # (m, ...) x0 features entering the global terms (with grad)
    source: torch.Tensor | None = None  # (m, ...) source x0 features (no grad); None if not needed
    real: torch.Tensor | None = None  # (m, ...) the real x0 the hf-MSE compares with (no grad)
    hfmse_weights: torch.Tensor | None = None  # (m,) per-sample weights of the hf-MSE (no grad)
    heads: dict = field(default_factory=dict)  # name -> λ·term (scalar, with grad) for grad_norm/<name>
    outputs: tuple = ()  # the UNet outputs (with grad) the heads are differentiated against


class Method:
    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    mode: ClassVar[str] = "dsfast"  # "official": the released step of the method (methods/official/)
    loss_config: ClassVar[type]  # the pydantic model of the config's loss section for this method
    defaults: ClassVar[dict[str, dict]]  # kind -> config key -> value
    has_global: bool = False
    global_weights: dict = {}  # name of a global term -> its λ

    @classmethod
    def needs(cls, loss) -> Needs:
        return Needs()

    @classmethod
    def check(cls, loss, data, kind: str) -> None:
        """Raise ConfigError for a resolved config this method cannot train on a model of ``kind``."""

    def micro_batch(self, step: int, ks) -> dict:
        raise NotImplementedError

    def forward(self, model, mb: dict, need_source: bool) -> MicroOut:
        raise NotImplementedError

    def global_loss(self, source, adapted, real, hfmse_weights, step: int):
        raise NotImplementedError


def hfmse_weights(process, t: torch.Tensor, weighting: str, device) -> torch.Tensor:
    """Per-sample weight of the hf-MSE of x0: ``none`` 1; ``min_snr`` min(SNR_t, 1) (the process's SNR:
    ᾱ/(1-ᾱ) for DDPM, ((1-σ)/σ)² for flow matching).

    hf is linear, so for ε-prediction hfMSE(x̂0) = |hf(ε̂ - ε)|² / SNR_t: unweighted it is a 1/SNR-weighted
    ε-loss (24,777 at t=999 of the linear schedule). x min(SNR_t, 1) it is never more than the ε-space hf
    error (Min-SNR-γ weighting of an x0 loss, γ = 1). For flow matching x̂0 - x0 = σ(v - v̂), so unweighted the
    hf-MSE is σ²|hf(v̂ - v)|², never more than the v-space hf error: ``none`` is the flow families' default.
    """
    if weighting == "none":
        return torch.ones(t.shape[0], device=device)
    return process.snr(t).to(device, torch.float32).clamp(max=1.0)


def weighted_hf_mse(adapted: torch.Tensor, real: torch.Tensor, weights: torch.Tensor, stencil: str,
                    backend: str) -> torch.Tensor:
    """mean_i w_i · mean((hf(adapted_i) - hf(real_i))²) (hf is linear: one hf of the difference)."""
    hf = ops.high_frequency(adapted - real.to(adapted.dtype), stencil=stencil, backend=backend)
    return (hf.float().pow(2).flatten(1).mean(1) * weights).mean()


class OfficialPairwise:
    """The released code's pairwise terms, within one micro-batch (its per-GPU batch): cosine similarities
    among the samples ``idx`` only, softmax over the others, ``KLDivLoss()(log p_adapted, p_source)``
    (mean), for x0 and hf(x0) (LH+HL+HH). The source side keeps its gradient when it has one."""

    def __init__(self, loss):
        self.backend = loss.backend

    def __call__(self, source, adapted, idx=None):
        if idx is not None:
            source, adapted = source[idx], adapted[idx]
        opts = dict(tau=1.0, direction="source||adapted", reduction="mean", detach_source=False,
                    backend=self.backend)
        return (ops.pairwise_similarity_kl(source, adapted, **opts),
                ops.hf_pairwise_similarity_kl(source, adapted, stencil="domainstudio", **opts))


class DomainStudioTerms:
    """``dsfast.losses.DomainStudioLoss`` on the gathered global batch, one call per step: λ_img·KL_pair(x0_src,
    x0_ada) + λ_hf·KL_pair(hf x0_src, hf x0_ada) + λ_hfmse·(1/N) Σ_i w_i·mean((hf(x0_ada,i) - hf(x0_real,i))²),
    w the per-sample weights of ``loss.hfmse_weighting``, N the global batch; anchor rows drawn per step. With
    all three terms on, a compiled backend reads each x0 batch once forward and once backward. The hf-MSE is
    per sample, so its mean over the global batch is the mean of the equal-sized micro-batches' means.
    Used when a pairwise term is on (``pairwise``); without one the methods add the hf-MSE to their
    per-sample loss instead (no global step needed)."""

    def __init__(self, loss, draws: Draws):
        self.fn = DomainStudioLoss(lambda_img=loss.image, lambda_hf=loss.hf, lambda_hfmse=loss.hfmse,
                                   stencil=loss.stencil, tau=loss.tau, direction=loss.direction,
                                   reduction=loss.reduction, backend=loss.backend)
        self.num_anchors, self.draws = loss.num_anchors, draws
        self.pairwise = loss.image > 0 or loss.hf > 0
        self.weights = {k: w for k, w in (("image", loss.image), ("hf", loss.hf), ("hfmse", loss.hfmse)) if w > 0}

    def __call__(self, source, adapted, real, hfmse_weights, step: int):
        """``(total, {term: value})``; ``source`` None: the adapted batch itself (detached); ``real`` and
        ``hfmse_weights`` are read only with λ_hfmse > 0."""
        anchors = self.draws.anchors(step, adapted.shape[0], self.num_anchors)
        out = self.fn(adapted.detach() if source is None else source, adapted, real,
                      anchors=None if anchors is None else to_device(anchors, adapted.device),
                      hfmse_weights=hfmse_weights)
        values = {"image": out.image, "hf": out.high_frequency, "hfmse": out.hf_mse}
        return out.total, {k: values[k] for k in self.weights}
