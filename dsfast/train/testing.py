"""Tiny models and image folders for tests and examples (no downloads: built and saved locally)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .distributed import EXTENSIONS_DIR


def write_images(folder, n: int, size: int = 16, seed: int = 0, mode: str = "RGB") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        ch = 3 if mode == "RGB" else 1
        base = rng.integers(0, 256, size=(1, 1, ch))
        yy, xx = np.mgrid[0:size, 0:size]
        img = (base + 7 * (xx[..., None] * (i + 1)) + 5 * yy[..., None] + rng.integers(0, 40, (size, size, ch))) % 256
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
        sched = DDPMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False)  # as SD pipelines want
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
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
