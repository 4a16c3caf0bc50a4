"""The pretrained pipeline's parts for training: loading them through the model family (LoRA adapters, a frozen
copy of the denoiser), the EMA, full weights under ZeRO-3, and rebuilding / saving diffusers pipelines."""
from __future__ import annotations

import copy
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from peft import LoraConfig

from . import distributed as D
from .errors import TrainingError
from .families import Family, FamilyOptions, ModelInfo, describe, down_factor, get
from .families.base import moved

LORA_DIR = "lora"
__all__ = ["EMA", "LORA_DIR", "Bundle", "build_pipeline", "describe", "down_factor", "export_weights", "load",
           "load_adapters", "lora_config", "pretrained_pipeline", "save_final", "trainable_named_parameters", "update_ema"]


def lora_config(info: ModelInfo, rank: int, alpha: float | None) -> LoraConfig | None:
    """peft LoRA adapters of rank ``rank`` on the family's target modules (None for rank 0: full fine-tuning)."""
    return get(info.family).lora_config(rank, alpha) if rank else None


@dataclass
class Bundle:
    """The loaded pipeline. ``unet`` (the family's denoiser: a UNet or a transformer) trains: it goes into the
    DeepSpeed engine, which places it; the family's other parts are frozen: in eval mode, without gradients,
    in the training precision, on the training device, outside the engine and ZeRO-3."""

    info: ModelInfo
    family: Family
    lora: LoraConfig | None = None
    source: torch.nn.Module | None = None  # frozen copy of the pretrained denoiser

    @property
    def unet(self) -> torch.nn.Module:
        return self.family.model

    @property
    def scheduler(self):
        """The DDPM scheduler of the noise process (DDPM families), its tables on the training device."""
        return self.family.process.scheduler

    @property
    def vae(self):
        return self.family.vae

    @property
    def text_encoder(self):
        return self.family.parts.get("text_encoder")


def load(info: ModelInfo, pretrained: str, *, dtype: torch.dtype, lora: LoraConfig | None, frozen_source: bool,
         device: torch.device, options: FamilyOptions | None = None) -> Bundle:
    """Load the pipeline's parts, the frozen ones on ``device``; ``frozen_source`` adds a frozen copy of the
    pretrained denoiser (before LoRA). Under LoRA the denoiser's own weights are frozen too: they load in the
    training precision; a full fine-tune loads them in float32 (the engine keeps float32 master weights)."""
    family = get(info.family)(pretrained, dtype=dtype, device=device, options=options or FamilyOptions(),
                              trained_dtype=dtype if lora is not None else torch.float32)
    b = Bundle(info, family, lora=lora)
    if frozen_source:
        # a plain module built before deepspeed.initialize, so ZeRO-3 never partitions it
        b.source = moved(copy.deepcopy(b.unet).eval().requires_grad_(False), device, dtype)
    if lora is not None:
        b.unet.requires_grad_(False)
        b.unet.add_adapter(lora)  # only the adapter weights train
    return b


# ----------------------------------------------------------------------------- weights under ZeRO

def trainable_named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def full_parameters(params, zero3: bool):
    """Context in which ZeRO-3 partitioned ``params`` are whole on every rank (collective); a no-op otherwise."""
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None) if zero3 else nullcontext()


class EMA:
    """Exponential moving average of the trainable weights (a 16-bit run's float32 master weights, see
    :func:`trained_weights`): fp32, on the training device, on rank 0.

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


def trained_weights(engine, zero3: bool):
    """``(name, full float32 value)`` of each trained parameter of ``engine`` (on its device), one at a time; every
    rank must exhaust it (collective). A float32 run's module holds the weights themselves; a bf16/fp16 run's module
    holds 16-bit copies rounded from DeepSpeed's float32 master weights, so the masters are taken (ZeRO-1/2/3:
    ``safe_get_full_fp32_param``, an all-reduce or all-gather per parameter; ZeRO-0: its optimizer's copies)."""
    named = trainable_named_parameters(engine.module)
    if all(p.dtype == torch.float32 for _, p in named):
        with full_parameters([p for _, p in named], zero3):
            yield from ((n, p.detach()) for n, p in named)
    elif engine.zero_optimization_stage() == 0:
        yield from zip((n for n, _ in named), zero0_masters(engine.optimizer.state_dict(), [p for _, p in named]))
    else:
        for n, p in named:
            yield n, safe_get_full_fp32_param(p)


def zero0_masters(state: dict, params: list) -> list[torch.Tensor]:
    """The float32 master weights in the state dict of DeepSpeed's ZeRO-0 16-bit optimizer (``FP16_Optimizer``:
    flat per group; ``FP16_UnfusedOptimizer``: one per parameter), in the order of ``params`` (the parameters
    the engine trains, or tensors of their shapes)."""
    held = [m for group in state["fp32_groups"] for m in group] if "fp32_groups" in state else state["fp32_groups_flat"]
    if sum(m.numel() for m in held) != sum(p.numel() for p in params):
        raise TrainingError("DeepSpeed's optimizer holds other parameters than the module trains")
    if "fp32_groups" in state:
        masters = held
    else:  # consecutive views of the flat groups
        flat = iter(held)
        masters, chunk, used = [], next(flat), 0
        for p in params:
            if used == chunk.numel():
                chunk, used = next(flat), 0
            masters.append(chunk[used:used + p.numel()].view(p.shape))
            used += p.numel()
    if [m.shape for m in masters] != [p.shape for p in params]:
        raise TrainingError("DeepSpeed's optimizer holds other parameters than the module trains")
    return masters


