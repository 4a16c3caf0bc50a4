"""Loading the pretrained pipeline's parts, full weights under ZeRO-3, EMA, and rebuilding pipelines."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed as D


class ModelError(ValueError):
    pass


@dataclass
class Bundle:
    family: str  # "unconditional" | "text2image"
    unet: torch.nn.Module  # trainable (goes into the DeepSpeed engine)
    scheduler: object  # DDPMScheduler used for training
    source: torch.nn.Module | None = None  # frozen copy (built before deepspeed.initialize)
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object = None
    pipeline_class: str = ""
    channels: int = 3  # pixel channels of the training images
    down_factor: int = 1  # resolution must be a multiple of this
    default_resolution: int | None = None
    vae_scale: float = 1.0


def model_index(pretrained: str) -> dict:
    from diffusers import DiffusionPipeline

    p = Path(pretrained)
    if p.exists():
        f = p / "model_index.json"
        if not f.is_file():
            raise ModelError(f"model.pretrained={pretrained}: no model_index.json (not a diffusers pipeline folder)")
        return json.loads(f.read_text())
    try:
        return DiffusionPipeline.load_config(pretrained)
    except Exception as exc:
        raise ModelError(f"model.pretrained={pretrained}: cannot load the pipeline config: {exc}") from None


def family_of(index: dict) -> str:
    if "unet" in index and "vae" in index and "text_encoder" in index:
        return "text2image"
    if "unet" in index and "scheduler" in index:
        return "unconditional"
    raise ModelError(f"unsupported pipeline {index.get('_class_name')}: need unet+scheduler "
                     "(unconditional) or unet+vae+text_encoder+tokenizer (Stable Diffusion family)")


def load_bundle(cfg, family: str, index: dict, dtype: torch.dtype) -> Bundle:
    """Load the pipeline's parts; ``cfg`` has its method defaults resolved (loss.source set)."""
    from diffusers import DDPMScheduler

    path = cfg.model.pretrained
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    need_frozen = cfg.method == "domainstudio" and cfg.loss.source == "frozen"
    if family == "unconditional":
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(path, subfolder="unet")
        if cfg.model.lora_rank:
            raise ModelError("model.lora_rank > 0 is supported for Stable-Diffusion-family UNets only")
        b = Bundle(family, unet, scheduler, pipeline_class="DDPMPipeline",
                   channels=unet.config.in_channels, down_factor=2 ** (len(unet.config.block_out_channels) - 1),
                   default_resolution=_size(unet.config.sample_size))
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        for m in (vae, te):
            m.eval().requires_grad_(False).to(dtype)
        vf = 2 ** (len(vae.config.block_out_channels) - 1)
        uf = 2 ** (len(unet.config.block_out_channels) - 1)
        b = Bundle(family, unet, scheduler, vae=vae, text_encoder=te, tokenizer=tok,
                   pipeline_class=index.get("_class_name", "StableDiffusionPipeline"), channels=3,
                   down_factor=vf * uf, default_resolution=(_size(unet.config.sample_size) or 64) * vf,
                   vae_scale=float(getattr(vae.config, "scaling_factor", 0.18215)))
    if need_frozen:
        # Built before deepspeed.initialize and outside zero.Init (DESIGN.md: facts checked).
        b.source = copy.deepcopy(b.unet).eval().requires_grad_(False).to(dtype)
    if cfg.model.lora_rank:
        from .text2image import lora_config

        b.unet.requires_grad_(False)
        b.unet.add_adapter(lora_config(cfg))  # only the adapter weights train
    return b


def _size(s):
    if s is None:
        return None
    return int(s[0] if isinstance(s, (list, tuple)) else s)


def trainable_named_parameters(module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def gathered_params(module, names: set[str] | None, zero3: bool) -> dict | None:
    """fp32 CPU copies of (the named) parameters of ``module``, full size; on rank 0 only (collective)."""
    params = [(n, p) for n, p in module.named_parameters() if names is None or n in names]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            out = {n: p.detach().float().cpu().clone() for n, p in params} if D.rank() == 0 else None
        return out
    return {n: p.detach().float().cpu().clone() for n, p in params} if D.rank() == 0 else None


def full_state_dict(module, zero3: bool) -> dict | None:
    """The module's complete state dict (fp32, CPU) on rank 0; every rank must call it."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
                if D.rank() == 0 else None
        return sd
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if D.rank() == 0 else None


class EMA:
    """Exponential moving average of the trainable weights (fp32, CPU, rank 0).

    decay_t = min(decay, (1 + t) / (10 + t)): the usual warm-up, so short few-shot runs move.
    """

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.params = {k: v.detach().float().cpu().clone() for k, v in params.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, current: dict[str, torch.Tensor], step: int) -> None:
        d = self.decay_at(step)
        for k, v in current.items():
            self.params[k].mul_(d).add_(v.float(), alpha=1 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "params": self.params}

    def load_state_dict(self, sd: dict) -> None:
        self.decay = sd["decay"]
        self.params = {k: v.clone() for k, v in sd["params"].items()}
