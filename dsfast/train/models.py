"""The pretrained pipeline's parts: what the model is, loading it (LoRA adapters, frozen copies),
text/VAE encoding, the EMA, full weights under ZeRO-3, and rebuilding / saving diffusers pipelines."""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import deepspeed
import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTokenizer

from . import distributed as D
from .errors import ModelError

UNCONDITIONAL, TEXT2IMAGE = "unconditional", "text2image"
LORA_DIR = "lora"


@dataclass(frozen=True)
class ModelInfo:
    """What the pretrained pipeline is, read from its config files (no weights loaded)."""

    family: str  # UNCONDITIONAL (UNet2DModel + scheduler) | TEXT2IMAGE (Stable Diffusion family)
    channels: int  # pixel channels of the training images
    down_factor: int  # the resolution must be a multiple of this
    default_resolution: int | None  # pixels


def _hub_offline() -> bool:
    """True when the Hugging Face Hub cannot be asked: offline mode, or its host name does not resolve."""
    if hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        socket.getaddrinfo(urlparse(hf_constants.ENDPOINT).hostname, 443)
    except OSError:
        return True
    return False


def _model_index(pretrained: str) -> dict:
    """The pipeline's model_index.json: from a local folder, the local hub cache, or the hub. A missing folder,
    or a hub id that is not cached while the hub cannot be reached, is one error at once (no hub retries)."""
    p = Path(pretrained)
    if p.exists():
        f = p / "model_index.json"
        if not f.is_file():
            raise ModelError(f"model.pretrained={pretrained}: no model_index.json (not a diffusers pipeline folder)")
        return json.loads(f.read_text())
    try:
        validate_repo_id(pretrained)
    except HFValidationError:
        raise ModelError(f"model.pretrained={pretrained}: the folder {pretrained} does not exist") from None
    cached = try_to_load_from_cache(pretrained, "model_index.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if _hub_offline():
        raise ModelError(f"model.pretrained={pretrained}: the folder {pretrained} does not exist, and as a hub id "
                         "it is not in the local Hugging Face cache while the hub cannot be reached (offline, a "
                         "local pipeline folder or a cached hub id is needed)")
    try:
        return DiffusionPipeline.load_config(pretrained)
    except Exception as exc:
        raise ModelError(f"model.pretrained={pretrained}: no such folder, and the hub has no pipeline config "
                         f"for it: {exc}") from None


def _size(s) -> int | None:
    if s is None:
        return None
    return int(s[0] if isinstance(s, (list, tuple)) else s)


def down_factor(unet: dict, vae: dict | None = None) -> int:
    """Pixels per UNet cell at its lowest level, from the configs: the UNet halves the size at each level but the
    last, a VAE (text-to-image) at each of its levels but the last. A training resolution is a multiple of it."""
    return 2 ** (len(unet["block_out_channels"]) - 1 + (len(vae["block_out_channels"]) - 1 if vae else 0))


def describe(pretrained: str) -> ModelInfo:
    index = _model_index(pretrained)
    if "unet" in index and "vae" in index and "text_encoder" in index:
        unet = UNet2DConditionModel.load_config(pretrained, subfolder="unet")
        vae = AutoencoderKL.load_config(pretrained, subfolder="vae")
        vf = 2 ** (len(vae["block_out_channels"]) - 1)
        return ModelInfo(TEXT2IMAGE, 3, down_factor(unet, vae), (_size(unet.get("sample_size")) or 64) * vf)
    if "unet" in index and "scheduler" in index:
        unet = UNet2DModel.load_config(pretrained, subfolder="unet")
        return ModelInfo(UNCONDITIONAL, int(unet["in_channels"]), down_factor(unet), _size(unet.get("sample_size")))
    raise ModelError(f"unsupported pipeline {index.get('_class_name')}: need unet+scheduler "
                     "(unconditional) or unet+vae+text_encoder+tokenizer (Stable Diffusion family)")


def lora_config(rank: int, alpha: float | None) -> LoraConfig:
    """peft LoRA adapters on the attention projections of the UNet."""
    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                      target_modules=["to_k", "to_q", "to_v", "to_out.0"])


