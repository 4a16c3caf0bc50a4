"""Training objectives: what one micro-batch's forward computes, and the pairwise (global-batch) part."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsfast import ops

from .data import generator, make_batch
from .step import MicroOut
from .vlb import vlb_term


def alphas(scheduler, t, device):
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)[t].view(-1, 1, 1, 1)


def predicted_x0(scheduler, model_out, x_t, t):
    """x0 from the model output per the scheduler's prediction type (epsilon / v_prediction / sample)."""
    a = alphas(scheduler, t, x_t.device)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * model_out) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * model_out
    if kind == "sample":
        return model_out
    raise ValueError(f"unsupported prediction_type {kind!r}")


def training_target(scheduler, x0, noise, t):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


class PairwiseMixin:
    """λ_img·KL_pair(x0_src, x0_ada) + λ_hf·KL_pair(hf x0_src, hf x0_ada) on the gathered batch."""

    def init_pairwise(self, cfg):
        self.lc = cfg.loss
        self.seed = cfg.train.seed
        self.has_pairwise = (self.lc.image or 0) > 0 or (self.lc.hf or 0) > 0

    def pairwise(self, src, ada, step):
        lc = self.lc
        anchors = None
        if lc.num_anchors:
            n = ada.shape[0]
            anchors = torch.randperm(n, generator=generator(self.seed, 424242, step))[: min(lc.num_anchors, n)]
            anchors = anchors.sort().values.to(ada.device)
        kw = dict(tau=lc.tau, direction=lc.direction, reduction=lc.reduction, anchors=anchors, backend=lc.backend)
        total = ada.new_zeros(())
        terms = {}
        if lc.image > 0:
            v = ops.pairwise_similarity_kl(src, ada, **kw)
            total = total + lc.image * v
            terms["image"] = v
        if lc.hf > 0:
            v = ops.hf_pairwise_similarity_kl(src, ada, stencil=lc.stencil, **kw)
            total = total + lc.hf * v
            terms["hf"] = v
        return total, terms


class UnconditionalMethod(PairwiseMixin):
    """DomainStudio / finetune on a pixel-space UNet2DModel + DDPM scheduler.

    Loss = L_simple (+ L_vlb when the model learns sigma) + λ_hfmse·hfMSE(x0_ada, x0)
    + the pairwise terms (global batch). Source = frozen copy of the pretrained UNet.
    """

    def __init__(self, cfg, model, source, scheduler, dtype):
        self.init_pairwise(cfg)
        if cfg.method == "finetune":
            self.has_pairwise = False
        self.cfg, self.model, self.source, self.scheduler, self.dtype = cfg, model, source, scheduler, dtype
        self.variance_type = scheduler.config.get("variance_type", "fixed_small")
        self.hfmse = cfg.loss.hfmse if cfg.method == "domainstudio" else 0.0

    def forward(self, mb, need_source: bool) -> MicroOut:
        x0, t, noise = mb["x0"], mb["t"], mb["noise"]
        x_t = self.scheduler.add_noise(x0, noise, t)
        out = self.model(x_t.to(self.dtype), t).sample.float()
        c = x0.shape[1]
        learned = out.shape[1] == 2 * c
        var_out = None
        if learned:
            out, var_out = out[:, :c], out[:, c:]
        l_simple = F.mse_loss(out, training_target(self.scheduler, x0, noise, t))
        loss, terms = l_simple, {"simple": l_simple}
        if learned and self.variance_type in ("learned", "learned_range"):
            if self.scheduler.config.prediction_type != "epsilon":
                raise ValueError("learned-sigma models are supported with prediction_type='epsilon' only")
            vlb = vlb_term(self.scheduler, out.detach(), var_out, x0, x_t, t, self.variance_type)
            loss = loss + vlb
            terms["vlb"] = vlb
        x0_ada = predicted_x0(self.scheduler, out, x_t, t) if (self.has_pairwise or self.hfmse > 0) else None
        if self.hfmse > 0:
            h = ops.hf_mse(x0_ada, x0, stencil=self.cfg.loss.stencil, backend=self.cfg.loss.backend)
            loss = loss + self.hfmse * h
            terms["hfmse"] = h
        x0_src = None
        if need_source and self.has_pairwise:
            with torch.no_grad():
                s = self.source(x_t.to(self.dtype), t).sample.float()[:, :c]
                x0_src = predicted_x0(self.scheduler, s, x_t, t)
        return MicroOut(loss=loss, terms=terms, adapted=x0_ada, source=x0_src)

    # ------------------------------------------------------------------ data
    def noise_shape(self, resolution: int):
        return (self.channels, resolution, resolution)

    def make_micro_batch(self, images, step, ks, noise_shape, num_timesteps):
        x0, t, noise, _ = make_batch(images, seed=self.cfg.train.seed, step=step, ks=ks,
                                     batch_size=self.cfg.train.batch_size, noise_shape=noise_shape,
                                     num_timesteps=num_timesteps, random_flip=self.cfg.data.random_flip)
        return {"x0": x0, "t": t, "noise": noise}


def build_method(cfg, bundle, engine, dtype, extras):
    if bundle.family == "unconditional":
        m = UnconditionalMethod(cfg, engine, bundle.source, bundle.scheduler, dtype)
        m.channels = bundle.channels
        return m
    from .text2image import Text2ImageMethod

    return Text2ImageMethod(cfg, bundle, engine, dtype, extras)
