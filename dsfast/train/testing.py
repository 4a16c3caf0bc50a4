"""Tiny models and image folders for tests and examples (no downloads: built and saved locally)."""
from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .distributed import EXTENSIONS_DIR


def write_images(folder, n: int, size: int = 16, seed: int = 0, mode: str = "RGB",
                 sizes: list[tuple[int, int]] | None = None) -> Path:
    """``n`` images of ``size`` x ``size`` (or one per ``(H, W)`` of ``sizes``) as ``<folder>/img_<k>.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = sizes or [(size, size)] * n
    for i, (h, w) in enumerate(sizes):
        ch = 3 if mode == "RGB" else 1
        base = rng.integers(0, 256, size=(1, 1, ch))
        yy, xx = np.mgrid[0:h, 0:w]
        img = (base + 7 * (xx[..., None] * (i + 1)) + 5 * yy[..., None] + rng.integers(0, 40, (h, w, ch))) % 256
        img = img.astype(np.uint8)
        Image.fromarray(img[..., 0] if ch == 1 else img, mode).save(folder / f"img_{i:03d}.png")
    return folder


def make_unconditional_pipeline(path, *, sample_size: int = 16, channels: int = 3, block_out_channels=(16, 32),
                                learned_sigma: bool = False, prediction_type: str = "epsilon",
                                num_train_timesteps: int = 1000, dropout: float = 0.0, seed: int = 0) -> Path:
    """A tiny UNet2DModel (``dropout`` in its ResNet blocks, as ADM-style UNets) + DDPMScheduler saved as a
    DDPMPipeline folder."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels * (2 if learned_sigma else 1),
        block_out_channels=tuple(block_out_channels), layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (len(block_out_channels) - 1),
        up_block_types=("AttnUpBlock2D",) * (len(block_out_channels) - 1) + ("UpBlock2D",),
        norm_num_groups=8, attention_head_dim=8, dropout=dropout)
    sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type,
                          variance_type="learned_range" if learned_sigma else "fixed_small")
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path))
    return Path(path)


def _tiny_clip_tokenizer(path: Path):
    """A CLIPTokenizer over a tiny byte-level BPE vocabulary (every single character + a few merges)."""
    # byte-level BPE alphabet: printable bytes map to themselves, the others to chars from U+0100 on
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["s k", "sk s</w>", "d o", "do g</w>"]
    for m in merges:
        tok = m.replace(" ", "")
        vocab.setdefault(tok, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16), len(vocab)


def sd_scheduler() -> DDPMScheduler:
    """The scheduler of the tiny SD pipelines (here and ``dsfast.plan.build_pipeline``): steps_offset 1 and no
    clip_sample, as StableDiffusionPipeline wants them (with others it warns, printing the whole config, and
    rewrites them)."""
    return DDPMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """The scheduler_config.json of stable-diffusion-xl-base-1.0 (the tiny SDXL pipelines, ``build_pipeline``)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, steps_offset=1,
        timestep_spacing="leading")


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler_config.json of FLUX.1-dev (the tiny FLUX pipelines, ``build_pipeline``)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)


def make_sd_pipeline(path, *, sample_size: int = 8, seed: int = 0) -> Path:
    """A tiny Stable-Diffusion-family pipeline (UNet2DConditionModel, AutoencoderKL, CLIP) saved locally.

    Images are ``sample_size * 2`` pixels (a 2x VAE).
    """
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        tok, vocab_size = _tiny_clip_tokenizer(Path(d))
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1))
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
            norm_num_groups=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sd_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(path))
    return Path(path)


def unconditional_run_inputs(root) -> Path:
    """``root/model`` (:func:`make_unconditional_pipeline`) and ``root/imgs`` (5 images): a tiny run's inputs."""
    root = Path(root)
    make_unconditional_pipeline(root / "model")
    write_images(root / "imgs", 5)
    return root


def sd_run_inputs(root) -> Path:
    """``root/model`` (:func:`make_sd_pipeline`) and ``root/imgs`` (4 images, 16 px): a tiny text-to-image run's inputs."""
    root = Path(root)
    make_sd_pipeline(root / "model")
    write_images(root / "imgs", 4, size=16)
    return root


def tiny_config(tmp, model: str, images: str, **over) -> dict:
    cfg = {
        "method": "domainstudio",
        "model": {"pretrained": str(model)},
        "data": {"instance_dir": str(images), "resolution": 16},
        "train": {"max_steps": 2, "batch_size": 4, "seed": 0},
        "deepspeed": {"zero_stage": 0},
        "sample": {"num": 4, "num_inference_steps": 2},
        "output_dir": str(Path(tmp) / "run"),
        "checkpoint_every": 0,
        "sample_every": 0,
    }
    for key, value in over.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def subprocess_env() -> dict:
    """Environment for trainer subprocesses in tests: CPU DeepSpeed, one thread, cached extensions."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_script(script, root, timeout: int) -> tuple[dict, str]:
    """Runs ``script <root> <root>/r.json`` in a trainer subprocess (:func:`subprocess_env`): the JSON it wrote and
    its stderr; a failure of the script is an AssertionError with the end of its stderr."""
    p = subprocess.run([sys.executable, str(script), str(root), str(root / "r.json")], env=subprocess_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((root / "r.json").read_text()), p.stderr


# The ZeRO-2 DeepSpeed JSON of the transformers / accelerate docs (ds_config_zero2.json): "auto" values,
# an AdamW optimizer and a WarmupLR scheduler section, ZeRO-2 with CPU optimizer offload.
HF_ZERO2_JSON = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR",
                  "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 2e8, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


# ---- Tiny SD-XL, SD3 and FLUX.1 pipelines (random weights, built from config: nothing is downloaded) ----

def _tiny_clip_encoder(vocab_size: int, hidden_size: int, projection_dim: int | None = None):
    """A one-layer CLIP text encoder over the :func:`_tiny_clip_tokenizer` vocabulary (16 positions);
    ``projection_dim`` given: a ``CLIPTextModelWithProjection`` (its ``text_embeds`` are the pooled embedding)."""
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1, projection_dim=projection_dim or hidden_size)
    return CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)


def _tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer without sentencepiece: a Unigram model over single characters (letters, digits,
    punctuation) and a few whole words, T5's layout (<pad> 0, </s> 1, <unk> 2), no sentinel tokens;
    it saves as tokenizer.json + tokenizer_config.json."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("\u2581" + w, -1.0) for w in ("a", "photo", "of", "sks", "dog", "cat", "painting")]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _tiny_t5_encoder(vocab_size: int, d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))


def _tiny_vae(sample_size: int, latent_channels: int, **config) -> AutoencoderKL:
    """A 2x AutoencoderKL (two blocks): images are ``sample_size * 2`` pixels."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2, **config)


