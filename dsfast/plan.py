"""``dsfast plan``: predicted peak GPU memory of a training run, per memory option, and what fits.

    dsfast plan --preset sd15|sdxl|sd3-medium|sd35-large|flux-dev|adm256 --gpu 24,48,80
    dsfast plan --config run.yaml --gpu 24 [key=value ...]

A prediction, not a measurement, for every model family the trainer trains (``dsfast/train/families``: a
UNet, SD3's MMDiT, FLUX.1's transformer). Per rank and per step, in bytes:

* **model states**, from parameter counts (the architecture instantiated on the ``meta`` device: no
  weights): the trained parameters (the denoiser, or only its LoRA adapters on the family's
  ``lora_targets``) cost 4 B weights + 4 B gradients
  + 8 B AdamW moments in float32; with bf16 mixed precision 2 B weights + 2 B gradients + 4 B fp32 master +
  8 B moments. ZeRO stage 1 divides the optimizer part (moments, master) by the world size, stage 2 also the
  gradients, stage 3 also the weights; ``offload_optimizer=cpu`` moves the optimizer part (and, stage ≥ 2,
  the gradient partition) to host memory, ``offload_param=cpu`` the stage-3 weight partition;
  ``train.optimizer=adamw8bit`` (bitsandbytes' AdamW8bit) keeps each moment in 1 B per element plus a
  float32 absmax per 256-block (tensors of >= 4096 elements; 8 B per element for the others; per parameter
  without ZeRO, one flat partition with it), master and gradients unchanged;
* **frozen copies**: VAE and the LoRA base weights, in the run's precision (each part in the family's ``part_dtype``:
  SDXL's VAE stays float32); ``model.quantize`` stores the frozen ``nn.Linear`` weights of the LoRA base
  (those diffusers' quantizers replace; biases, norms, convolutions, embeddings stay in the run's precision)
  as int8 (1 B + a float32 scale and an int8 zero point per output row: torchao), float8 (1 B + a float32
  scale per row: torchao) or nf4 (0.5 B + a float32 absmax per 64-block: bitsandbytes);
  the text encoders (CLIP, and T5-XXL on SD3/FLUX) in host memory: the trainer moves them to the CPU
  once the prompts are encoded, and ``model.drop_text_encoders`` frees them (their embeddings stay cached);
* **activations** of one micro-batch: a short probe of the actual architecture at two small resolutions —
  the run's forward (the denoiser on instance + class latents — a UNet on the latent image, SD3's
  transformer on its 2x2 patches, FLUX's on 2x2-packed latent tokens, each with the cached prompt embeddings
  the trainer feeds it — and the x̃0 decode the option keeps for backward)
  traced on the ``meta`` device while counting the bytes of the tensors alive (each storage from its
  creation until its last tensor is freed, parameters excluded: the tensors autograd saves for backward and
  the intermediates around them; on the reduced-width CPU models this equals torch.profiler's peak of the
  real forward), attention counted as the fused kernels store it (PyTorch uses them on CUDA and on
  CPU; no score matrix) — fitted per sample as ``a·pixels + b·pixels²`` (UNet) or ``c + a·pixels``
  (transformers: the prompt tokens are a constant per sample, every activation is linear in the tokens)
  and extrapolated to the run's resolution and micro-batch size. Gradient checkpointing (diffusers
  recomputes each resnet and each transformer block: SD3's joint blocks, FLUX's double and single blocks)
  keeps what is saved outside them and their inputs, plus the peak of one of them recomputed;
* the **cached data** of the run, float32 on the device: the instance images (as given, mirrored, and
  DomainStudio's copy), the VAE latents of every instance and class image and of its mirror image, the
  prompt embeddings (10 instance and 200 class images unless told);
* the **inputs** of the rank's share of the global batch, built before the step: images, latents, noise;
* the two-pass micro-batch scheme adds the gathered adapted x̃0 and its gradient (2 × global batch × image,
  or × latent with ``loss.space=latent``), and holds the gradients from the first micro-batch on (one
  micro-batch allocates them during backward, as its activations are freed).

DeepSpeed's own buffers (0.19, read from its ZeRO optimizers): the gradient reduce bucket
(``reduce_bucket_size``; the trainer sets it to the trainable parameter count, at most DeepSpeed's 5e8
elements, unless the config sets it) is allocated whole — at stage 2 at the first trained gradient of each
backward (after the frozen decoder's backward freed its activations), at stage 3 at set-up; stage 3 keeps
gathered the weights whose backward use comes within ``stage3_max_reuse_distance`` (1e9 elements: the last
5e8 of the forward; all of a smaller model); with
``offload_optimizer=cpu`` the host also holds the gradient partition, at stage 2 a staging copy of the
weight partition (and an accumulation buffer under gradient accumulation), at stage 3 the fp32 master's
own gradient; reducing a ZeRO-3 bucket concatenates its gradients (one bucket more). The AdamW moments,
on the device or offloaded, come with the first ``optimizer.step()``. A CPU run (``total``, what
``bench/memory.py`` measures) also has torch AdamW's two temporaries of DeepSpeed's flat fp32 partition
(ZeRO ≥ 1) and gloo's copy of a reduced ZeRO-3 bucket.
Not modelled: the CUDA context (~0.5 GiB), the caching allocator's fragmentation (typically 5–15 % above
``max_memory_allocated``), cuDNN workspaces; and the set-up before the first step (prompt encoding, class
images and the float32 pipeline built for them) and the sample grids (another one), outside the step. The table leaves
10 % head-room for the first three.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from dsfast.argtypes import ArgumentParser, positive_int

GIB = 2 ** 30
# diffusers' checkpointed modules: the UNet's resnets and transformer blocks, SD3's joint blocks, FLUX's
# double- and single-stream blocks (each goes through the model's _gradient_checkpointing_func)
CHECKPOINT_UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock",
                    "FluxSingleTransformerBlock")
STAGE3_REUSE = 1_000_000_000  # DeepSpeed's stage3_max_reuse_distance (elements; = stage3_max_live_parameters)
# T5 tokens of the prompt embeddings when model.max_sequence_length is not set (the families' encode_prompts)
T5_TOKENS = {"sd3": 256, "flux": 512}
# the data a run caches, when not given: a few-shot set of instance images, data.num_class_images's default
INSTANCE_IMAGES, CLASS_IMAGES = 10, 200

# Architectures, written from their published configurations (no downloads).
_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, sample_size=512)
# SD3's and FLUX.1's VAE: the SD VAE layout with 16 latent channels, no quant convs, scaled and shifted latents
_SD3_VAE = dict(_SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
                scaling_factor=1.5305, shift_factor=0.0609)
_FLUX_VAE = dict(_SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77)
# OpenCLIP bigG (SDXL's and SD3's second text encoder: CLIPTextModelWithProjection)
_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
               num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)
# google/t5-v1_1-xxl's encoder (SD3's text_encoder_3, FLUX.1's text_encoder_2)
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
# the byte-level CLIP tokenizer and the character-level T5 tokenizer of dsfast.train.testing: 518 and 105 tokens
_TINY_CLIP_VOCAB, _TINY_T5_VOCAB = 518, 105
_TINY_CLIP_IDS = dict(vocab_size=_TINY_CLIP_VOCAB, bos_token_id=_TINY_CLIP_VOCAB - 2, eos_token_id=_TINY_CLIP_VOCAB - 1,
                      pad_token_id=_TINY_CLIP_VOCAB - 1)
PRESETS = {
    # Stable Diffusion 1.5: UNet2DConditionModel's defaults are SD-1.5's UNet (its levels written out: the
    # resolution rule reads them); the SD VAE; CLIP ViT-L/14 text.
    "sd15": dict(family="text2image", resolution=512, text_len=77,
                 unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768),
                 vae=_SD_VAE, text=[_CLIP_L]),
    # SDXL base: 3 levels, 10 transformer layers at the lowest, two text encoders (CLIP-L + OpenCLIP bigG).
    "sdxl": dict(family="text2image", resolution=1024, text_len=77, sdxl=True,
                 unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                           cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
                 vae=dict(_SD_VAE, sample_size=1024), text=[_CLIP_L, _CLIP_G]),
    # Stable Diffusion 3 medium: MMDiT with 24 joint blocks of 24 heads x 64, 2x2 patches of 16-channel latents;
    # CLIP-L + CLIP-G (pooled 768 + 1280 = 2048) and T5-XXL (sequence: 77 CLIP + 256 T5 tokens of 4096).
    "sd3-medium": dict(family="text2image", denoiser="sd3", resolution=1024, text_len=77, t5_len=256,
                       transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048,
                                        pos_embed_max_size=192),
                       vae=_SD3_VAE, text=[dict(_CLIP_L, projection_dim=768), _CLIP_G], t5=_T5_XXL),
    # Stable Diffusion 3.5 large: 38 joint blocks of 38 heads x 64, RMS-normed q/k; the SD3 text encoders.
    "sd35-large": dict(family="text2image", denoiser="sd3", resolution=1024, text_len=77, t5_len=256,
                       transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                        caption_projection_dim=2432, pooled_projection_dim=2048,
                                        pos_embed_max_size=192, qk_norm="rms_norm"),
                       vae=_SD3_VAE, text=[dict(_CLIP_L, projection_dim=768), _CLIP_G], t5=_T5_XXL),
    # FLUX.1-dev: 19 double- + 38 single-stream blocks of 24 heads x 128 on 2x2-packed 16-channel latents
    # (64 in), a guidance embedding; CLIP-L pooled (768) + T5-XXL (512 tokens of 4096).
    "flux-dev": dict(family="text2image", denoiser="flux", resolution=1024, text_len=77, t5_len=512,
                     transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                      pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                     vae=_FLUX_VAE, text=[_CLIP_L], t5=_T5_XXL),
    # ADM / guided-diffusion 256x256 unconditional: channels 256·(1,1,2,2,4,4), 2 res blocks, attention at
    # 32/16/8, 64-channel heads, scale-shift norm; pixel space.
    "adm256": dict(family="unconditional", resolution=256,
                   unet=dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                             block_out_channels=(256, 256, 512, 512, 1024, 1024),
                             down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,
                             up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 3,
                             attention_head_dim=64, resnet_time_scale_shift="scale_shift")),
    # Reduced-width models of each structure, what bench/memory.py measures on a CPU (build_pipeline saves
    # them with random weights and dsfast.train.testing's tiny tokenizers).
    # The SD-1.5 layer structure at 1/10 of its UNet width.
    "sd-small": dict(family="text2image", resolution=128, text_len=16,
                     unet=dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, attention_head_dim=8,
                               sample_size=16),
                     vae=dict(_SD_VAE, block_out_channels=(32, 64, 64, 64), sample_size=128),
                     text=[dict(**_TINY_CLIP_IDS, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16)]),
    # SD3's structure (joint blocks, 2x2 patches of a 16-channel 8x VAE, CLIP + CLIP + T5): 4 blocks of
    # 4 heads x 32, encoders of width 64 and 128, 16 CLIP + 64 T5 prompt tokens (model.max_sequence_length=64).
    "sd3-small": dict(family="text2image", denoiser="sd3", resolution=128, text_len=16, t5_len=64,
                      transformer=dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                                       attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                                       caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=32),
                      vae=dict(_SD3_VAE, block_out_channels=(32, 64, 64, 64), sample_size=128),
                      text=[dict(**_TINY_CLIP_IDS, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                 projection_dim=64)] * 2,
                      t5=dict(vocab_size=_TINY_T5_VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                              feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                              relative_attention_max_distance=32)),
    # FLUX.1's structure (double + single blocks on 2x2-packed 16-channel latents, rope, guidance embedding;
    # CLIP pooled + T5): 2 double + 4 single blocks of 4 heads x 32, 64 T5 prompt tokens.
    "flux-small": dict(family="text2image", denoiser="flux", resolution=128, text_len=16, t5_len=64,
                       transformer=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                                        pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 12, 12)),
                       vae=dict(_FLUX_VAE, block_out_channels=(32, 64, 64, 64), sample_size=128),
                       text=[dict(**_TINY_CLIP_IDS, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16)],
                       t5=dict(vocab_size=_TINY_T5_VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                               feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                               relative_attention_max_distance=32)),
    # SDXL's structure (3 UNet levels, cross-attention transformers at the lower two with linear projections,
    # text_time conditioning on two CLIP encoders' states side by side and the second's pooled projection): widths
    # 32/64/128, 1 and 2 transformer layers, encoders of width 64, an 8x VAE with 4 levels.
    "sdxl-small": dict(family="text2image", resolution=128, text_len=16, sdxl=True,
                       unet=dict(sample_size=16, block_out_channels=(32, 64, 128), layers_per_block=2,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
                                 cross_attention_dim=128, use_linear_projection=True, addition_embed_type="text_time",
                                 addition_time_embed_dim=16, projection_class_embeddings_input_dim=6 * 16 + 64),
                       vae=dict(_SD_VAE, block_out_channels=(32, 64, 64, 64), sample_size=128),
                       text=[dict(**_TINY_CLIP_IDS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, max_position_embeddings=16, **extra)
                             for extra in ({}, {"projection_dim": 64})]),
}


def family_name(spec: dict) -> str:
    """The trainer's model family of an architecture spec: unet2d | sd | sdxl | sd3 | flux."""
    if spec["family"] == "unconditional":
        return "unet2d"
    return {"unet": "sdxl" if spec.get("sdxl") else "sd"}.get(spec.get("denoiser", "unet"), spec.get("denoiser"))


