"""Rebuilding diffusers pipelines from trained weights; the run's ``final/`` folder."""
from __future__ import annotations

import shutil
from pathlib import Path


LORA_DIR = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"


def _is_peft(module) -> bool:
    return any("lora_" in n for n, _ in module.named_parameters())


def _base_state_dict(sd: dict) -> dict:
    """Full-model state dict of a peft-wrapped UNet -> plain UNet keys (LoRA dropped, base_layer unwrapped)."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}


def _lora_state_dict(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if "lora_" in k}


def build_unet(cfg, bundle, sd: dict, lora: bool = True):
    """A plain (non-DeepSpeed) UNet holding ``sd`` (with its LoRA adapters when ``lora``)."""
    unet = type(bundle.unet).from_config(bundle.unet.config)
    if cfg.model.lora_rank and not lora:
        unet.load_state_dict(_base_state_dict(sd))
    elif cfg.model.lora_rank:
        from .text2image import lora_config

        unet.load_state_dict(_base_state_dict(sd))
        unet.add_adapter(lora_config(cfg))
        missing = unet.load_state_dict(sd, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"unexpected LoRA keys {missing.unexpected_keys[:4]}")
    else:
        unet.load_state_dict(sd)
    return unet.eval()


def build_pipeline(cfg, bundle, sd: dict, lora: bool = True):
    import copy

    from diffusers import DDPMScheduler

    unet = build_unet(cfg, bundle, sd, lora=lora)
    scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
    if bundle.family == "unconditional":
        from diffusers import DDPMPipeline

        return DDPMPipeline(unet=unet, scheduler=scheduler)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=copy.deepcopy(bundle.vae).float(), text_encoder=copy.deepcopy(bundle.text_encoder).float(), tokenizer=bundle.tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_final(cfg, bundle, sd: dict, out: Path) -> None:
    """``final/``: a pipeline folder for ``DiffusionPipeline.from_pretrained`` (adapted weights; LoRA fused),
    and for LoRA runs also ``final/lora/pytorch_lora_weights.safetensors`` for ``load_lora_weights``."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if cfg.model.lora_rank:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        peft_unet = build_unet(cfg, bundle, sd)
        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(peft_unet))
        StableDiffusionPipeline.save_lora_weights(tmp / LORA_DIR, unet_lora_layers=lora, safe_serialization=True)
        pipe = build_pipeline(cfg, bundle, sd, lora=False)
        plain = type(bundle.unet).from_config(bundle.unet.config)
        plain.load_state_dict(_base_state_dict(sd))
        # fuse: W + scale * B @ A, done by peft on the adapter-holding copy, then copied into a plain UNet
        fused = build_unet(cfg, bundle, sd)
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in fused.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
        plain.load_state_dict(_base_state_dict(dict(fused.state_dict())), strict=True)
        pipe.unet = plain
        pipe.register_modules(unet=plain)
        pipe.save_pretrained(tmp)
    else:
        build_pipeline(cfg, bundle, sd).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
