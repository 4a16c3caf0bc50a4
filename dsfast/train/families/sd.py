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
        """The pipeline's own prompt encoding over the loaded text encoder. The pipeline holds the text parts
        only: given a scheduler or UNet, its constructor rewrites an outdated config of theirs in place."""
        p = self.parts
        pipe = StableDiffusionPipeline(vae=None, text_encoder=p["text_encoder"], tokenizer=p["tokenizer"], unet=None,
                                       scheduler=None, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        embeds, _ = pipe.encode_prompt(prompts, self.device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds.float()}

    @torch.no_grad()
    def sample_conditioning(self, prompt, guidance):
        pipe = self._assemble(dict(self.parts), self.model)
        embeds, negative = pipe.encode_prompt([prompt], self.device, 1, guidance)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    def predict(self, model, x_t, t, cond):
        return model(x_t.to(self.dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype)).sample.float()

    def sampling_scheduler(self):
        # DDPM sampling, with the values StableDiffusionPipeline forces on a scheduler
        return DDPMScheduler.from_config(self.process.scheduler.config, steps_offset=1, clip_sample=False)