def _family(spec: dict):
    """The trainer's Family class of the spec (its LoRA targets, default loss.space, part dtypes)."""
    from dsfast.train.families import get

    return get(family_name(spec))


def _vae_factor(spec: dict) -> int:
    return 2 ** (len(spec["vae"]["block_out_channels"]) - 1)


def spec_down_factor(spec: dict) -> int:
    """The training resolution must be a multiple of this (the family's ``info().down_factor``)."""
    denoiser = spec.get("denoiser", "unet")
    if denoiser == "sd3":
        return _vae_factor(spec) * int(spec["transformer"].get("patch_size", 2))
    if denoiser == "flux":
        return 2 * _vae_factor(spec)  # 2x2 packing
    from dsfast.train.models import down_factor

    return down_factor(spec["unet"], spec.get("vae"))


def _text_encoders(spec: dict, vocab: int | None = None) -> list:
    """The spec's CLIP text encoders (``projection_dim`` set: CLIPTextModelWithProjection) and T5 encoder, built
    (on the current default device); ``vocab``: the CLIP vocabulary size of a tokenizer, with its special ids."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = []
    for t in spec["text"]:
        ids = {} if vocab is None else dict(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                            pad_token_id=vocab - 1)
        cls = CLIPTextModelWithProjection if t.get("projection_dim") else CLIPTextModel
        out.append(cls(CLIPTextConfig(**{**t, **ids})))
    if spec.get("t5"):
        ids = {} if vocab is None else dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        out.append(T5EncoderModel(T5Config(**{**spec["t5"], **ids})))
    return out


def _denoiser(spec: dict):
    import diffusers

    denoiser = spec.get("denoiser", "unet")
    if denoiser == "sd3":
        return diffusers.SD3Transformer2DModel.from_config(spec["transformer"])
    if denoiser == "flux":
        return diffusers.FluxTransformer2DModel.from_config(spec["transformer"])
    if spec["family"] == "unconditional":
        return diffusers.UNet2DModel(**spec["unet"])
    return diffusers.UNet2DConditionModel(**spec["unet"])


def build_pipeline(preset: str, path) -> None:
    """Save a text-to-image preset with random weights as a local pipeline folder of its family (bench, tests):
    StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline or FluxPipeline, with
    dsfast.train.testing's tiny tokenizers (the presets' vocabulary sizes are theirs)."""
    import tempfile
    from pathlib import Path

    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from dsfast.train.testing import _tiny_clip_tokenizer, _tiny_t5_tokenizer, flux_scheduler, sd_scheduler, sdxl_scheduler

    spec = PRESETS[preset]
    denoiser = spec.get("denoiser", "unet")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        toks = [_tiny_clip_tokenizer(Path(d) / str(i)) for i in range(len(spec["text"]))]
        vocab = toks[0][1]
        encoders = _text_encoders(spec, vocab)
        t5_tok = _tiny_t5_tokenizer() if spec.get("t5") else None
        if t5_tok is not None and len(t5_tok) != spec["t5"]["vocab_size"]:
            raise ValueError(f"{preset}: the tiny T5 tokenizer has {len(t5_tok)} tokens, the preset says "
                             f"{spec['t5']['vocab_size']}")
        model, vae = _denoiser(spec), AutoencoderKL(**spec["vae"])
        if denoiser == "sd3":
            pipe = StableDiffusion3Pipeline(
                transformer=model, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                text_encoder=encoders[0], tokenizer=toks[0][0], text_encoder_2=encoders[1], tokenizer_2=toks[1][0],
                text_encoder_3=encoders[2], tokenizer_3=t5_tok)
        elif denoiser == "flux":
            sched = flux_scheduler()
            pipe = FluxPipeline(transformer=model, vae=vae, scheduler=sched, text_encoder=encoders[0],
                                tokenizer=toks[0][0], text_encoder_2=encoders[1], tokenizer_2=t5_tok)
        elif spec.get("sdxl"):
            sched = sdxl_scheduler()
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=encoders[0], tokenizer=toks[0][0], text_encoder_2=encoders[1],
                tokenizer_2=toks[1][0], unet=model, scheduler=sched, force_zeros_for_empty_prompt=True,
                add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=encoders[0], tokenizer=toks[0][0], unet=model,
                scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        pipe.save_pretrained(str(path))


# ----------------------------------------------------------------------------------------- options
@dataclass
class Option:
    """The memory-relevant settings of a run (config keys of docs/config.md in the comments)."""

    name: str
    official: bool = False  # the official form: source half in the graph, both halves decoded with grad
    space: str | None = None  # loss.space (None: the family's default: pixel on sd, latent on sdxl/sd3/flux)
    lora_rank: int = 0  # model.lora_rank (with loss.source=lora_off)
    checkpointing: bool = False  # train.gradient_checkpointing
    zero_stage: int = 0  # deepspeed.zero_stage
    offload_optimizer: bool = False  # deepspeed.offload_optimizer=cpu
    offload_param: bool = False  # deepspeed.offload_param=cpu
    world: int = 1  # ranks
    precision: str = "no"  # train.mixed_precision
    micro_batch: int | None = None  # train.micro_batch_size (None: global batch / world)
    reduce_bucket: int | None = None  # zero_optimization.reduce_bucket_size of deepspeed.config (None: dsfast's)
    quantize: str = "none"  # model.quantize: the frozen denoiser's Linear weights under LoRA (QUANT_FORMATS)
    optimizer: str = "adamw"  # train.optimizer: adamw, or adamw8bit (8-bit moments)
    drop_text: bool = False  # model.drop_text_encoders: the text encoders freed once the prompts are cached


_LORA_CKPT = dict(lora_rank=8, checkpointing=True)
_LORA_BF16 = dict(_LORA_CKPT, precision="bf16")
OPTIONS = {
    "official": Option("official", official=True, space="pixel"),
    "dsfast": Option("dsfast"),
    "dsfast+latent": Option("dsfast+latent", space="latent"),
    "dsfast+pixel": Option("dsfast+pixel", space="pixel"),
    "dsfast+lora": Option("dsfast+lora", lora_rank=8),
    "dsfast+ckpt": Option("dsfast+ckpt", checkpointing=True),
    "dsfast+ckpt+bf16": Option("dsfast+ckpt+bf16", checkpointing=True, precision="bf16"),
    "dsfast+lora+ckpt": Option("dsfast+lora+ckpt", **_LORA_CKPT),
    "dsfast+lora+ckpt+bf16": Option("dsfast+lora+ckpt+bf16", **_LORA_CKPT, precision="bf16"),
    "dsfast+latent+lora+ckpt": Option("dsfast+latent+lora+ckpt", space="latent", **_LORA_CKPT),
    "dsfast+latent+lora+ckpt+bf16": Option("dsfast+latent+lora+ckpt+bf16", space="latent", **_LORA_CKPT,
                                           precision="bf16"),
    # the frozen-weight terms one at a time in float32 (what bench/memory.py measures on a CPU)
    "dsfast+lora+int8": Option("dsfast+lora+int8", lora_rank=8, quantize="int8"),
    "dsfast+lora+float8": Option("dsfast+lora+float8", lora_rank=8, quantize="float8"),
    "dsfast+adam8": Option("dsfast+adam8", optimizer="adamw8bit"),  # a full fine-tune's: LoRA's are small
    "dsfast+lora+notext": Option("dsfast+lora+notext", lora_rank=8, drop_text=True),
    "dsfast+lora+ckpt+bf16+int8": Option("dsfast+lora+ckpt+bf16+int8", **_LORA_BF16, quantize="int8"),
    "dsfast+lora+ckpt+bf16+float8": Option("dsfast+lora+ckpt+bf16+float8", **_LORA_BF16, quantize="float8"),
    "dsfast+lora+ckpt+bf16+nf4": Option("dsfast+lora+ckpt+bf16+nf4", **_LORA_BF16, quantize="nf4"),
    "dsfast+lora+ckpt+bf16+adam8": Option("dsfast+lora+ckpt+bf16+adam8", **_LORA_BF16, optimizer="adamw8bit"),
    "dsfast+lora+ckpt+bf16+notext": Option("dsfast+lora+ckpt+bf16+notext", **_LORA_BF16, drop_text=True),
    # the 24 GB combination: every one of the three
    "dsfast+lora+ckpt+bf16+nf4+adam8+notext": Option("dsfast+lora+ckpt+bf16+nf4+adam8+notext", **_LORA_BF16,
                                                     quantize="nf4", optimizer="adamw8bit", drop_text=True),
    "zero2-offload": Option("zero2-offload", zero_stage=2, offload_optimizer=True, world=2),
    "zero3-offload": Option("zero3-offload", zero_stage=3, offload_optimizer=True, offload_param=True, world=2),
    "zero3-offload+ckpt+bf16": Option("zero3-offload+ckpt+bf16", zero_stage=3, offload_optimizer=True,
                                      offload_param=True, world=2, checkpointing=True, precision="bf16"),
}
# The options a preset's table shows, per family: the other loss.space than the family's default; no LoRA on
# unet2d (diffusers has no adapters for UNet2DModel); no official form on the flow-matching families (the
# released code is DDPM's).
_LATENT_DEFAULT = ("dsfast", "dsfast+pixel", "dsfast+lora", "dsfast+ckpt", "dsfast+ckpt+bf16", "dsfast+lora+ckpt",
                   "dsfast+lora+ckpt+bf16", "zero2-offload", "zero3-offload", "zero3-offload+ckpt+bf16")
# The frozen-weight options (model.quantize, train.optimizer=adamw8bit, model.drop_text_encoders) on the families
# whose frozen base a 24 GB card cannot hold (and whose text encoders fill host memory).
_LOW_MEMORY = ("dsfast+lora+ckpt+bf16+int8", "dsfast+lora+ckpt+bf16+float8", "dsfast+lora+ckpt+bf16+nf4",
               "dsfast+lora+ckpt+bf16+adam8", "dsfast+lora+ckpt+bf16+notext", "dsfast+lora+ckpt+bf16+nf4+adam8+notext")
FAMILY_OPTIONS = {
    "unet2d": ("dsfast", "dsfast+ckpt", "zero2-offload", "zero3-offload"),
    "sd": ("official", "dsfast", "dsfast+latent", "dsfast+lora", "dsfast+ckpt", "dsfast+latent+lora+ckpt",
           "dsfast+latent+lora+ckpt+bf16", "zero2-offload", "zero3-offload"),
    "sdxl": ("official", *_LATENT_DEFAULT, *_LOW_MEMORY),
    "sd3": (*_LATENT_DEFAULT, *_LOW_MEMORY),
    "flux": (*_LATENT_DEFAULT, *_LOW_MEMORY),
}


def preset_options(spec: dict) -> dict:
    return {k: OPTIONS[k] for k in FAMILY_OPTIONS[family_name(spec)]}


# ----------------------------------------------------------------------------------------- frozen and optimizer formats
QUANT_FORMATS = ("none", "int8", "float8", "nf4")  # model.quantize
NF4_BLOCK = 64  # bitsandbytes' 4-bit block: one float32 absmax per 64 weights
# torchao's formats; nf4's matmul (bitsandbytes) saves the 4-bit weight for backward, its dequantized copy is
# transient
TORCHAO_FORMATS = ("int8", "float8")
# bitsandbytes' AdamW8bit (train.optimizer=adamw8bit): per state one byte an element and a float32 absmax per
# 256-block, for tensors of >= 4096 elements (its min_8bit_size; float32 states below); its code tables are shared
ADAM8_BLOCK, ADAM8_MIN = 256, 4096


def quantized_weight_bytes(rows: int, cols: int, fmt: str) -> float:
    """Bytes of one quantized Linear weight of ``rows`` (outputs) x ``cols``: torchao's weight-only int8 (int8
    values, a float32 scale and an int8 zero point per output row) and float8 (e4m3 values, a float32 scale per
    row), bitsandbytes' nf4 (two 4-bit values a byte, a float32 absmax per 64-block)."""
    n = rows * cols
    if fmt == "int8":
        return n + rows * 5
    if fmt == "float8":
        return n + rows * 4
    if fmt == "nf4":
        return n / 2 + -(-n // NF4_BLOCK) * 4
    raise ValueError(f"model.quantize={fmt!r}: one of {', '.join(QUANT_FORMATS)}")


def quantized_saving(denoiser, fmt: str, w: int) -> float:
    """Bytes the ``fmt`` quantization of the frozen denoiser saves against its ``w``-byte weights: the weight of
    every frozen ``nn.Linear`` (what diffusers' TorchAoConfig and BitsAndBytesConfig replace, before the LoRA
    adapters are added: the adapters' base layers); biases, norms, convolutions and embeddings stay."""
    if fmt == "none":
        return 0.0
    import torch

    return sum(m.weight.numel() * w - quantized_weight_bytes(*m.weight.shape, fmt) for m in denoiser.modules()
               if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)


def adam8bit_state_bytes(n: int) -> int:
    """AdamW's two moments of a float32 tensor of ``n`` elements under train.optimizer=adamw8bit."""
    if n < ADAM8_MIN:
        return 8 * n
    return 2 * (n + -(-n // ADAM8_BLOCK) * 4)


def adam8bit_cpu_temporaries(sizes) -> int:
    """Peak bytes of the temporaries of train.optimizer=adamw8bit's step on the CPU, tensors of ``sizes``
    elements: bitsandbytes' CPU update dequantizes the two states of one tensor at a time, copies its gradient
    and forms sqrt(v) and the denominator in float32 (5 of the largest 8-bit tensor); its CUDA kernel makes none."""
    return 20 * max([n for n in sizes if n >= ADAM8_MIN], default=0)


# ----------------------------------------------------------------------------------------- model
def _meta_models(spec: dict, lora_rank: int):
    """``(denoiser, vae, text encoders)`` on the meta device; with ``lora_rank`` the trainer's adapters (its
    family's ``lora_config``: the same target modules) on the frozen denoiser."""
    import diffusers
    import torch

    with torch.device("meta"):
        denoiser = _denoiser(spec)
        if spec["family"] == "unconditional":
            vae, text = None, []
        else:
            vae, text = diffusers.AutoencoderKL(**spec["vae"]), _text_encoders(spec)
    if lora_rank:
        denoiser.requires_grad_(False)
        denoiser.add_adapter(_family(spec).lora_config(lora_rank, None))
    for m in [vae, *text]:
        if m is not None:
            m.requires_grad_(False)
    return denoiser, vae, text


def _buffer_bytes(module, w: int) -> int:
    """Bytes of a module's buffers in a run of ``w``-byte precision (floating ones cast with the module)."""
    if module is None:
        return 0
    return sum(b.numel() * (w if b.is_floating_point() else b.element_size()) for b in module.buffers())


def _count(module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    ps = list(module.parameters()) if module is not None else []
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


class _SavedBytes:
    """Counts the bytes autograd saves for backward: each storage once, parameters and their views excluded;
    and the storages gradient checkpointing would keep (``kept``): those saved outside its units (while
    ``in_unit`` is 0) and the units' inputs."""

    def __init__(self, params):
        self.params = {p.untyped_storage()._cdata for p in params}
        self.size: dict = {}  # storage -> bytes, of every storage saved or kept
        # the storages seen, held: a storage freed during the probe (a unit input nothing saves) would give its
        # address, the key, to a later one
        self.hold: dict = {}
        self.saved, self.kept = set(), set()
        self.total, self.in_unit = 0, 0

    def _storage(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.params:
            return None
        self.size[key] = storage.nbytes()
        self.hold[key] = storage
        return key

    def pack(self, t):
        key = self._storage(t)
        if key is not None:
            if key not in self.saved:
                self.saved.add(key)
                self.total += self.size[key]
            if not self.in_unit:
                self.kept.add(key)
        return t

    def keep(self, t):
        key = self._storage(t)
        if key is not None:
            self.kept.add(key)

    def kept_bytes(self) -> int:
        return sum(self.size[k] for k in self.kept)

    def __enter__(self):
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


class _LiveBytes:
    """Bytes of the tensors alive while ops run (each storage once, from its creation until its last tensor is
    freed; parameters and buffers excluded) and their peak: what the allocator holds, on the meta device. The
    autograd graph keeps the saved tensors alive as on a real device, so the peak of a forward is its
    saved-for-backward bytes plus the intermediates alive at that moment (a block's locals, the next op's
    output); on the SD-architecture, SD3 and FLUX CPU models it equals torch.profiler's peak of the real forward."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.refs: dict = {}
        self.live = self.peak = 0

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def track(self, out):
        import weakref

        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if key in self.exclude:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key, nbytes).atexit = False

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.track(out)
                return out

        return Mode()


def _fused_attention(*args, **kw):
    """Stands in for scaled_dot_product_attention in the probe: saves what the fused kernels keep for
    backward (q, k, v, the output and one log-sum-exp per query), never the score matrix. PyTorch picks a
    fused kernel on CUDA (memory-efficient / flash) and on CPU (its flash kernel); the meta device would
    trace the math path, which stores the scores."""
    import torch

    names = ("query", "key", "value")  # diffusers' dispatcher passes them by name, its processors by position
    q, k, v = (*args[:3], *(kw[n] for n in names[len(args[:3]):]))

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            # in q's memory layout, as PyTorch's CPU flash kernel returns it (the processors' transpose back is
            # then a view, or a copy where q was contiguous (B, H, L, D): SD3's joint attention concatenates
            # its q); CUDA's fused kernels work in (B, L, H, D) memory, so there that copy would not be made
            out = torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty(*q.shape[:-1], v.shape[-1])
            ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))
            return out

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("probe only")

    return Fused.apply(q, k, v)


def _forward(spec: dict, denoiser, z):
    """The denoiser's output on latents ``z`` (``(n, C, h, w)``) with prompt embeddings of the shapes the trainer
    caches (the family's ``predict``: SD3 patchifies inside, FLUX takes 2x2-packed tokens and their ids)."""
    import torch

    n, c, h, w = z.shape
    kind = spec.get("denoiser", "unet")
    cfg = denoiser.config
    if kind == "sd3":  # CLIP-L | CLIP-G states (padded to T5's width) followed by the T5 tokens
        txt = torch.randn(n, spec["text_len"] + spec["t5_len"], cfg.joint_attention_dim)
        return denoiser(hidden_states=z, timestep=torch.zeros(n), encoder_hidden_states=txt,
                        pooled_projections=torch.randn(n, cfg.pooled_projection_dim)).sample
    if kind == "flux":
        from diffusers import FluxPipeline

        tokens = FluxPipeline._pack_latents(z, n, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, z.device, z.dtype)
        txt = torch.randn(n, spec["t5_len"], cfg.joint_attention_dim)
        guidance = torch.full((n,), 3.5) if cfg.guidance_embeds else None
        out = denoiser(hidden_states=tokens, timestep=torch.zeros(n), guidance=guidance, encoder_hidden_states=txt,
                       pooled_projections=torch.randn(n, cfg.pooled_projection_dim),
                       txt_ids=torch.zeros(spec["t5_len"], 3), img_ids=img_ids).sample
        return FluxPipeline._unpack_latents(out, h, w, 1)
    kw = {"encoder_hidden_states": torch.randn(n, spec["text_len"], cfg.cross_attention_dim)}
    if spec.get("sdxl"):  # the pooled text embedding and the 6 size/crop ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(n, pooled), "time_ids": torch.randn(n, 6)}
    return denoiser(z, torch.zeros(n, dtype=torch.long), **kw).sample


def _probe(spec: dict, models, option: Option, resolution: int, m: int, space: str) -> dict:
    """Activation bytes of one micro-batch of ``m`` samples at ``resolution`` (meta device): ``unet`` the peak
    of the denoiser's forward, ``held`` what it holds after it (saved for backward), ``decode`` the peak of
    the x̃0 decode on top of that; with gradient checkpointing ``checkpoint_kept`` (saved outside the units,
    and their inputs) and ``max_unit`` (the largest peak of one unit: its recomputation in backward)."""
    import torch

    denoiser, vae, text = models
    # what diffusers' gradient checkpointing recomputes: each resnet and each transformer block
    units = [u for u in denoiser.modules() if type(u).__name__ in CHECKPOINT_UNITS]
    per_unit = []
    fixed = [*denoiser.parameters(), *denoiser.buffers(), *(vae.parameters() if vae is not None else ())]
    counter, live = _SavedBytes(fixed), _LiveBytes(fixed)

    def pre(mod, args, kwargs):
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (tuple, list)) else (a,)):  # FLUX's rotary embedding: (cos, sin)
                if isinstance(t, torch.Tensor):
                    counter.keep(t)
        counter.in_unit += 1
        mod._dsfast_start = live.live
        live.peak = live.live  # from here: this unit's peak (the forward's peak is kept in `top`)
        top[0] = max(top[0], live.peak)

    def post(mod, args, out):
        counter.in_unit -= 1
        per_unit.append(live.peak - mod._dsfast_start)
        top[0] = max(top[0], live.peak)

    top = [0]
    hooks = [u.register_forward_pre_hook(pre, with_kwargs=True) for u in units]
    hooks += [u.register_forward_hook(post) for u in units]
    import torch.nn.functional as F

    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _fused_attention
    try:
        with torch.device("meta"), counter, live.mode():
            if spec["family"] == "unconditional":
                x = torch.randn(m, denoiser.config.in_channels, resolution, resolution)
                denoiser(x, torch.zeros(m, dtype=torch.long))
                decode = 0
            else:
                f = _vae_factor(spec)
                n = 2 * m  # instance + class latents in one batch
                z = torch.randn(n, vae.config.latent_channels, resolution // f, resolution // f)
                out = _forward(spec, denoiser, z)
            peak, held, kept = max(top[0], live.peak), live.live, counter.kept_bytes()
            if spec["family"] != "unconditional":
                decode = 0
                if space == "pixel":
                    halves = 2 if option.official else 1  # dsfast decodes the source half without grad
                    live.peak = live.live
                    vae.decode(out[: m * halves])
                    decode = live.peak - held
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    return {"unet": peak, "held": held, "decode": decode, "checkpoint_kept": kept, "max_unit": max(per_unit)}


def _fit(spec, models, option, space: str, r1: int, r2: int) -> dict:
    """Per-sample bytes of each probed quantity from two small resolutions: ``(c, a, b)`` of
    c + a·pixels + b·pixels², with c = 0 for a UNet (its activations grow with the pixels, attention's
    score matrix would add the b term) and b = 0 for a transformer (the prompt tokens are a constant c
    per sample, every activation is linear in the tokens: the fused attention keeps no score matrix)."""
    p1, p2 = _probe(spec, models, option, r1, 1, space), _probe(spec, models, option, r2, 1, space)
    x1, x2 = r1 * r1, r2 * r2
    transformer = spec.get("denoiser", "unet") != "unet"
    fit = {}
    for k in p1:
        if transformer:  # solve c + a·x = y at two points
            a = (p2[k] - p1[k]) / (x2 - x1)
            fit[k] = (p1[k] - a * x1, a, 0.0)
        else:  # solve a·x + b·x² = y at two points
            b = (p2[k] / x2 - p1[k] / x1) / (x2 - x1)
            a = p1[k] / x1 - b * x1
            fit[k] = (0.0, a, max(b, 0.0))
    return fit


def _activations(fit: dict, resolution: int, m: int, option: Option, copies: tuple = (0, 0, 0)) -> tuple[int, int]:
    """``(peak, held)`` activation bytes of ``m`` samples: the peak of the micro-batch's forward (the decode's
    on top of what the denoiser holds), and what the denoiser holds when its backward starts. ``copies``: the
    float32 bytes of the weight copies a quantized forward saves (:func:`dequantized_copies`), per forward."""
    px = resolution * resolution
    val = {k: m * max(0.0, c + a * px + b * px * px) for k, (c, a, b) in fit.items()}
    every, outside, unit = copies
    held = val["held"] + every
    if option.checkpointing:  # what the units do not recompute, and one unit's recomputation
        held = val["checkpoint_kept"] + outside
        return int(max(held + val["max_unit"] + unit, held + val["decode"])), int(held)
    return int(max(val["unet"] + every, held + val["decode"])), int(held)


def dequantized_copies(denoiser, fmt: str) -> tuple[int, int, int]:
    """torchao's int8 / float8 weight-only linear casts the quantized weight to the activations' dtype above
    autograd (on any device), and the matmul saves that copy for backward: float32 bytes of the copies one
    forward saves — ``(all, outside the checkpointed units, the largest unit's)``; none for nf4 (bitsandbytes'
    matmul saves the 4-bit weight, its dequantized copy is transient)."""
    if fmt not in TORCHAO_FORMATS:
        return 0, 0, 0
    import torch

    def frozen_linear_bytes(module):
        return sum(4 * m.weight.numel() for m in module.modules()
                   if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)

    units = [u for u in denoiser.modules() if type(u).__name__ in CHECKPOINT_UNITS]
    inside = [frozen_linear_bytes(u) for u in units]
    every = frozen_linear_bytes(denoiser)
    return every, every - sum(inside), max(inside, default=0)


def _probe_sizes(spec: dict, models) -> tuple[int, int]:
    """Two small resolutions (pixels) the architecture accepts."""
    denoiser, vae, _ = models
    if spec.get("denoiser", "unet") != "unet":
        f = spec_down_factor(spec)
        return 4 * f, 8 * f  # 16 and 64 image tokens
    f = 2 ** (len(denoiser.config.block_out_channels) - 1)
    if vae is None:
        return 2 * f, 4 * f
    f *= 2 ** (len(vae.config.block_out_channels) - 1)
    return 2 * f, 3 * f


# ----------------------------------------------------------------------------------------- prediction
class Planner:
    """Predictions for one architecture; the probes run once per (LoRA, space, official) combination."""

    def __init__(self, spec: dict, *, images: int = INSTANCE_IMAGES, class_images: int = CLASS_IMAGES):
        self.spec, self.images, self.class_images = spec, images, class_images
        self._fits: dict = {}
        self._models: dict = {}

    def models(self, lora_rank: int):
        if lora_rank not in self._models:
            self._models[lora_rank] = _meta_models(self.spec, lora_rank)
        return self._models[lora_rank]

    def _prompt_bytes(self) -> int:
        """The cached conditioning of the instance and the class prompt (float32): the denoiser's prompt states
        and pooled embedding."""
        spec, cfg = self.spec, self.models(0)[0].config
        kind = spec.get("denoiser", "unet")
        if kind == "sd3":
            one = (spec["text_len"] + spec["t5_len"]) * cfg.joint_attention_dim + cfg.pooled_projection_dim
        elif kind == "flux":
            one = spec["t5_len"] * cfg.joint_attention_dim + cfg.pooled_projection_dim
        else:
            one = spec["text_len"] * cfg.cross_attention_dim
        return 2 * 4 * one

    def _vae_bytes(self, w: int) -> int:
        """Bytes per VAE parameter in a run of ``w``-byte precision: float32 where the family keeps its VAE so (SDXL,
        its ``vae_fp32``, the pipeline's own VAE), else the run's."""
        if self.spec["family"] == "unconditional":
            return w
        return 4 if _family(self.spec).vae_fp32 else w

    def space(self, option: Option) -> str:
        """The option's loss.space: as set, else the family's default (the trainer's resolve step)."""
        if option.space is not None:
            return option.space
        if self.spec["family"] == "unconditional":
            return "pixel"
        return _family(self.spec).default_space

    def fit(self, option: Option) -> dict:
        space = self.space(option)
        key = (option.lora_rank, space, option.official)
        if key not in self._fits:
            models = self.models(option.lora_rank)
            self._fits[key] = _fit(self.spec, models, option, space, *_probe_sizes(self.spec, models))
        return self._fits[key]

    def predict(self, option: Option, batch: int, resolution: int, *, first_step: bool = False,
                images: int | None = None, class_images: int | None = None) -> dict:
        """Peak bytes per rank: ``device`` (what a GPU holds) and ``total`` (device + host: what a CPU run holds).

        ``first_step``: the first step allocates the AdamW moments in ``optimizer.step()``, after backward
        freed the activations (what a one-step measurement sees); later steps hold them throughout.
        ``images`` / ``class_images``: the instance and class images the run caches (``data.instance_dir``,
        ``data.num_class_images``; None: the planner's).
        """
        images = self.images if images is None else images
        class_images = self.class_images if class_images is None else class_images
        denoiser, vae, text = self.models(option.lora_rank)
        p_unet, p_train = _count(denoiser)
        w = 2 if option.precision in ("bf16", "fp16") else 4
        # frozen parts in the training precision, each as the family loads it (SDXL's VAE in float32), and the
        # models' buffers (SD3's positional embedding table)
        frozen = (p_unet - p_train) * w + _count(vae)[0] * self._vae_bytes(w)
        frozen += sum(_buffer_bytes(m, w) for m in (denoiser, vae))
        frozen -= quantized_saving(denoiser, option.quantize, w)
        # the text encoders, in the run's precision: moved to the CPU once the prompts are encoded (host memory),
        # or freed (model.drop_text_encoders)
        text_bytes = 0 if option.drop_text else sum(_count(t)[0] * w + _buffer_bytes(t, w) for t in text)
        world, z = option.world, option.zero_stage
        # trained parameters: weights, gradients, an fp32 master copy (mixed precision; DeepSpeed's fp32
        # partition at any ZeRO stage, also in float32 training), AdamW moments
        weights = p_train * w / (world if z >= 3 else 1)
        grads = p_train * w / (world if z >= 2 else 1)
        master = p_train * 4 / (world if z >= 1 else 1) if w == 2 or z >= 1 else 0.0
        if option.optimizer == "adamw8bit":  # per parameter without ZeRO; ZeRO steps one flat partition
            sizes = [p.numel() for p in denoiser.parameters() if p.requires_grad] if z == 0 else [p_train // world]
            moments = sum(adam8bit_state_bytes(n) for n in sizes)
            step_temp = adam8bit_cpu_temporaries(sizes)  # a CPU run's (``total``)
        else:
            moments = p_train * 8 / (world if z >= 1 else 1)
            # A CPU run (``total``) steps with torch's single-tensor AdamW (dsfast's optimizer without CUDA): on
            # DeepSpeed's flat fp32 partition (ZeRO ≥ 1) it makes two temporaries of its size, sqrt(v) and its
            # quotient; DeepSpeed's fused (GPU) and CPU Adam make none.
            step_temp = 8 * p_train / world if z >= 1 else 0.0
        micro = option.micro_batch or batch // world
        accumulating = micro * world < batch
        host, host_moments = float(text_bytes), 0.0  # host memory: allocated at set-up / by the first optimizer.step()
        if option.offload_optimizer:
            host, host_moments = host + master, moments
            master = moments = 0.0
            if z >= 2:
                # the gradient partition and, ZeRO-2, a staging copy of the weight partition; ZeRO-3 a second
                # fp32 gradient buffer (the master's); ZeRO-2 accumulates micro-batches in a third buffer
                host += grads + p_train * (w if z == 2 else 4) / world
                if z == 2 and accumulating:
                    host += p_train * w / world
                grads = 0.0
        if option.offload_param:
            host += weights
            weights = 0.0
        fit = self.fit(option)
        space = self.space(option)
        if option.official:
            micro = batch // world  # one pass over the whole batch
        copies = dequantized_copies(denoiser, option.quantize)
        act, act_unet = (a * w // 4 for a in _activations(fit, resolution, micro, option, copies))  # in fp32
        pixels = resolution * resolution
        if vae is None:  # unconditional: x0 and its noise per sample
            image, latent = denoiser.config.in_channels * pixels, 0
            inputs = 2 * image
        else:  # the image (the hf-MSE target) and the instance and class latents and their noise per sample
            f = 2 ** (len(vae.config.block_out_channels) - 1)
            image, latent = vae.config.out_channels * pixels, vae.config.latent_channels * pixels // (f * f)
            inputs = image + 4 * latent
        # the rank's micro-batches, built before the step for its share of the global batch (float32)
        inputs *= 4 * (batch // world)
        # cached for the whole run, float32, on the device: the instance images as given and mirrored, and the
        # copy DomainStudio keeps (unconditional: given and mirrored); text-to-image also the VAE latents of
        # every instance and class image and of its mirror image, and the two prompts' embeddings
        if vae is None:
            cached = 2 * images * image * 4
        else:
            cached = (3 * images * image + 2 * (images + class_images) * latent) * 4 + self._prompt_bytes()
        features = 0
        if accumulating and not option.official:
            # the two-pass scheme: the gathered adapted x̃0 of the global batch (pass 1; the global loss's
            # graph keeps it until the step logs the loss) and its gradient G, float32; the source x̃0 is freed
            features = 2 * batch * (image if space == "pixel" else latent) * 4
        held, transient = weights + frozen + inputs + cached + master, 0.0
        peak_act = reduce_dev = reduce_cpu = act
        if z >= 2:
            # DeepSpeed's gradient reduce bucket, allocated whole: reduce_bucket_size, which the trainer
            # sizes by the model unless the config sets it
            from dsfast.train.ds_config import reduce_bucket_elements

            bucket = (option.reduce_bucket or reduce_bucket_elements(p_train)) * w
            if z == 2:
                # allocated at the first trained gradient of each backward and freed after it: the loss
                # heads' and the (frozen) decoder's backward are done and their activations freed by then
                peak_act = max(act, act_unet + bucket)
            else:
                # ZeRO-3 allocates it at set-up; after forward it keeps gathered the weights used again
                # (in backward) within stage3_max_reuse_distance elements: the last half of that distance
                held += bucket + min(p_train, STAGE3_REUSE // 2) * w
                # reducing a bucket, DeepSpeed concatenates its gradients (gloo, a CPU run's backend, copies
                # them once more); the last one at the end of backward, the activations freed
                reduce_dev, reduce_cpu = bucket, 2 * bucket
        # Without ZeRO and with one micro-batch the gradients are allocated during backward as the
        # activations are freed (the step sets them to None); gradient accumulation keeps them from the
        # first micro-batch on, and ZeRO keeps its gradient partition for the whole step.
        if z == 0 and not accumulating:
            transient = grads
        else:
            held += grads
        peak_dev, peak_cpu = max(peak_act, reduce_dev) + features, max(peak_act, reduce_cpu) + features
        if first_step:
            device = held + max(peak_dev, transient + moments)
            total = held + host + max(peak_cpu, transient + moments + host_moments + step_temp)
        else:
            device = held + moments + max(peak_dev, transient)
            total = held + host + moments + host_moments + max(peak_cpu, transient + step_temp)
        return {"device": int(device), "total": int(total), "weights": int(weights), "grads": int(grads),
                "optimizer": int(master + moments), "frozen": int(frozen), "activations": int(act),
                "activations_held": int(act_unet), "features": int(features), "inputs": int(inputs),
                "cached": int(cached),
                "host": int(host + host_moments),
                "micro_batch": micro}


_CLIP_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
_T5_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj",
            "relative_attention_num_buckets", "relative_attention_max_distance", "pad_token_id", "eos_token_id",
            "decoder_start_token_id")
_TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def spec_from_pretrained(path, max_sequence_length: int | None = None) -> dict:
    """An architecture spec from a local diffusers pipeline folder (its config.json files; no weights read): a
    UNet pipeline (unconditional, SD, SDXL) or an SD3 / FLUX.1 one (``transformer/``; text encoders
    ``text_encoder*``, CLIP or T5, as present). ``max_sequence_length``: the run's T5 tokens
    (``model.max_sequence_length``; None: the family's default)."""
    import json
    from pathlib import Path

    from dsfast.train.errors import ModelError

    def raw(sub):
        f = Path(path) / sub / "config.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def cfg(sub):
        c = raw(sub)
        return None if c is None else {k: v for k, v in c.items() if not k.startswith("_")}

    def encoders():
        clips, t5 = [], None
        for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            c = raw(sub)
            if c is None:
                continue
            if c.get("model_type") == "t5":
                t5 = {k: c[k] for k in _T5_KEYS if k in c}
            else:
                clip = {k: c[k] for k in _CLIP_KEYS if k in c}
                if "CLIPTextModelWithProjection" in (c.get("architectures") or []):
                    clip["projection_dim"] = c.get("projection_dim") or c["hidden_size"]
                clips.append(clip)
        return clips, t5

    tr = raw("transformer")
    if tr is not None:
        denoiser = _TRANSFORMERS.get(tr.get("_class_name"))
        vae = cfg("vae")
        if denoiser is None or vae is None:
            raise ModelError(f"model.pretrained={path}: dsfast plan knows the transformers "
                             f"{', '.join(_TRANSFORMERS)} with a vae/; transformer/config.json names "
                             f"{tr.get('_class_name')!r}")
        clips, t5 = encoders()
        transformer = cfg("transformer")
        vf = 2 ** (len(vae["block_out_channels"]) - 1)
        sample = transformer.get("sample_size") if denoiser == "sd3" else None
        spec = dict(family="text2image", denoiser=denoiser, resolution=(sample or 128) * vf,
                    text_len=clips[0].get("max_position_embeddings", 77) if clips else 77,
                    t5_len=max_sequence_length or T5_TOKENS[denoiser], transformer=transformer, vae=vae, text=clips)
        if t5 is not None:
            spec["t5"] = t5
        return spec
    unet = cfg("unet")
    if unet is None:
        raise ModelError(f"model.pretrained={path} has no unet/config.json or transformer/config.json (need a "
                         "local diffusers pipeline folder)")
    vae = cfg("vae")
    clips, _ = encoders()
    if vae is None or not clips:
        return dict(family="unconditional", resolution=unet.get("sample_size") or 256, unet=unet)
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    spec = dict(family="text2image", resolution=(unet.get("sample_size") or 64) * f,
                text_len=clips[0].get("max_position_embeddings", 77), unet=unet, vae=vae, text=clips)
    if len(clips) > 1:
        spec["sdxl"] = True  # a UNet with two text encoders (the trainer's sdxl family)
    return spec


def option_from_config(cfg, world: int) -> Option:
    t, z = cfg.train, cfg.deepspeed
    bucket = None
    if z.config:
        from dsfast.train.ds_config import read_stock_json

        bucket = (read_stock_json(z.config).get("zero_optimization") or {}).get("reduce_bucket_size")
    return Option("config", space=getattr(cfg.loss, "space", None), lora_rank=cfg.model.lora_rank,
                  checkpointing=t.gradient_checkpointing, zero_stage=z.zero_stage,
                  offload_optimizer=z.offload_optimizer == "cpu", offload_param=z.offload_param == "cpu",
                  world=world, precision=t.mixed_precision or "no", micro_batch=t.micro_batch_size,
                  reduce_bucket=None if bucket in (None, "auto") else int(bucket), quantize=cfg.model.quantize,
                  optimizer=t.optimizer, drop_text=cfg.model.drop_text_encoders)


def _count_images(folder: str) -> int:
    """The images in a run's instance folder; 0 if it cannot be read yet (the trainer reports that)."""
    from dsfast.train.data import count_images

    try:
        return count_images(folder, "data.instance_dir") if folder else 0
    except Exception:  # noqa: BLE001 - a planning aid: the default count stands in
        return 0


def largest_micro_batch(planner: Planner, option: Option, batch: int, resolution: int, budget: float) -> int:
    """The largest micro-batch (powers of 2 up to batch/world) whose predicted device peak fits ``budget`` bytes
    (0 if none). The official form has no micro-batches: its "micro-batch" is its whole batch."""
    best = 0
    m = 1
    while m <= max(1, batch // option.world):
        o = Option(**{**vars(option), "micro_batch": m})
        if planner.predict(o, m if option.official else batch, resolution)["device"] > budget:
            break
        best, m = m, m * 2
    return best


def table(planner: Planner, options: dict, gpus, batch: int, resolutions) -> list[str]:
    """Markdown rows: per option and resolution, predicted GiB at micro-batch 1 and the largest micro-batch per GPU."""
    head = ["option", "resolution", "GiB at micro-batch 1"] + [f"{g:g} GB: largest micro-batch" for g in gpus]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for option in options.values():
        for res in resolutions:
            one = Option(**{**vars(option), "micro_batch": 1})
            gib = planner.predict(one, 1 if option.official else batch, res)["device"] / GIB
            fits = [largest_micro_batch(planner, option, batch, res, 0.9 * g * 1e9) for g in gpus]
            lines.append(f"| {option.name} | {res} | {gib:.3g} | " + " | ".join(str(f) if f else "does not fit"
                                                                                for f in fits) + " |")
    return lines


def _gpu_sizes(text: str) -> list[float]:
    """Comma-separated GPU memory sizes in GB, each a positive number."""
    try:
        sizes = [float(g) for g in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"GPU sizes in GB, comma-separated (e.g. 24,80), got {text!r}") from None
    if not all(0 < g < float("inf") for g in sizes):
        raise argparse.ArgumentTypeError(f"GPU sizes must be positive numbers of GB, got {text!r}")
    return sizes


def _resolutions(text: str) -> list[int]:
    return [positive_int(r) for r in text.split(",")]


def main(argv=None) -> int:
    ap = ArgumentParser(
        prog="dsfast plan",
        description="Predict the peak GPU memory of a DomainStudio / DreamBooth run per memory option, and the "
                    "largest micro-batch that fits (a global batch of any multiple of it trains with the two-pass "
                    "micro-batch scheme). Predictions, not measurements: the model is instantiated on the meta "
                    "device (no weights) and probed at small size.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a built-in architecture")
    src.add_argument("--config", help="a run config (YAML); its model.pretrained must be a local pipeline folder")
    ap.add_argument("--gpu", type=_gpu_sizes, default="24,48,80",
                    help="GPU memory sizes in GB, comma-separated (default 24,48,80)")
    ap.add_argument("--batch", type=positive_int, default=16, help="global batch (default 16)")
    ap.add_argument("--resolution", type=_resolutions, default=None,
                    help="resolutions in pixels, comma-separated (default: the model's)")
    ap.add_argument("--world", type=positive_int, default=None, help="ranks (--config only; default 1)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (--config only)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.preset and (args.world is not None or args.overrides):
        ap.error("--world and key=value overrides go with --config (a preset's options set their own ranks)")
    from dsfast.train.config import check_resolution, load_config
    from dsfast.train.errors import ConfigError, ModelError

    gpus = args.gpu
    try:
        if args.config:
            cfg = load_config(args.config, args.overrides)
            spec = spec_from_pretrained(cfg.model.pretrained, cfg.model.max_sequence_length)
            options = {"config": option_from_config(cfg, args.world or 1)}
            batch = cfg.train.batch_size or args.batch
            res = [cfg.data.resolution or spec["resolution"]]
            # the images the run caches: the instance folder's (if it is there yet), the class images it asks for
            data = dict(images=_count_images(cfg.data.instance_dir) or INSTANCE_IMAGES,
                        class_images=0 if cfg.method == "finetune" else cfg.data.num_class_images)
        else:
            spec = PRESETS[args.preset]
            options = preset_options(spec)
            batch = args.batch
            res = [spec["resolution"]]
            data = {}
        key = "data.resolution"
        if args.resolution:
            res, key = args.resolution, "--resolution"
        for r in res:  # the trainer's rule, before any work
            check_resolution(r, spec_down_factor(spec), key)
    except (ConfigError, ModelError) as exc:
        print(f"dsfast plan: error: {exc}", file=sys.stderr)
        return 1
    print(f"Predicted peak GPU memory per rank (global batch {batch}; 10 % of each GPU left as head-room):")
    print("\n".join(table(Planner(spec, **data), options, gpus, batch, res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
