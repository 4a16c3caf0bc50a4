"""The pixel-space part shared by the methods on a UNet2DModel + DDPM scheduler: L_simple (+ L_vlb)."""
from __future__ import annotations

import torch.nn.functional as F

from ..data import PixelBatches
from ..diffusion import vlb_term
from ..errors import ConfigError
from ..families import UNCONDITIONAL
from .base import Method, MicroOut


class UnconditionalMethod(Method):
    """Loss = L_simple (+ L_vlb when the model learns sigma, improved DDPM)."""

    family = UNCONDITIONAL
    official_weight_decay, official_flip = 0.0, True  # the released guided-diffusion training

    @classmethod
    def check(cls, loss, data) -> None:
        if data.captions not in ("none", "auto"):
            raise ConfigError(f"data.captions={data.captions}: an unconditional model takes no prompts")
        if loss.source != "frozen":
            raise ConfigError("loss.source must be 'frozen' for an unconditional model")

    def __init__(self, *, bundle, images, draws, loss, data, sample, dtype, device):
        self.family, self.process, self.scheduler = bundle.family, bundle.family.process, bundle.scheduler
        self.dtype, self.device = dtype, device
        self.batches = PixelBatches(images, draws, device)
        self.variance_type = bundle.scheduler.config.get("variance_type", "fixed_small")

    def micro_batch(self, step, ks):
        return self.batches(step, ks)

    def denoise(self, model, mb):
        """``(MicroOut with the L_simple (+ L_vlb) loss, terms, heads and UNet output, x_t, eps/v/x0 output)``."""
        x0, t, noise = mb["x0"], mb["t"], mb["noise"]
        x_t = self.process.noisy(x0, noise, t)
        out = raw = self.family.predict(model, x_t, t, {})
        c = x0.shape[1]
        learned = out.shape[1] == 2 * c
        var_out = None
        if learned:
            out, var_out = out[:, :c], out[:, c:]
        l_simple = F.mse_loss(out, self.process.target(x0, noise, t))
        loss, terms = l_simple, {"simple": l_simple}
        if learned and self.variance_type in ("learned", "learned_range"):
            if self.scheduler.config.prediction_type != "epsilon":
                raise ValueError("learned-sigma models are supported with prediction_type='epsilon' only")
            vlb = vlb_term(self.scheduler, out.detach(), var_out, x0, x_t, t, self.variance_type)
            loss = loss + vlb
            terms["vlb"] = vlb
        return MicroOut(loss=loss, terms=terms, heads=dict(terms), outputs=(raw,)), x_t, out

    def x0(self, out, x_t, t):
        return self.process.x0(out, x_t, t)

    def forward(self, model, mb, need_source):
        return self.denoise(model, mb)[0]