def make_sdxl_pipeline(path, *, sample_size: int = 8, seed: int = 0) -> Path:
    """A tiny Stable-Diffusion-XL pipeline saved locally: a ``text_time`` UNet2DConditionModel conditioned on the
    concatenated hidden states of a CLIPTextModel (16) and a CLIPTextModelWithProjection (16, projection 16), the
    SD-XL EulerDiscreteScheduler, a 2x AutoencoderKL (images are ``sample_size * 2`` pixels)."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        tok, vocab_size = _tiny_clip_tokenizer(Path(d) / "1")
        tok_2, _ = _tiny_clip_tokenizer(Path(d) / "2")
        te = _tiny_clip_encoder(vocab_size, 16)
        te_2 = _tiny_clip_encoder(vocab_size, 16, projection_dim=16)
        time_dim = 8
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=te.config.hidden_size + te_2.config.hidden_size, attention_head_dim=4,
            norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # add_time_ids (original size, crop top-left, target size: 6 numbers) + text_encoder_2's pooled embedding
            projection_class_embeddings_input_dim=6 * time_dim + te_2.config.projection_dim)
        vae = _tiny_vae(sample_size, 4, scaling_factor=0.13025)
        sched = sdxl_scheduler()
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te_2, tokenizer=tok,
                                         tokenizer_2=tok_2, unet=unet, scheduler=sched,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.save_pretrained(str(path))
    return Path(path)


def make_sd3_pipeline(path, *, t5: bool = True, sample_size: int = 8, seed: int = 0) -> Path:
    """A tiny Stable-Diffusion-3 pipeline saved locally: an SD3Transformer2DModel (patch 1, 16 latent channels,
    2 heads of 8, joint_attention_dim 32 = T5's width = the two CLIP widths side by side), two
    CLIPTextModelWithProjection (16, projection 16: pooled 32), a T5EncoderModel (32) unless ``t5=False``
    (``text_encoder_3`` / ``tokenizer_3`` None: the pipeline then feeds zeros), a 2x AutoencoderKL with SD3's
    latent scale/shift, FlowMatchEulerDiscreteScheduler(shift=3). Images are ``sample_size * 2`` pixels."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        tok, vocab_size = _tiny_clip_tokenizer(Path(d) / "1")
        tok_2, _ = _tiny_clip_tokenizer(Path(d) / "2")
        te = _tiny_clip_encoder(vocab_size, 16, projection_dim=16)
        te_2 = _tiny_clip_encoder(vocab_size, 16, projection_dim=16)
        joint_dim = te.config.hidden_size + te_2.config.hidden_size  # CLIP embeddings are zero-padded to T5's width
        tok_3 = _tiny_t5_tokenizer() if t5 else None
        te_3 = _tiny_t5_encoder(len(tok_3), joint_dim) if t5 else None
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=1, in_channels=16, out_channels=16, num_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_dim, caption_projection_dim=16,
            pooled_projection_dim=te.config.projection_dim + te_2.config.projection_dim,
            pos_embed_max_size=4 * sample_size)
        vae = _tiny_vae(sample_size, 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=te,
                                        tokenizer=tok, text_encoder_2=te_2, tokenizer_2=tok_2, text_encoder_3=te_3,
                                        tokenizer_3=tok_3)
        pipe.save_pretrained(str(path))
    return Path(path)


def make_flux_pipeline(path, *, sample_size: int = 8, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """A tiny FLUX.1 pipeline saved locally: a FluxTransformer2DModel (16 latent channels packed 2x2: 64 in,
    one double and one single block, 2 heads of 8, rope axes 2+2+4, ``guidance_embeds`` as given: dev-like
    True, schnell-like False), a CLIPTextModel (16: the pooled embedding), a T5EncoderModel (16), a 2x
    AutoencoderKL with FLUX.1's latent scale/shift, FLUX.1's dynamically shifted FlowMatchEulerDiscreteScheduler.
    Images are ``sample_size * 2`` pixels (latents ``sample_size``, ``(sample_size // 2) ** 2`` tokens)."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        tok, vocab_size = _tiny_clip_tokenizer(Path(d))
        te = _tiny_clip_encoder(vocab_size, 16)
        tok_2 = _tiny_t5_tokenizer()
        te_2 = _tiny_t5_encoder(len(tok_2), 16)
        latent_channels = 16
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=te_2.config.d_model, pooled_projection_dim=te.config.hidden_size,
            guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
        vae = _tiny_vae(sample_size, latent_channels, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
        sched = flux_scheduler()
        pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok,
                            text_encoder_2=te_2, tokenizer_2=tok_2)
        pipe.save_pretrained(str(path))
    return Path(path)
