"""``sd3``: Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MMDiT ``SD3Transformer2DModel`` on
16-channel latents (decoded as ``z / scaling + shift``), CLIP-L + CLIP-G (+ T5, optional: without it the
pipeline's zero T5 context), rectified flow with the scheduler's static shift."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict

from .base import Family, ModelInfo, flow_matching, size_of, vae_factor


class SD3(Family):
    denoiser_class = "SD3Transformer2DModel"
    name, denoiser = "sd3", "transformer"
    pipeline_class = StableDiffusion3Pipeline
    skip_parts = ("image_encoder", "feature_extractor")
    # the attention projections of the joint blocks, as diffusers' train_dreambooth_lora_sd3.py
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")
    default_weighting = "logit_normal"  # as diffusers' DreamBooth LoRA script of the family
    default_hfmse_weighting = "none"  # flow matching: the x0 error is σ·(v-space error), no 1/SNR blow-up

    @classmethod
    def info(cls, pretrained, index):
        tr = SD3Transformer2DModel.load_config(pretrained, subfolder="transformer")
        vf = vae_factor(AutoencoderKL.load_config(pretrained, subfolder="vae"))
        return ModelInfo(cls.name, cls.kind, 3, vf * int(tr.get("patch_size", 2)), (size_of(tr.get("sample_size")) or 128) * vf)

    def make_process(self):
        return flow_matching(self)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        p = self.parts
        pipe = StableDiffusion3Pipeline(transformer=self.model, scheduler=p["scheduler"], vae=p["vae"],
                                        text_encoder=p["text_encoder"], tokenizer=p["tokenizer"],
                                        text_encoder_2=p["text_encoder_2"], tokenizer_2=p["tokenizer_2"],
                                        text_encoder_3=p.get("text_encoder_3"), tokenizer_3=p.get("tokenizer_3"))
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=self.device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=self.options.max_sequence_length or 256)
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}

    @torch.no_grad()
    def sample_conditioning(self, prompt, guidance):
        pipe = self._assemble(dict(self.parts), self.model)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            [prompt], None, None, device=self.device, do_classifier_free_guidance=guidance,
            max_sequence_length=self.options.max_sequence_length or 256)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

    def predict(self, model, x_t, t, cond):
        d = self.dtype
        return model(hidden_states=x_t.to(d), timestep=self.process.model_time(t),
                     encoder_hidden_states=cond["encoder_hidden_states"].to(d),
                     pooled_projections=cond["pooled_projections"].to(d)).sample.float()

    def lora_state_dict(self, peft_model):
        return get_peft_model_state_dict(peft_model)
