"""``unet2d``: a pixel-space ``UNet2DModel`` with a DDPM scheduler (``DDPMPipeline``), unconditional."""
from __future__ import annotations

from diffusers import DDPMPipeline, UNet2DModel

from ..diffusion import vlb_term
from ..errors import ModelError
from .base import UNCONDITIONAL, Family, ModelInfo, ddpm, size_of


def down_factor(unet: dict, vae: dict | None = None) -> int:
    """Pixels per UNet cell at its lowest level, from the configs: the UNet halves the size at each level but the
    last, a VAE at each of its levels but the last. A training resolution is a multiple of it."""
    return 2 ** (len(unet["block_out_channels"]) - 1 + (len(vae["block_out_channels"]) - 1 if vae else 0))


class UNet2D(Family):
    name, kind = "unet2d", UNCONDITIONAL
    pipeline_class = DDPMPipeline
    default_space = "pixel"

    @classmethod
    def matches(cls, index):
        return "unet" in index and "scheduler" in index and "vae" not in index

    @classmethod
    def info(cls, pretrained, index):
        unet = UNet2DModel.load_config(pretrained, subfolder="unet")
        return ModelInfo(cls.name, cls.kind, int(unet["in_channels"]), down_factor(unet), size_of(unet.get("sample_size")))

    @classmethod
    def lora_config(cls, rank, alpha):
        raise ModelError("model.lora_rank > 0 is supported for text-to-image families only (not unet2d)")

    def make_process(self):
        return ddpm(self)

    def encode_prompts(self, prompts):
        raise ModelError("an unconditional UNet2DModel takes no prompts")

    def encode(self, images, batch=8, std=False):
        return images.to(self.device)

    def decode(self, z, grad, unscale=True):
        return z

    diffusion_term = "simple"  # L_simple of DDPM

    def predict(self, model, x_t, t, cond):
        """The whole output (with the learned variance channels of a learned-sigma model)."""
        return model(x_t.to(self.dtype), t).sample.float()

    def split_output(self, raw, channels):
        if raw.shape[1] == 2 * channels:
            return raw[:, :channels], raw[:, channels:]
        return raw, None

    def extra_terms(self, pred, var, x0, x_t, t):
        """L_vlb of improved DDPM when the model learns sigma (its mean from the stop-gradient prediction)."""
        scheduler = self.process.scheduler
        variance_type = scheduler.config.get("variance_type", "fixed_small")
        if var is None or variance_type not in ("learned", "learned_range"):
            return {}
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError("learned-sigma models are supported with prediction_type='epsilon' only")
        return {"vlb": vlb_term(scheduler, pred.detach(), var, x0, x_t, t, variance_type)}


__all__ = ["UNet2D", "down_factor"]
