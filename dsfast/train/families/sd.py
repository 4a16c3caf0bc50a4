"""``sd``: Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): ``UNet2DConditionModel`` on 4-channel VAE
latents, one CLIP text encoder, DDPM with ε- or v-prediction."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from .base import Family, ModelInfo, ddpm, size_of, vae_factor
from .unet2d import down_factor


def latent_unet_info(family: type[Family], pretrained: str, default_cells: int) -> ModelInfo:
    """The size rules of a pipeline with a ``UNet2DConditionModel`` on VAE latents (SD, SDXL); ``default_cells``:
    the latent size when the UNet config has none."""
    unet = UNet2DConditionModel.load_config(pretrained, subfolder="unet")
    vae = AutoencoderKL.load_config(pretrained, subfolder="vae")
    return ModelInfo(family.name, family.kind, 3, down_factor(unet, vae),
                     (size_of(unet.get("sample_size")) or default_cells) * vae_factor(vae))


class SD(Family):
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    skip_parts = ("safety_checker", "feature_extractor", "image_encoder")
    default_space = "pixel"  # as the released DomainStudio code
    pipeline_flags = {"requires_safety_checker": False}  # sampling and final/ carry no safety checker

    @classmethod
    def matches(cls, index):
        return "unet" in index and "vae" in index and "text_encoder" in index and "text_encoder_2" not in index

    @classmethod
    def info(cls, pretrained, index):
        return latent_unet_info(cls, pretrained, 64)

    def make_process(self):
        return ddpm(self)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        tok = self.parts["tokenizer"]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return {"encoder_hidden_states": self.parts["text_encoder"](ids.to(self.device))[0].float()}

    def predict(self, model, x_t, t, cond):
        return model(x_t.to(self.dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype)).sample.float()

    def sampling_scheduler(self):
        # DDPM sampling, with the values StableDiffusionPipeline forces on a scheduler
        return DDPMScheduler.from_config(self.process.scheduler.config, steps_offset=1, clip_sample=False)
