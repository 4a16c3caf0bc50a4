"""``sdxl``: Stable Diffusion XL (``StableDiffusionXLPipeline``): ``UNet2DConditionModel`` with text-and-time
added conditioning, two CLIP text encoders (penultimate hidden states concatenated; pooled output of the
second), DDPM ε-prediction. The SDXL VAE overflows in float16: it stays in float32 unless ``model.vae`` names
another (e.g. an fp16-safe one), which then runs in the training precision."""
from __future__ import annotations

from functools import cached_property

import torch
from diffusers import StableDiffusionXLPipeline

from .base import Family, ddpm
from .sd import latent_unet_info


class SDXL(Family):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    skip_parts = ("image_encoder", "feature_extractor")
    vae_fp32 = True

    @classmethod
    def matches(cls, index):
        return "unet" in index and "text_encoder_2" in index

    @classmethod
    def info(cls, pretrained, index):
        return latent_unet_info(cls, pretrained, 128)

    def make_process(self):
        return ddpm(self)

    def _encoder(self) -> StableDiffusionXLPipeline:
        """The pipeline's own prompt encoding over the loaded parts (references, no copies)."""
        p = self.parts
        return StableDiffusionXLPipeline(vae=p["vae"], text_encoder=p["text_encoder"], text_encoder_2=p["text_encoder_2"],
                                         tokenizer=p["tokenizer"], tokenizer_2=p["tokenizer_2"], unet=self.model,
                                         scheduler=p["scheduler"])

    @cached_property
    def _target_size(self) -> int:
        """R: the training resolution, or the pipeline's default size."""
        pipe = self._encoder()
        return self.options.resolution or pipe.default_sample_size * pipe.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """As the pipeline conditions its UNet when it generates at the training resolution R: size/crop ids
        ``(R, R) + (0, 0) + (R, R)`` (a training image's own replace them: :meth:`image_conditioning`)."""
        pipe = self._encoder()
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        r = self._target_size
        ids = pipe._get_add_time_ids((r, r), (0, 0), (r, r), dtype=torch.float32,
                                     text_encoder_projection_dim=self.parts["text_encoder_2"].config.projection_dim)
        return {"encoder_hidden_states": embeds.float(), "text_embeds": pooled.float(),
                "time_ids": ids.to(self.device).expand(len(prompts), -1)}

    def image_conditioning(self, geometry):
        """SDXL's micro-conditioning of a training image, as diffusers' SDXL training scripts compute it: its
        original ``(H, W)``, the top-left corner of its crop in the resized image, and the target ``(R, R)``."""
        r = self._target_size
        target = geometry.new_tensor([r, r]).expand(*geometry.shape[:-1], 2)
        return {"time_ids": torch.cat([geometry, target], -1).float().to(self.device)}

    @torch.no_grad()
    def sample_conditioning(self, prompt, guidance):
        pipe = self._assemble(dict(self.parts), self.model)  # with the folder's force_zeros_for_empty_prompt
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            [prompt], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=guidance)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

    def predict(self, model, x_t, t, cond):
        d = self.dtype
        added = {"text_embeds": cond["text_embeds"].to(d), "time_ids": cond["time_ids"].to(d)}
        return model(x_t.to(d), t, encoder_hidden_states=cond["encoder_hidden_states"].to(d),
                     added_cond_kwargs=added).sample.float()