def update_ema(ema: EMA | None, engine, zero3: bool, step: int) -> None:
    """One EMA step from the trained weights (:func:`trained_weights`); collective (``ema`` is None off rank 0)."""
    weights = trained_weights(engine, zero3)
    if ema is None:
        for _ in weights:  # the other ranks take part in the gathers
            pass
    else:
        ema.update(weights, step)


def export_weights(engine, ema: EMA | None, zero3: bool) -> dict | None:
    """The module's full float32 CPU state dict on rank 0 (None elsewhere): the trained weights from
    :func:`trained_weights`, or the EMA's in their place; collective."""
    module = engine.module
    trained = {}
    for n, w in trained_weights(engine, zero3):
        if D.rank() == 0:
            trained[n] = w.to("cpu", torch.float32, copy=True)
    frozen = [p for p in module.parameters() if not p.requires_grad]
    with full_parameters(frozen, zero3):
        if D.rank() != 0:
            return None
        sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items() if k not in trained}
    sd.update(trained)
    if ema is not None:
        sd.update({k: v.detach().cpu().clone() for k, v in ema.params.items()})
    return sd


# ----------------------------------------------------------------------------- pipelines

def _base_state_dict(sd: dict) -> dict:
    """Full-model state dict of a peft-wrapped UNet -> plain UNet keys (LoRA dropped, base_layer unwrapped)."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}


def build_unet(bundle: Bundle, sd: dict, *, with_lora: bool = True, exact: bool = False) -> torch.nn.Module:
    """A plain (non-DeepSpeed) denoiser holding ``sd`` (with its LoRA adapters when ``with_lora``). ``exact``: under
    LoRA in a 16-bit run or on a quantized base the frozen base weights come from the pretrained folder in
    float32, not from their rounded copy in ``sd`` (``final/``: a run must not round the weights it never
    trained); a float32 run's ``sd`` holds them exactly. Not ``exact`` on a quantized base (sample grids, class
    images): the base quantized as in training, loaded again from the pretrained folder."""
    if bundle.lora is None:
        unet = type(bundle.unet).from_config(bundle.unet.config)
        unet.load_state_dict(sd)
        return unet.eval()
    family = bundle.family
    if exact and (family.dtype != torch.float32 or family.quantized):
        unet = family.load_part(family.denoiser).float()
    elif family.quantized:  # as it trains: the quantized base from the pretrained folder
        unet = family.load_denoiser(family.dtype)
    else:
        unet = type(bundle.unet).from_config(bundle.unet.config)
        unet.load_state_dict(_base_state_dict(sd))
    if with_lora:
        unet.add_adapter(bundle.lora)
        load_adapters(unet, sd)
    return unet.eval()


def load_adapters(unet: torch.nn.Module, sd: dict) -> None:
    """Copy the LoRA adapter weights of the full state dict ``sd`` into the adapter-holding ``unet``."""
    missing = unet.load_state_dict({k: v for k, v in sd.items() if "lora_" in k}, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"unexpected LoRA keys {missing.unexpected_keys[:4]}")


def build_pipeline(bundle: Bundle, sd: dict, *, device: torch.device, with_lora: bool = True,
                   dtype: torch.dtype = torch.float32):
    """The family's diffusers pipeline around the weights ``sd``, on ``device``, in ``dtype``."""
    return bundle.family.pipeline(build_unet(bundle, sd, with_lora=with_lora), device, dtype)


def pretrained_pipeline(bundle: Bundle, device: torch.device, dtype: torch.dtype = torch.float32):
    """The pipeline of the pretrained weights (before any training step; LoRA adapters off), on ``device``."""
    return build_pipeline(bundle, {k: v.float() for k, v in bundle.unet.state_dict().items()}, device=device,
                          with_lora=False, dtype=dtype)


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
    """``final/``: a pipeline folder for ``DiffusionPipeline.from_pretrained``: the trained denoiser in float32
    (LoRA fused into it) and the frozen parts as the pretrained folder holds them (:meth:`Family.export`: copied
    file by file, not loaded again); for LoRA runs also ``final/lora/pytorch_lora_weights.safetensors`` for the
    pipeline's ``load_lora_weights``. The pretrained denoiser is read from disk at most once (a 16-bit LoRA run:
    its float32 base weights)."""
    with _replace_dir(Path(out)) as tmp:
        unet = build_unet(bundle, sd, exact=True)
        if bundle.lora is not None:
            bundle.family.save_lora(tmp / LORA_DIR, unet)
            unet.fuse_lora()  # W + scale * B @ A (peft's merge), then the plain layers back in place
            unet.unload_lora()
        bundle.family.export(unet, tmp)
