"""Drop-in loss modules (thin ``nn.Module`` wrappers over :mod:`dsfast.ops`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsfast import ops


class PairwiseSimilarityLoss(nn.Module):
    """Pairwise-similarity KL between a source batch and an adapted batch (image-level DomainStudio / CDC loss)."""

    def __init__(
        self,
        tau: float = 1.0,
        direction: str = "source||adapted",
        reduction: str = "mean",
        num_anchors: int | None = None,
        detach_source: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        self.tau, self.direction, self.reduction = tau, direction, reduction
        self.num_anchors, self.detach_source, self.backend = num_anchors, detach_source, backend

    def options(self) -> dict:
        return dict(
            tau=self.tau, direction=self.direction, reduction=self.reduction,
            anchors=self.num_anchors, detach_source=self.detach_source, backend=self.backend,
        )

    def call_options(self, anchors) -> dict:
        opts = self.options()
        if anchors is not None:
            opts["anchors"] = anchors
        return opts

    def forward(self, source: torch.Tensor, adapted: torch.Tensor, anchors: torch.Tensor | None = None) -> torch.Tensor:
        """``anchors`` (row indices) replaces ``num_anchors`` for this call (e.g. rows drawn from a fixed seed)."""
        return ops.pairwise_similarity_kl(source, adapted, **self.call_options(anchors))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())


class HighFrequencySimilarityLoss(PairwiseSimilarityLoss):
    """Pairwise-similarity KL of the high-frequency maps, fused (hf never materialised)."""

    def __init__(self, stencil: str = "domainstudio", **kwargs):
        super().__init__(**kwargs)
        self.stencil = stencil

    def options(self) -> dict:
        return dict(super().options(), stencil=self.stencil)

    def forward(self, source: torch.Tensor, adapted: torch.Tensor, anchors: torch.Tensor | None = None) -> torch.Tensor:
        return ops.hf_pairwise_similarity_kl(source, adapted, **self.call_options(anchors))


class HighFrequencyMSELoss(nn.Module):
    """``mean((hf(adapted) - hf(target))²)``: keeps the adapted model's detail close to the real images'."""

    def __init__(self, stencil: str = "domainstudio", backend: str = "auto"):
        super().__init__()
        self.stencil, self.backend = stencil, backend

    def forward(self, adapted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.hf_mse(adapted, target, stencil=self.stencil, backend=self.backend)

    def extra_repr(self) -> str:
        return f"stencil={self.stencil!r}, backend={self.backend!r}"


@dataclass
class DomainStudioLossOutput:
    total: torch.Tensor
    image: torch.Tensor
    high_frequency: torch.Tensor
    hf_mse: torch.Tensor


class DomainStudioLoss(nn.Module):
    """The DomainStudio regularisers on x̂0 predictions (official defaults λ_img=4, λ_hf=4, λ_hfmse=1).

    ``total = λ_img·KL_pair(x̂0_src, x̂0_ada) + λ_hf·KL_pair(hf x̂0_src, hf x̂0_ada) + λ_hfmse·hfMSE(x̂0_ada, x0)``;
    add it to the diffusion loss. A term with weight 0 is not computed. With all three terms on,
    :func:`dsfast.ops.domainstudio_loss` reads each batch once per pass.
    """

    def __init__(
        self,
        lambda_img: float = 4.0,
        lambda_hf: float = 4.0,
        lambda_hfmse: float = 1.0,
        stencil: str = "domainstudio",
        tau: float = 1.0,
        direction: str = "source||adapted",
        reduction: str = "mean",
        num_anchors: int | None = None,
        detach_source: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        self.lambda_img, self.lambda_hf, self.lambda_hfmse = lambda_img, lambda_hf, lambda_hfmse
        self.stencil, self.tau, self.direction, self.reduction = stencil, tau, direction, reduction
        self.num_anchors, self.detach_source, self.backend = num_anchors, detach_source, backend

    def forward(self, source_x0: torch.Tensor, adapted_x0: torch.Tensor, real_x0: torch.Tensor,
                anchors: torch.Tensor | None = None, hfmse_weights: torch.Tensor | None = None) -> DomainStudioLossOutput:
        """``anchors`` (row indices of the pairwise terms) replaces ``num_anchors`` for this call;
        ``hfmse_weights`` (N,) weights each sample's hf-MSE (:func:`dsfast.ops.domainstudio_loss`; None: all ones)."""
        terms = ops.domainstudio_loss(
            source_x0, adapted_x0, real_x0,
            lambda_img=self.lambda_img, lambda_hf=self.lambda_hf, lambda_hfmse=self.lambda_hfmse,
            stencil=self.stencil, tau=self.tau, direction=self.direction, reduction=self.reduction,
            anchors=self.num_anchors if anchors is None else anchors, detach_source=self.detach_source,
            backend=self.backend, hfmse_weights=hfmse_weights,
        )
        return DomainStudioLossOutput(**terms._asdict())

    def extra_repr(self) -> str:
        return f"lambda_img={self.lambda_img}, lambda_hf={self.lambda_hf}, lambda_hfmse={self.lambda_hfmse}"


class PriorPreservationLoss(nn.Module):
    """DreamBooth: ``‖ε − ε̂(x_t, c_inst)‖² + λ_prior‖ε' − ε̂(x'_t, c_class)‖²`` (MSE means, fp32)."""

    def __init__(self, prior_weight: float = 1.0):
        super().__init__()
        self.prior_weight = prior_weight

    def forward(self, instance_pred, instance_target, class_pred, class_target):
        instance = F.mse_loss(instance_pred.float(), instance_target.float())
        prior = F.mse_loss(class_pred.float(), class_target.float())
        return instance + self.prior_weight * prior, instance, prior

    def extra_repr(self) -> str:
        return f"prior_weight={self.prior_weight}"
