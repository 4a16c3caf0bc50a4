"""``flux``: FLUX.1 (``FluxPipeline``): ``FluxTransformer2DModel`` on 16-channel latents packed 2x2 into tokens
(with their position ids), CLIP-L pooled + T5 sequence conditioning, a guidance embedding on the
guidance-distilled dev model (``model.guidance`` while training, 3.5 as diffusers' script), rectified flow
on the unshifted σ table (the scheduler shifts dynamically only when sampling). Methods see unpacked
``(B, 16, h, w)`` latents: the Haar and pairwise terms work on images of latents, not on tokens."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxPipeline
from peft.utils import get_peft_model_state_dict

from .base import Family, ModelInfo, flow_matching, vae_factor


class Flux(Family):
    denoiser_class = "FluxTransformer2DModel"
    name, denoiser = "flux", "transformer"
    pipeline_class = FluxPipeline
    skip_parts = ("image_encoder", "feature_extractor")
    # the joint blocks' attention and feed-forward projections, as diffusers' train_dreambooth_lora_flux.py
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")
    default_weighting = "none"  # as diffusers' DreamBooth LoRA script of the family
    default_hfmse_weighting = "none"  # flow matching: the x0 error is σ·(v-space error), no 1/SNR blow-up

    @classmethod
    def info(cls, pretrained, index):
        vf = vae_factor(AutoencoderKL.load_config(pretrained, subfolder="vae"))
        return ModelInfo(cls.name, cls.kind, 3, 2 * vf, 128 * vf)  # 2x2 packing; FluxPipeline's default size

    def make_process(self):
        return flow_matching(self)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        p = self.parts
        pipe = FluxPipeline(scheduler=p["scheduler"], vae=p["vae"], text_encoder=p["text_encoder"],
                            tokenizer=p["tokenizer"], text_encoder_2=p["text_encoder_2"], tokenizer_2=p["tokenizer_2"],
                            transformer=self.model)
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=self.device,
                                               max_sequence_length=self.options.max_sequence_length or 512)
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}

    @torch.no_grad()
    def sample_conditioning(self, prompt, guidance):
        """FLUX.1's guidance is an embedding (sample.guidance_scale), not classifier-free: no negative prompt."""
        embeds, pooled, _ = self._assemble(dict(self.parts), self.model).encode_prompt(
            [prompt], None, device=self.device, max_sequence_length=self.options.max_sequence_length or 512)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, model, x_t, t, cond):
        d, (b, c, h, w) = self.dtype, x_t.shape
        tokens = FluxPipeline._pack_latents(x_t.to(d), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, d)
        txt = cond["encoder_hidden_states"].to(d)
        txt_ids = torch.zeros(txt.shape[1], 3, device=x_t.device, dtype=d)  # FLUX.1's text ids are zeros
        guidance = (torch.full((b,), self.options.guidance, device=x_t.device, dtype=torch.float32)
                    if self.model.config.guidance_embeds else None)
        out = model(hidden_states=tokens, timestep=self.process.model_time(t) / 1000, guidance=guidance,
                    pooled_projections=cond["pooled_projections"].to(d), encoder_hidden_states=txt,
                    txt_ids=txt_ids, img_ids=img_ids).sample
        vf = self.vae_scale
        return FluxPipeline._unpack_latents(out, h * vf, w * vf, vf).float()

    @property
    def vae_scale(self) -> int:
        return vae_factor(self.vae.config)

    def lora_state_dict(self, peft_model):
        return get_peft_model_state_dict(peft_model)
