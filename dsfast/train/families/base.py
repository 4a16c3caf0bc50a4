"""What a model family is: the small interface every method trains through.

A family knows one kind of diffusers pipeline: how to recognise it from its ``model_index.json``
(:meth:`Family.matches`), its size rules (:meth:`Family.info`), how to load its parts, turn prompts into
the conditioning its denoiser takes (:meth:`encode_prompts`), images into what it diffuses and back
(:meth:`encode` / :meth:`decode`), call the denoiser (:meth:`predict`), which noise process it trains
with (``process``: :class:`~dsfast.train.diffusion.DDPM` or :class:`~dsfast.train.diffusion.FlowMatching`),
where LoRA adapters go (``lora_targets``), which pipeline samples from the weights (:meth:`pipeline`)
and how it writes them as a pipeline folder (:meth:`export`). Conditioning is a dict of batch-first
float32 tensors on the training device, so a method can index, expand and concatenate it without
knowing what is inside.

A new family is a file in this folder with a subclass, and a line in ``families/__init__.py``.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.checkpoint import checkpoint

from ..diffusion import DDPM, FlowMatching
from ..errors import ModelError

UNCONDITIONAL, TEXT2IMAGE = "unconditional", "text2image"  # the two kinds of model the methods know
SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}  # sample.scheduler's names for DDPM-trained families


@dataclass(frozen=True)
class ModelInfo:
    """What the pretrained pipeline is, read from its config files (no weights loaded)."""

    family: str  # the family's name (unet2d | sd | sdxl | sd3 | flux)
    kind: str  # UNCONDITIONAL (no prompts) | TEXT2IMAGE
    channels: int  # pixel channels of the training images
    down_factor: int  # the resolution must be a multiple of this
    default_resolution: int | None  # pixels


@dataclass(frozen=True)
class FamilyOptions:
    """The family settings of a run (``model.*`` and ``train.weighting_scheme`` ... of the config)."""

    vae: str | None = None  # a VAE folder or hub id used instead of the pipeline's (e.g. an fp16-safe SDXL VAE)
    max_sequence_length: int | None = None  # T5 tokens (sd3: 256, flux: 512 when None)
    guidance: float = 3.5  # the guidance embedding's value while training a guidance-distilled FLUX
    weighting_scheme: str | None = None  # flow matching: timestep density and loss weighting (None = family default)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False  # flow matching: regress x0 = x_t - σ·v̂ on x0 (SD3 script's flag)
    resolution: int | None = None  # training images' size in pixels (SDXL's size conditioning)
    sampler: str = "pipeline"  # sample.scheduler: the pipeline's own scheduler, or a name of SAMPLERS
    quantize: str = "none"  # LoRA runs: the denoiser's frozen base weights quantized (see quantization_config)


# model.quantize -> the package its quantization config needs (checked before any work, imported only by a run
# that asks for it: quantization_config)
QUANTIZERS = {"int8": "torchao", "float8": "torchao", "nf4": "bitsandbytes"}


def quantization_config(kind: str, dtype: torch.dtype):
    """diffusers' quantization config of ``model.quantize=kind`` (None for ``none``): torchao weight-only int8 /
    float8 (``TorchAoConfig``), bitsandbytes 4-bit NF4 computing in ``dtype`` (``BitsAndBytesConfig``)."""
    if kind == "none":
        return None
    from diffusers import BitsAndBytesConfig, TorchAoConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())


def hub_offline() -> bool:
    """True when the Hugging Face Hub cannot be asked: offline mode, or its host name does not resolve."""
    if hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        socket.getaddrinfo(urlparse(hf_constants.ENDPOINT).hostname, 443)
    except OSError:
        return True
    return False


def model_index(pretrained: str) -> dict:
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
    if hub_offline():
        raise ModelError(f"model.pretrained={pretrained}: the folder {pretrained} does not exist, and as a hub id "
                         "it is not in the local Hugging Face cache while the hub cannot be reached (offline, a "
                         "local pipeline folder or a cached hub id is needed)")
    try:
        return DiffusionPipeline.load_config(pretrained)
    except Exception as exc:
        raise ModelError(f"model.pretrained={pretrained}: no such folder, and the hub has no pipeline config "
                         f"for it: {exc}") from None


def size_of(s) -> int | None:
    if s is None:
        return None
    return int(s[0] if isinstance(s, (list, tuple)) else s)


def vae_factor(vae: dict) -> int:
    """Pixels per latent cell of a VAE config: it halves the size at each level but the last."""
    return 2 ** (len(vae["block_out_channels"]) - 1)


def part_class(index: dict, name: str):
    """The class ``model_index.json`` names for part ``name``."""
    library, cls = index[name]
    return getattr(importlib.import_module(library), cls)


def frozen(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    return module.eval().requires_grad_(False).to(device, dtype)


def moved(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(device, dtype)``; a quantized diffusers model (``model.quantize``) only to ``device``: it is in the
    training precision already, and diffusers refuses to cast it."""
    return model.to(device) if getattr(model, "is_quantized", False) else model.to(device, dtype)


