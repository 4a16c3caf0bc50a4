"""Diffusion math of training: the two noise processes the model families train with, and L_vlb of
improved DDPM.

A process turns a drawn timestep index ``t`` (a long per sample, a function of (seed, step, sample))
into the noisy input, the regression target, x0 from the model output, the SNR and the per-sample loss
weight. :class:`DDPM` follows the scheduler's ``prediction_type`` (``epsilon`` / ``v_prediction`` /
``sample``); :class:`FlowMatching` is rectified flow (SD3, FLUX): x_t = (1-σ)x0 + σε, the model predicts
v = ε - x0, so x0 = x_t - σ·v̂ (the stochastic branch of ``FlowMatchEulerDiscreteScheduler.step``).
"""
from __future__ import annotations

import math

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def alphas(scheduler, t: torch.Tensor, device) -> torch.Tensor:
    """alpha-bar_t as ``(B, 1, 1, 1)`` float32."""
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)[t].view(-1, 1, 1, 1)


def predicted_x0(scheduler, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 from the model output per the scheduler's prediction type."""
    a = alphas(scheduler, t, x_t.device)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * model_out) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * model_out
    if kind == "sample":
        return model_out
    raise ValueError(f"unsupported prediction_type {kind!r}")


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model regresses (L_simple): noise, velocity or x0."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


class DDPM:
    """The discrete DDPM process of ``scheduler`` (a ``DDPMScheduler`` whose tables are on the training device)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.num_timesteps = int(scheduler.config.num_train_timesteps)

    draw = None  # t uniform over the timesteps (Draws' own draw)

    def noisy(self, x0, noise, t):
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        return training_target(self.scheduler, x0, noise, t)

    def x0(self, out, x_t, t):
        return predicted_x0(self.scheduler, out, x_t, t)

    def model_time(self, t):
        return t

    def regressed(self, out, x_t, t):
        """What the diffusion loss compares with :meth:`target`: the model output itself."""
        return out

    def snr(self, t):
        a = alphas(self.scheduler, t, t.device).flatten()
        return a / (1 - a)

    def weight(self, t):
        """Per-sample weight of the diffusion loss: None (uniform, as the DreamBooth/DDPM scripts)."""
        return None


class FlowMatching:
    """Rectified flow on the σ table of a ``FlowMatchEulerDiscreteScheduler`` (shifted when the scheduler shifts
    statically, as SD3's; FLUX's dynamic shift is left out in training, as diffusers' scripts do). Timestep
    indices are drawn with diffusers' ``compute_density_for_timestep_sampling`` and the loss is weighted with
    ``compute_loss_weighting_for_sd3`` (``weighting``: none | logit_normal | mode | sigma_sqrt | cosmap).
    ``precondition``: the regression is on x̂0 = x_t - σ·v̂ against x0 (SD3's ``--precondition_outputs``)."""

    def __init__(self, scheduler, device, *, weighting: str = "none", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, precondition: bool = False):
        if weighting not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting scheme must be one of {', '.join(WEIGHTING_SCHEMES)}; got {weighting!r}")
        self.num_timesteps = int(scheduler.config.num_train_timesteps)
        self.sigmas = scheduler.sigmas.to(device, torch.float32)
        self.timesteps = scheduler.timesteps.to(device, torch.float32)
        self.weighting, self.precondition = weighting, precondition
        self.density = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)

    def draw(self, g: torch.Generator) -> int:
        """A timestep index from ``g``, as the SD3/FLUX scripts draw it: int(u·T), u from the density."""
        u = compute_density_for_timestep_sampling(self.weighting, 1, generator=g, **self.density)
        return min(int(u.item() * self.num_timesteps), self.num_timesteps - 1)

    def sigma(self, t, dtype=torch.float32):
        """σ of timestep indices ``t`` as ``(B, 1, 1, 1)`` in ``dtype`` (the inputs', as the scheduler does)."""
        return self.sigmas[t].to(dtype).view(-1, 1, 1, 1)

    def noisy(self, x0, noise, t):
        s = self.sigma(t, x0.dtype)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, t):
        return x0 if self.precondition else noise - x0

    def x0(self, out, x_t, t):
        return x_t - self.sigma(t, x_t.dtype) * out

    def model_time(self, t):
        """The ``timestep`` the transformer takes (the scheduler's, σ·T)."""
        return self.timesteps[t]

    def regressed(self, out, x_t, t):
        return self.x0(out, x_t, t) if self.precondition else out

    def snr(self, t):
        s = self.sigmas[t]
        return ((1 - s) / s) ** 2

    def weight(self, t):
        if self.weighting not in ("sigma_sqrt", "cosmap"):
            return None
        return compute_loss_weighting_for_sd3(self.weighting, self.sigmas[t]).float()


# ----------------------------------------------------------------------------- L_vlb (learned sigma)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-likelihood of 8-bit images in [-1, 1] under a discretised Gaussian (Ho et al. 2020)."""
    centered = x - mean
    inv_stdv = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_term(scheduler, eps_detached, var_out, x0, x_t, t, variance_type: str) -> torch.Tensor:
    """L_vlb of improved DDPM for models that learn sigma: mean per sample (bits/dim), averaged, x T/1000.

    The mean of p(x_{t-1}|x_t) uses the stop-gradient epsilon, so L_vlb only trains the variance
    (Nichol & Dhariwal 2021). Epsilon-prediction models only.
    """
    ac = scheduler.alphas_cumprod.to(x0.device, torch.float64)
    betas = scheduler.betas.to(x0.device, torch.float64)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64, device=x0.device), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = betas * ac_prev.sqrt() / (1 - ac)
    coef2 = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)

    def g(v):
        return v[t].float().view(-1, 1, 1, 1)

    a = g(ac)
    x0_pred = (x_t - (1 - a).sqrt() * eps_detached) / a.sqrt()
    true_mean = g(coef1) * x0 + g(coef2) * x_t
    pred_mean = g(coef1) * x0_pred + g(coef2) * x_t
    if variance_type == "learned_range":
        frac = (var_out + 1) / 2
        model_logvar = frac * g(torch.log(betas)) + (1 - frac) * g(post_logvar)
    else:  # "learned": the log variance itself
        model_logvar = var_out
    kl = normal_kl(true_mean, g(post_logvar), pred_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, pred_mean, 0.5 * model_logvar).flatten(1).mean(1) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return vb.mean() * (len(betas) / 1000.0)
