"""``dsfast plan``: predicted peak GPU memory of a training run, per memory option, and what fits.

    dsfast plan --preset sd15 --gpu 24,48,80
    dsfast plan --config run.yaml --gpu 24 [key=value ...]

A prediction, not a measurement. Per rank and per step, in bytes:

* **model states**, from parameter counts (the architecture instantiated on the ``meta`` device: no
  weights): the trained parameters (the UNet, or only its LoRA adapters) cost 4 B weights + 4 B gradients
  + 8 B AdamW moments in float32; with bf16 mixed precision 2 B weights + 2 B gradients + 4 B fp32 master +
  8 B moments. ZeRO stage 1 divides the optimizer part (moments, master) by the world size, stage 2 also the
  gradients, stage 3 also the weights; ``offload_optimizer=cpu`` moves the optimizer part (and, stage ≥ 2,
  the gradient partition) to host memory, ``offload_param=cpu`` the stage-3 weight partition;
* **frozen copies**: VAE, text encoder(s), the frozen source UNet (``loss.source=frozen``), the LoRA base
  weights, in the run's precision;
* **activations** of one micro-batch: a short probe of the actual architecture at two small resolutions —
  the run's forward (the UNet on instance + class latents, the x̃0 decode the option keeps for backward)
  traced on the ``meta`` device while counting the bytes autograd saves for backward (parameters excluded) —
  fitted as ``a·pixels + b·pixels²`` per sample (``b``: attention scores, which the math attention path
  stores) and extrapolated to the run's resolution and micro-batch size. Gradient checkpointing keeps only
  the block inputs plus one block's recomputation. On a GPU, PyTorch's fused attention (memory-efficient /
  flash SDPA) stores no score matrix, so GPU predictions drop the ``b`` term; the CPU math path keeps it.
* the two-pass micro-batch scheme adds the gathered x̃0 features and their gradient (global batch × image).

Not modelled: the CUDA context (~0.5 GiB), the caching allocator's fragmentation (typically 5–15 % above
``max_memory_allocated``), DeepSpeed's communication buckets (``reduce_bucket_size``, default 5e8 elements,
allocated up to the gradient partition size). The table leaves 10 % head-room for them.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass

GIB = 2 ** 30

# Architectures, written from their published configurations (no downloads).
_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, sample_size=512)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77)
PRESETS = {
    # Stable Diffusion 1.5: UNet2DConditionModel's defaults are SD-1.5's UNet; the SD VAE; CLIP ViT-L/14 text.
    "sd15": dict(family="text2image", resolution=512, text_len=77, unet=dict(cross_attention_dim=768),
                 vae=_SD_VAE, text=[_CLIP_L]),
    # SDXL base: 3 levels, 10 transformer layers at the lowest, two text encoders (CLIP-L + OpenCLIP bigG).
    "sdxl": dict(family="text2image", resolution=1024, text_len=77, sdxl=True,
                 unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                           cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
                 vae=dict(_SD_VAE, sample_size=1024),
                 text=[_CLIP_L, dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                     num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77)]),
    # ADM / guided-diffusion 256x256 unconditional: channels 256·(1,1,2,2,4,4), 2 res blocks, attention at
    # 32/16/8, 64-channel heads, scale-shift norm; pixel space.
    "adm256": dict(family="unconditional", resolution=256,
                   unet=dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                             block_out_channels=(256, 256, 512, 512, 1024, 1024),
                             down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,
                             up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 3,
                             attention_head_dim=64, resnet_time_scale_shift="scale_shift")),
    # The SD-1.5 layer structure at 1/10 of its UNet width: what bench/memory.py measures on a CPU.
    "sd-small": dict(family="text2image", resolution=128, text_len=16,
                     unet=dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, attention_head_dim=8,
                               sample_size=16),
                     vae=dict(_SD_VAE, block_out_channels=(32, 64, 64, 64), sample_size=128),
                     text=[dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                max_position_embeddings=16)]),
}


def build_pipeline(preset: str, path) -> None:
    """Save a text-to-image preset with random weights as a local StableDiffusionPipeline folder (bench, tests)."""
    import tempfile
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dsfast.train.testing import _tiny_clip_tokenizer

    spec = PRESETS[preset]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tok, vocab = _tiny_clip_tokenizer(Path(d))
        te = CLIPTextModel(CLIPTextConfig(**dict(spec["text"][0], vocab_size=vocab, bos_token_id=vocab - 2,
                                                 eos_token_id=vocab - 1, pad_token_id=vocab - 1)))
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**spec["vae"]), text_encoder=te, tokenizer=tok, unet=UNet2DConditionModel(**spec["unet"]),
            scheduler=DDPMScheduler(num_train_timesteps=1000), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.save_pretrained(str(path))