def placed(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` itself when every weight is on ``device`` in ``dtype``, else a copy there."""
    if all(p.device == torch.device(device) and p.dtype == dtype for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(device, dtype)


# the weights from_pretrained reads by default: (sharded) non-variant safetensors and their index
_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
_SERIALIZED = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".gguf")


def copy_part_files(src: Path, out: Path) -> bool:
    """Copy the files of the part folder ``src`` that ``from_pretrained`` reads (its config files and its
    non-variant ``.safetensors`` weights; other weight files such as ``.bin`` or ``.fp16.safetensors`` are left
    out) into ``out``; False (nothing copied) when it has no such weights."""
    files = [f for f in src.iterdir() if f.is_file()]
    if not any(_WEIGHTS.fullmatch(f.name) for f in files):
        return False
    out.mkdir(parents=True)
    for f in files:
        if _WEIGHTS.fullmatch(f.name) or not (f.name.endswith(_SERIALIZED) or ".index." in f.name):
            shutil.copyfile(f, out / f.name)  # the hub cache's links are followed
    return True


def quantized_weights_as_buffers(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with each frozen weight that is a quantized tensor subclass (torchao's) held as a non-persistent
    buffer of the same name: the layers read it as before; DeepSpeed's engine, which tracks its parameters with
    weak references, moves it to the device as a buffer (a parameter of a tensor subclass is swapped in place on
    ``.to()``, which weak references forbid); and checkpoints leave it out (it is the pretrained folder's weight,
    quantized again when a run resumes)."""
    for layer in module.modules():
        for name, p in list(layer._parameters.items()):
            if p is not None and is_traceable_wrapper_subclass(p):
                del layer._parameters[name]
                layer.register_buffer(name, p.detach(), persistent=False)
    return module


class Family:
    """One kind of diffusers pipeline; an instance holds the loaded frozen parts of one run (see the module
    docstring). Subclasses set the class attributes and implement the methods that raise here."""

    name: ClassVar[str]
    kind: ClassVar[str] = TEXT2IMAGE
    denoiser: ClassVar[str] = "unet"  # the pipeline part that trains ("unet" | "transformer")
    denoiser_class: ClassVar[str | None] = None  # its class name, when that alone tells the family
    pipeline_class: ClassVar[type]
    lora_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")  # peft target_modules
    skip_parts: ClassVar[tuple[str, ...]] = ()  # parts of the folder a run never loads (safety checker ...)
    default_space: ClassVar[str] = "latent"  # where DomainStudio compares samples by default (loss.space)
    default_hfmse_weighting: ClassVar[str] = "min_snr"
    default_weighting: ClassVar[str | None] = None  # flow matching: train.weighting_scheme's default (None: DDPM)
    samplers: ClassVar[tuple[str, ...]] = ("pipeline", *SAMPLERS)  # the sample.scheduler values it takes
    vae_fp32: ClassVar[bool] = False  # the pipeline's VAE overflows in float16: keep it in float32 (SDXL)
    pipeline_flags: ClassVar[dict] = {}  # pipeline arguments that override the folder's model_index.json

    # ---------------------------------------------------------------- what the folder is (no weights)

    @classmethod
    def matches(cls, index: dict) -> bool:
        """Whether a pipeline with this ``model_index.json`` is of this family."""
        return index.get(cls.denoiser, [None, None])[1] == cls.denoiser_class

    @classmethod
    def info(cls, pretrained: str, index: dict) -> ModelInfo:
        raise NotImplementedError

    # ---------------------------------------------------------------- loading

    def __init__(self, pretrained: str, *, dtype: torch.dtype, device: torch.device, trained_dtype: torch.dtype,
                 options: FamilyOptions):
        """Loads every part but the denoiser, frozen (eval, no grad) in ``dtype`` on ``device``; the denoiser
        (``self.model``) in ``trained_dtype`` on the CPU (the DeepSpeed engine places it), its weights quantized
        as ``options.quantize`` says (:meth:`load_denoiser`)."""
        self.pretrained, self.dtype, self.device, self.options = pretrained, dtype, device, options
        self.index = model_index(pretrained)
        self.parts: dict = {}
        self.dropped: list[str] = []  # text encoders freed after the prompts were encoded (drop_text_encoders)
        for name, spec in self.index.items():
            if name.startswith("_") or not isinstance(spec, (list, tuple)):
                continue
            if spec[0] is None or name in self.skip_parts:
                self.parts[name] = None
            elif name == self.denoiser:
                self.model = self.load_denoiser(trained_dtype)
            else:
                part = self.load_part(name)
                self.parts[name] = frozen(part, self.part_dtype(name), device) if isinstance(part, torch.nn.Module) else part
        self.process = self.make_process()

    def load_part(self, name: str):
        """Part ``name`` as the folder (or ``model.vae``) holds it, on the CPU."""
        cls = part_class(self.index, name)
        if name == "vae" and self.options.vae:
            return cls.from_pretrained(self.options.vae)
        return cls.from_pretrained(self.pretrained, subfolder=name)

    def load_denoiser(self, dtype: torch.dtype) -> torch.nn.Module:
        """The denoiser in ``dtype`` on the CPU, its weights quantized per ``options.quantize`` (diffusers'
        quantization config: the linear layers' weights quantized, the other weights in ``dtype``)."""
        config = quantization_config(self.options.quantize, dtype)
        if config is None:
            return self.load_part(self.denoiser).to(dtype)
        model = part_class(self.index, self.denoiser).from_pretrained(self.pretrained, subfolder=self.denoiser,
                                                                      quantization_config=config, torch_dtype=dtype)
        return quantized_weights_as_buffers(model)

    @property
    def quantized(self) -> bool:
        return self.options.quantize != "none"

    def part_dtype(self, name: str) -> torch.dtype:
        """The precision of frozen part ``name`` in training."""
        return torch.float32 if name == "vae" and self.options.vae is None and self.vae_fp32 else self.dtype

    def make_process(self):
        """The noise process of training (:func:`ddpm` or :func:`flow_matching` of this family)."""
        raise NotImplementedError

    @property
    def vae(self):
        return self.parts.get("vae")

    @classmethod
    def lora_config(cls, rank: int, alpha: float | None) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                          target_modules=list(cls.lora_targets))

    # ---------------------------------------------------------------- conditioning and latents

    def encode_prompts(self, prompts: list[str]) -> dict:
        """The denoiser's conditioning of each prompt: ``{name: (len(prompts), ...) float32}`` on the device."""
        raise NotImplementedError

    def image_conditioning(self, geometry: torch.Tensor) -> dict:
        """The conditioning that comes from each training image rather than its prompt, from
        :func:`dsfast.train.data.image_geometry`'s ``(..., 4)`` rows (original H, W, crop top, left), replacing
        the same keys of :meth:`encode_prompts`' conditioning: ``{name: (..., k) float32}``; none here."""
        return {}

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch: int = 8, std: bool = False):
        """What the denoiser diffuses, from images in [-1, 1] (on the device): VAE latent means, shifted and
        scaled as the family's pipeline un-does before decoding; with ``std`` also the posterior std, scaled."""
        vae, scale, shift = self.vae, self.scaling, self.shift
        means, stds = [], []
        for i in range(0, images.shape[0], batch):
            dist = vae.encode(images[i:i + batch].to(self.device, vae.dtype)).latent_dist
            means.append((dist.mean.float() - shift) * scale)
            stds.append(dist.std.float() * scale)
        return (torch.cat(means), torch.cat(stds)) if std else torch.cat(means)

    @property
    def scaling(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", None) or 0.18215)

    @property
    def shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def decode(self, z: torch.Tensor, grad: bool, unscale: bool = True) -> torch.Tensor:
        """Pixels (float32) of latents; with ``grad`` checkpointed (the decoder's activations are recomputed).
        ``unscale=False`` decodes ``z`` as it is (the released DomainStudio code forgot the scaling factor)."""
        vae = self.vae
        if unscale:
            z = z / self.scaling + self.shift

        def run(u):
            return vae.decode(u.to(vae.dtype)).sample.float()

        if not grad:
            with torch.no_grad():
                return run(z)
        return checkpoint(run, z, use_reentrant=False)

    # ---------------------------------------------------------------- the denoiser

    def predict(self, model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's output (float32, the layout of ``x_t``) at timestep indices ``t``."""
        raise NotImplementedError

    diffusion_term: ClassVar[str] = "instance"  # the logged name of the diffusion loss

    def split_output(self, raw: torch.Tensor, channels: int):
        """``(prediction, learned variance or None)`` of a :meth:`predict` output of samples with ``channels``."""
        return raw, None

    def extra_terms(self, pred, var, x0, x_t, t) -> dict:
        """Loss terms the family adds to the diffusion loss (L_vlb of a model that learns its variance)."""
        return {}

    # ---------------------------------------------------------------- pipelines

    def sampling_scheduler(self):
        """The scheduler of sample grids, class images and ``final/`` (``options.sampler``): the pipeline's own, or
        a scheduler of :data:`SAMPLERS` built from its config."""
        own = self.parts["scheduler"]
        if self.options.sampler == "pipeline":
            return copy.deepcopy(own)
        return SAMPLERS[self.options.sampler].from_config(own.config)

    def pipeline(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32):
        """The family's diffusers pipeline around ``model``, on ``device``, in ``dtype``: a frozen part already there
        in that precision is used as it is, the others are copied (the text encoders come back from the CPU for it,
        see :meth:`offload_text_encoders`)."""
        parts = {name: placed(part, device, dtype) if isinstance(part, torch.nn.Module) else part
                 for name, part in self.parts.items()}
        return self._assemble(parts, moved(model, device, dtype))

    def _assemble(self, parts: dict, model: torch.nn.Module):
        """The pipeline object of ``parts`` (the pipeline's own flags, the sampling scheduler) and ``model``."""
        parts = {**parts, "scheduler": self.sampling_scheduler()}
        accepted = inspect.signature(self.pipeline_class.__init__).parameters
        flags = {k: v for k, v in self.index.items() if not k.startswith("_") and not isinstance(v, (list, tuple))
                 and k in accepted}
        flags.update(self.pipeline_flags)
        parts = {k: v for k, v in parts.items() if k in accepted}
        return self.pipeline_class(**parts, **flags, **{self.denoiser: model})

    def export(self, model: torch.nn.Module, folder: Path) -> None:
        """Write the pipeline folder of ``model`` (``final/``) part by part, without a second copy of the frozen
        parts in memory: ``model_index.json`` and the denoiser, tokenizers and scheduler from memory, each frozen
        part's files (dropped text encoders' too) copied from the folder it was loaded from (:meth:`part_folder`);
        a part whose folder is not at hand, or holds no ``.safetensors`` weights, is saved from memory when it is
        in float32 there, else loaded from its folder (in its saved precision) and saved, one part at a time."""
        pipe = self._assemble(dict(self.parts), model)
        folder.mkdir(parents=True, exist_ok=True)
        pipe.save_config(folder)
        if self.dropped:  # the pipeline object has None there: model_index.json names the folder's classes
            index = json.loads((folder / "model_index.json").read_text())
            index.update({name: self.index[name] for name in self.dropped})
            (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for name, spec in pipe.config.items():
            if name.startswith("_") or not isinstance(spec, (list, tuple)) or (spec[0] is None and name not in self.dropped):
                continue
            part = getattr(pipe, name)  # None: a dropped text encoder
            if part is model or (part is not None and not isinstance(part, torch.nn.Module)):
                part.save_pretrained(folder / name)
                continue
            src = self.part_folder(name)
            if src is not None and copy_part_files(src, folder / name):
                continue
            if part is not None and all(p.dtype == torch.float32 for p in part.parameters()):
                part.save_pretrained(folder / name)
            else:
                self.load_part(name).save_pretrained(folder / name)

    def part_folder(self, name: str) -> Path | None:
        """The folder part ``name`` loads from (``<pretrained>/<name>``, or ``model.vae``): a local folder or its
        copy in the local Hugging Face cache; None when neither is at hand."""
        repo, sub = (self.options.vae, "") if name == "vae" and self.options.vae else (self.pretrained, name)
        if Path(repo).is_dir():
            return Path(repo, sub)
        cached = try_to_load_from_cache(repo, f"{sub}/config.json" if sub else "config.json")
        return Path(cached).parent if isinstance(cached, str) else None

    def offload_text_encoders(self) -> None:
        """Moves the text encoders to the CPU once the prompts are encoded (T5-XXL alone is 4.7 B parameters): training
        needs only the cached conditioning; sample grids and ``final/`` take copies."""
        for name, part in self.parts.items():
            if name.startswith("text_encoder") and part is not None:
                part.to("cpu")

    def drop_text_encoders(self) -> None:
        """Frees the text encoders once every prompt is encoded (``model.drop_text_encoders``): sample grids take the
        cached :meth:`sample_conditioning`; :meth:`export` copies their files from the pretrained folder."""
        for name, part in self.parts.items():
            if name.startswith("text_encoder") and part is not None:
                self.parts[name] = None
                self.dropped.append(name)

    def sample_conditioning(self, prompt: str, guidance: bool) -> dict:
        """The pipeline's own encoding of ``prompt`` for one image, as its call's keyword arguments
        (``prompt_embeds=...``, and with ``guidance`` the unconditional embeddings classifier-free guidance
        needs), on the device: sample grids of a run whose text encoders are dropped."""
        raise NotImplementedError

    def lora_state_dict(self, peft_model: torch.nn.Module) -> dict:
        """The adapters of ``peft_model`` as ``load_lora_weights`` reads them."""
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(peft_model))

    def save_lora(self, folder: Path, peft_model: torch.nn.Module) -> None:
        self.pipeline_class.save_lora_weights(folder, safe_serialization=True,
                                              **{f"{self.denoiser}_lora_layers": self.lora_state_dict(peft_model)})


def expand(cond: dict, m: int) -> dict:
    """A one-prompt conditioning repeated for ``m`` samples (views, no copies)."""
    return {k: v.expand(m, *v.shape[1:]) for k, v in cond.items()}


def cat(*conds: dict) -> dict:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def take(cond: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in cond.items()}


def ddpm(family: Family) -> DDPM:
    """The DDPM process of the pipeline's scheduler config (a ``DDPMScheduler`` built from it, as diffusers'
    training scripts do), its tables on the training device."""
    scheduler = DDPMScheduler.from_config(family.parts["scheduler"].config)
    for table in ("betas", "alphas", "alphas_cumprod"):
        setattr(scheduler, table, getattr(scheduler, table).to(family.device))
    return DDPM(scheduler)


def flow_matching(family: Family) -> FlowMatching:
    """Rectified flow on the pipeline's ``FlowMatchEulerDiscreteScheduler`` config, weighted per the options."""
    o = family.options
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(family.parts["scheduler"].config)
    return FlowMatching(scheduler, family.device, weighting=o.weighting_scheme or family.default_weighting,
                        logit_mean=o.logit_mean, logit_std=o.logit_std, mode_scale=o.mode_scale,
                        precondition=o.precondition_outputs)