@dataclass
class Bundle:
    """The loaded pipeline parts. ``unet`` trains (it goes into the DeepSpeed engine, which places it); the others
    are frozen: in eval mode, without gradients, in the training precision, on the training device, outside the
    engine and ZeRO-3. The scheduler's tables (betas, alphas) are on the training device too."""

    info: ModelInfo
    unet: torch.nn.Module
    scheduler: DDPMScheduler
    lora: LoraConfig | None = None
    source: torch.nn.Module | None = None  # frozen copy of the pretrained UNet
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: CLIPTokenizer | None = None

    @property
    def vae_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))


def _frozen(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    return module.eval().requires_grad_(False).to(device, dtype)


def load(info: ModelInfo, pretrained: str, *, dtype: torch.dtype, lora: LoraConfig | None, frozen_source: bool,
         device: torch.device) -> Bundle:
    """Load the pipeline's parts, the frozen ones on ``device``; ``frozen_source`` adds a frozen copy of the
    pretrained UNet (before LoRA)."""
    scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    for table in ("betas", "alphas", "alphas_cumprod"):
        setattr(scheduler, table, getattr(scheduler, table).to(device))
    if info.family == UNCONDITIONAL:
        if lora is not None:
            raise ModelError("model.lora_rank > 0 is supported for Stable-Diffusion-family UNets only")
        b = Bundle(info, UNet2DModel.from_pretrained(pretrained, subfolder="unet"), scheduler)
    else:
        b = Bundle(info, UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet"), scheduler, lora=lora,
                   vae=_frozen(AutoencoderKL.from_pretrained(pretrained, subfolder="vae"), dtype, device),
                   text_encoder=_frozen(CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder"), dtype,
                                        device),
                   tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer"))
    if frozen_source:
        # a plain module built before deepspeed.initialize, so ZeRO-3 never partitions it
        b.source = _frozen(copy.deepcopy(b.unet), dtype, device)
    if lora is not None:
        b.unet.requires_grad_(False)
        b.unet.add_adapter(lora)  # only the adapter weights train
    return b


@torch.no_grad()
def encode_prompt(bundle: Bundle, prompt: str, device: torch.device) -> torch.Tensor:
    """The text encoder's embedding of ``prompt`` (float32, on ``device``, where the text encoder is)."""
    tok = bundle.tokenizer(prompt, padding="max_length", max_length=bundle.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
    return bundle.text_encoder(tok.input_ids.to(device))[0].float()


@torch.no_grad()
def encode_images(bundle: Bundle, images: torch.Tensor, dtype: torch.dtype, device: torch.device, batch: int = 8,
                  std: bool = False):
    """VAE latents (the latent mean, not a sample) x the VAE scaling factor, on ``device`` (where the VAE is);
    with ``std`` also the posterior std x the scaling factor: ``(mean, std)``."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        dist = bundle.vae.encode(images[i:i + batch].to(device, dtype)).latent_dist
        means.append(dist.mean.float() * bundle.vae_scale)
        stds.append(dist.std.float() * bundle.vae_scale)
    return (torch.cat(means), torch.cat(stds)) if std else torch.cat(means)


# ----------------------------------------------------------------------------- weights under ZeRO

def trainable_named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def full_parameters(params, zero3: bool):
    """Context in which ZeRO-3 partitioned ``params`` are whole on every rank (collective); a no-op otherwise."""
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None) if zero3 else nullcontext()


def full_state_dict(module: torch.nn.Module, zero3: bool) -> dict | None:
    """The module's complete state dict (fp32, CPU) on rank 0, None elsewhere; every rank must call it."""
    with full_parameters(module.parameters(), zero3):
        if D.rank() != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


class EMA:
    """Exponential moving average of the trainable weights: fp32, on the training device, on rank 0.

    decay_t = min(decay, (1 + t) / (10 + t)) with ``warmup`` (the usual warm-up, so short few-shot runs move),
    else the constant ``decay`` (the released DomainStudio code).
    ``state_dict`` (checkpoints: ``ema.pt``) holds CPU copies.
    """

    def __init__(self, named_params, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.params = {n: p.detach().to(torch.float32, copy=True) for n, p in named_params}

    def to(self, device) -> EMA:
        self.params = {k: v.to(device) for k, v in self.params.items()}
        return self

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, named_params, step: int) -> None:
        d = self.decay_at(step)
        for n, p in named_params:
            avg = self.params[n]
            avg.mul_(d).add_(p.detach().to(avg.device, torch.float32), alpha=1 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "params": {k: v.cpu() for k, v in self.params.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.decay = sd["decay"]
        for k, v in sd["params"].items():
            self.params[k].copy_(v)


def update_ema(ema: EMA | None, module: torch.nn.Module, zero3: bool, step: int) -> None:
    """One EMA step from the engine's weights; collective under ZeRO-3 (``ema`` is None off rank 0)."""
    named = trainable_named_parameters(module)
    with full_parameters([p for _, p in named], zero3):
        if ema is not None:
            ema.update(named, step)


def export_weights(module: torch.nn.Module, ema: EMA | None, zero3: bool) -> dict | None:
    """Full fp32 CPU state dict on rank 0 with the EMA weights in place of the trained ones; collective."""
    sd = full_state_dict(module, zero3)
    if sd is not None and ema is not None:
        sd.update({k: v.detach().cpu().clone() for k, v in ema.params.items()})
    return sd


# ----------------------------------------------------------------------------- pipelines

def _base_state_dict(sd: dict) -> dict:
    """Full-model state dict of a peft-wrapped UNet -> plain UNet keys (LoRA dropped, base_layer unwrapped)."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}


def build_unet(bundle: Bundle, sd: dict, *, with_lora: bool = True) -> torch.nn.Module:
    """A plain (non-DeepSpeed) UNet holding ``sd`` (with its LoRA adapters when ``with_lora``)."""
    unet = type(bundle.unet).from_config(bundle.unet.config)
    if bundle.lora is None:
        unet.load_state_dict(sd)
        return unet.eval()
    unet.load_state_dict(_base_state_dict(sd))
    if with_lora:
        unet.add_adapter(bundle.lora)
        missing = unet.load_state_dict(sd, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"unexpected LoRA keys {missing.unexpected_keys[:4]}")
    return unet.eval()


def build_pipeline(bundle: Bundle, sd: dict, *, device: torch.device, with_lora: bool = True):
    """A diffusers pipeline (DDPMPipeline or StableDiffusionPipeline, fp32) around the weights ``sd``, on ``device``."""
    unet = build_unet(bundle, sd, with_lora=with_lora)
    if bundle.info.family == UNCONDITIONAL:
        return DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(bundle.scheduler.config)).to(device)
    # the values StableDiffusionPipeline forces on a scheduler (with a FutureWarning dumping its config)
    scheduler = DDPMScheduler.from_config(bundle.scheduler.config, steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(
        vae=copy.deepcopy(bundle.vae).float(), text_encoder=copy.deepcopy(bundle.text_encoder).float(),
        tokenizer=bundle.tokenizer, unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).to(device)


def pretrained_pipeline(bundle: Bundle, device: torch.device):
    """The pipeline of the pretrained weights (before any training step; LoRA adapters off), on ``device``."""
    return build_pipeline(bundle, {k: v.float() for k, v in bundle.unet.state_dict().items()}, device=device,
                          with_lora=False)


@contextmanager
def _replace_dir(out: Path):
    """Write into ``<out>.tmp`` and move it to ``out`` when done, so ``out`` is never half-written (and the
    temporary folder of a write that fails is removed)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left (a full disk, an interrupt)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def save_final(bundle: Bundle, sd: dict, out: Path) -> None:
    """``final/``: a pipeline folder for ``DiffusionPipeline.from_pretrained`` (adapted weights; LoRA fused),
    and for LoRA runs also ``final/lora/pytorch_lora_weights.safetensors`` for ``load_lora_weights``."""
    with _replace_dir(Path(out)) as tmp:
        pipe = build_pipeline(bundle, sd, device=torch.device("cpu"), with_lora=False)
        if bundle.lora is not None:
            peft_unet = build_unet(bundle, sd)
            lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(peft_unet))
            StableDiffusionPipeline.save_lora_weights(tmp / LORA_DIR, unet_lora_layers=lora, safe_serialization=True)
            # fuse W + scale * B @ A with peft on the adapter-holding copy, then copy into the plain UNet
            for m in peft_unet.modules():
                if isinstance(m, BaseTunerLayer):
                    m.merge()
            pipe.unet.load_state_dict(_base_state_dict(dict(peft_unet.state_dict())), strict=True)
        pipe.save_pretrained(tmp)
