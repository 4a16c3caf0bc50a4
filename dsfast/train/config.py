"""Run configuration: the schema, YAML + dotted ``key=value`` overrides, and the one resolve step.

:func:`load_config` checks the keys and types (pydantic: unknown keys and bad values are errors
naming the key). ``None`` means "the method's official default": :func:`resolve` fills it in, once,
from the method registry and the model (its family, sample size, down-sampling factor) and the world
size, and returns a new, frozen :class:`RunConfig` that nothing changes later. The resolved config is
written to ``<run>/config.yaml`` so a run is reproducible from its folder alone.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from . import families, methods
from .ds_config import adopt_stock_json
from .errors import ConfigError
from .schema import Section

__all__ = ["ConfigError", "RUN_CONFIGS", "RunConfig", "check_resolution", "dump_config", "family_options", "load_config", "parse_overrides",
           "resolve"]


class ModelConfig(Section):
    pretrained: str = Field("", description="required: a local diffusers pipeline folder or a hub id (unet2d, sd, sdxl, sd3 or flux)")
    lora_rank: int = Field(0, ge=0, description="0 = full fine-tune of the UNet/transformer; >0 = peft LoRA adapters on it")
    lora_alpha: float | None = Field(None, description="None = lora_rank")
    vae: str | None = Field(None, description="a VAE folder or hub id to use instead of the pipeline's (e.g. an fp16-safe SDXL VAE)")
    max_sequence_length: int | None = Field(None, ge=1, description="T5 prompt tokens (sd3: 256, flux: 512 when None)")
    guidance: float | None = Field(None, description="flux: the guidance embedding's value in training (guidance-distilled FLUX.1-dev); None = 3.5")


class DataConfig(Section):
    instance_dir: str = Field("", description="required: the folder of training images (resized and centre-cropped)")
    instance_prompt: str | None = Field(None, description="text-to-image only, e.g. \"a sks dog\"; also the prompt of images without a caption")
    captions: Literal["none", "auto", "txt", "metadata"] = Field("none", description="t2i per-image captions, each used as the image's prompt: none (all take instance_prompt) | txt (<image stem>.txt beside it) | metadata (metadata.jsonl: file_name + caption_column) | auto (metadata.jsonl, else .txt files, else none)")
    caption_column: str = Field("text", description="data.captions=metadata: the metadata.jsonl key holding the caption")
    class_prompt: str | None = Field(None, description="text-to-image only, e.g. \"a dog\"")
    class_dir: str | None = Field(None, description="None = <output_dir>/class_images")
    num_class_images: int = Field(200, ge=0, description="class images to have in class_dir (missing ones are generated)")
    resolution: int | None = Field(None, ge=2, description="None = the model's sample size (pixels)")
    random_flip: bool | None = Field(None, description="random horizontal flips; None = the mode's default (dsfast: true; official: as released)")
    center_crop: bool = Field(True, description="centre crop after scaling the shorter side (else the top-left square)")


class TrainConfig(Section):
    max_steps: int = Field(800, ge=1, description="optimizer steps")
    batch_size: int | None = Field(None, ge=1, description="global batch (instance images per optimizer step)")
    micro_batch_size: int | None = Field(None, ge=1, description="per rank per forward; None = batch_size / world size")
    lr: float | None = Field(None, gt=0, description="AdamW learning rate")
    weight_decay: float | None = Field(None, description="AdamW weight decay; None = the mode's default")
    adam_beta1: float = Field(0.9, description="AdamW beta1")
    adam_beta2: float = Field(0.999, description="AdamW beta2")
    adam_eps: float = Field(1e-8, description="AdamW epsilon")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps, then constant")
    max_grad_norm: float | None = Field(None, description="gradient clipping, 0 = none; None = the mode's default")
    seed: int = Field(0, description="every random draw is a function of (seed, step, sample index)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="training precision (fp16: GPU only)")
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in backward (less memory)")
    ema: float | None = Field(None, ge=0.0, lt=1.0, description="EMA decay, 0 = off")
    ema_warmup: bool | None = Field(None, description="EMA decay min(ema, (1+t)/(10+t)); None = the mode's default")
    resume: str = Field("auto", description="auto | latest | none | <checkpoint dir>")
    log_every: int = Field(1, ge=1, description="metrics.jsonl / TensorBoard line every N steps")
    log_grad_norms: bool = Field(False, description="grad_norm/<term> on logging steps (one extra loss-head backward per term)")
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] | None = Field(None, description="sd3/flux: timestep density and loss weighting (diffusers' training_utils); None = sd3 logit_normal, flux none")
    logit_mean: float = Field(0.0, description="weighting_scheme=logit_normal: mean")
    logit_std: float = Field(1.0, description="weighting_scheme=logit_normal: standard deviation")
    mode_scale: float = Field(1.29, description="weighting_scheme=mode: scale")
    precondition_outputs: bool = Field(False, description="sd3/flux: regress x0 = x_t - σ·v̂ on x0 instead of v on ε - x0")


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (2: optimizer + gradients sharded; 3: weights too)")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="optimizer state on the CPU (stage >= 1)")
    offload_param: Literal["none", "cpu"] = Field("none", description="weights on the CPU (stage 3)")
    config: str | None = Field(None, description="stock (HF-style) DeepSpeed JSON: \"auto\" = the dsfast value; a contradiction is an error")

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_param == "cpu" and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param=cpu needs deepspeed.zero_stage=3")
        if self.offload_optimizer == "cpu" and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer=cpu needs deepspeed.zero_stage >= 1")
        return self


class SampleConfig(Section):
    num: int = Field(16, ge=1, description="images per sample grid")
    num_inference_steps: int = Field(50, ge=1, description="sampler steps (grids and class images)")
    seed: int = Field(0, description="image i of a grid uses seed + i")
    prompt: str | None = Field(None, description="text-to-image; None = data.instance_prompt")
    guidance_scale: float = Field(7.5, description="classifier-free guidance (text-to-image)")


class RunConfig(Section):
    """A run's config. Its ``loss`` section is the method's own (``Method.loss_config``): a config is an instance of
    ``RUN_CONFIGS[method]``, a subclass of this class, picked by :func:`load_config` from the ``method`` key."""

    method: str = Field("domainstudio", description="domainstudio | dreambooth (text-to-image) | finetune")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: Section = Section()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    sample: SampleConfig = SampleConfig()
    output_dir: str = Field(description="load_config's default: runs/<config file stem> (runs/dsfast without a file)")
    checkpoint_every: int = Field(500, ge=0, description="0 = only at the end")
    keep_last: int = Field(2, ge=0, description="complete checkpoints kept (0 = all)")
    sample_every: int = Field(500, ge=0, description="0 = never")

    @field_validator("model", "data", "loss", "train", "deepspeed", "sample", mode="before")
    @classmethod
    def _empty_section(cls, v):
        return {} if v is None else v

    @model_validator(mode="after")
    def _required(self):
        if not self.model.pretrained:
            raise ValueError("config key 'model.pretrained' is required (a diffusers pipeline folder or hub id)")
        if not self.data.instance_dir:
            raise ValueError("config key 'data.instance_dir' is required (a folder of training images)")
        if getattr(self.loss, "source", None) == "lora_off" and self.model.lora_rank == 0:  # domainstudio's key
            raise ValueError("loss.source=lora_off needs model.lora_rank > 0")
        return self


def _run_config(method: str, loss: type[Section]) -> type[RunConfig]:
    return create_model(f"RunConfig_{method}", __base__=RunConfig, __module__=__name__,
                        method=(Literal[method], Field(method, description=RunConfig.model_fields["method"].description)),
                        loss=(loss, loss()))


RUN_CONFIGS: dict[str, type[RunConfig]] = {name: _run_config(name, loss) for name, loss in methods.LOSS_CONFIGS.items()}

# Before each method had its own loss section, the resolve step wrote every loss key into every run's config.yaml.
# Such a key of another method is dropped when it holds what that step wrote (an empty or zero weight, the key's
# default, or one of these keys, which it filled for every method); any other value is an error naming its method.
_FILLED_FOR_EVERY_METHOD = ("hfmse_weighting", "space", "source")


def _drop_old_loss_keys(data: dict, method: str) -> None:
    loss = data.get("loss")
    if not isinstance(loss, dict):
        return
    own = methods.LOSS_CONFIGS[method].model_fields
    for key in [k for k in loss if k not in own]:
        owners = [name for name, section in methods.LOSS_CONFIGS.items() if key in section.model_fields]
        if not owners:
            continue  # a key of no method: the schema's error names the known keys
        value = loss[key]
        if (value is None or value == 0 or key in _FILLED_FOR_EVERY_METHOD
                or value == methods.LOSS_CONFIGS[owners[0]].model_fields[key].default):
            del loss[key]
        else:
            raise ConfigError(f"config key 'loss.{key}' belongs to method {' / '.join(owners)}; this config's method "
                              f"is {method} (remove the key, or set method: {owners[0]})")


# ----------------------------------------------------------------------------- loading

def _section_class(cls: type[BaseModel], loc) -> type[BaseModel]:
    for part in loc:
        ann = cls.model_fields[part].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        cls = ann
    return cls


def _config_error(exc: ValidationError, cls: type[RunConfig]) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "<root>"
    if err["type"] == "extra_forbidden":
        known = ", ".join(sorted(_section_class(cls, loc[:-1]).model_fields))
        return ConfigError(f"unknown config key '{key}' (known keys under '{'.'.join(loc[:-1]) or '<root>'}': "
                           f"{known})")
    if err["type"] == "value_error":
        return ConfigError(str(err["ctx"]["error"]))
    return ConfigError(f"config key '{key}' has a bad value {err.get('input')!r}: {err['msg']}")


def _validate(data: dict) -> RunConfig:
    """``data`` (a plain dict, changed in place) as the config class of its method."""
    method = data.setdefault("method", RunConfig.model_fields["method"].default)
    if not isinstance(method, str) or method not in RUN_CONFIGS:
        raise ConfigError(f"config key 'method' must be one of {', '.join(RUN_CONFIGS)}; got {method!r}")
    _drop_old_loss_keys(data, method)
    cls = RUN_CONFIGS[method]
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, cls) from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


_BOOL = "tag:yaml.org,2002:bool"


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans: only true/false are booleans, so ``no``, ``yes``, ``on``
    and ``off`` stay strings (``train.mixed_precision: no`` is the string "no", not False)."""

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text: str, what: str):
    """YAML 1.2 booleans (``_Loader``); a syntax error is one ConfigError naming ``what`` and the place."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{what}: not valid YAML{where}: {problem}") from None


def parse_overrides(overrides) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-5)")
        key, raw = item.split("=", 1)
        out.append((key.strip(), _load_yaml(raw, f"override '{item}'") if raw.strip() != "" else None))
    return out


def load_config(config: dict | str | Path | RunConfig, overrides=()) -> RunConfig:
    """A :class:`RunConfig` from a dict, a YAML path or an existing config, plus ``key=value`` overrides."""
    source_name = None
    if isinstance(config, RunConfig):
        data = config.model_dump()
    elif isinstance(config, dict):
        data = json.loads(json.dumps(config))  # deep copy, plain types
    else:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file {path} is a folder" if path.is_dir() else f"config file not found: {path}")
        data = _load_yaml(path.read_text(), f"config file {path}") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a YAML mapping")
        source_name = path.stem
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    if data.get("output_dir") is None:
        data["output_dir"] = str(Path("runs") / (source_name or "dsfast"))
    return _validate(adopt_stock_json(data))


# ----------------------------------------------------------------------------- the resolve step

def resolve(cfg: RunConfig, family: str, *, world: int = 1, default_resolution: int | None = None,
            down_factor: int = 1) -> RunConfig:
    """The resolved config of a run on a model of ``family`` (a family name) with ``world`` ranks: every
    ``None`` filled (method and family defaults, class_dir, resolution, sample prompt, micro-batch size) and
    every check that needs the model kind or the world size done. Returns a new config; ``cfg`` is not changed."""
    method = methods.get(cfg.method, family, cfg.loss.mode)
    fam = families.get(family)
    d = cfg.model_dump()
    loss, train, data = d["loss"], d["train"], d["data"]
    for key, value in method.defaults[fam.kind].items():  # the method's loss keys, train.lr / ema / batch_size
        section = loss if key in loss else train
        if section[key] is None:
            section[key] = value
    official = loss["mode"] == "official"
    for key, value, applies in (("train.weighting_scheme", train["weighting_scheme"] not in (None, "none"), "sd3, flux"),
                                ("train.precondition_outputs", train["precondition_outputs"], "sd3, flux"),
                                ("model.max_sequence_length", d["model"]["max_sequence_length"] is not None, "sd3, flux"),
                                ("model.guidance", d["model"]["guidance"] is not None, "flux")):
        if value and family not in applies.split(", "):
            raise ConfigError(f"{key} applies to {applies} models only; the model is {family}")
    for section, key, value in ((loss, "hfmse_weighting", "none" if official else fam.default_hfmse_weighting),
                                (loss, "space", "pixel" if official else fam.default_space),  # domainstudio's keys
                                (train, "weighting_scheme", fam.default_weighting or "none"),
                                (train, "weight_decay", RELEASED[fam.kind]["weight_decay"] if official else 0.0),
                                (train, "max_grad_norm", 0.0 if official else 1.0),
                                (train, "ema_warmup", not official),
                                (data, "random_flip", RELEASED[fam.kind]["random_flip"] if official else True)):
        if key in section and section[key] is None:
            section[key] = value
    if official:
        _check_official(loss, family)
    if data["class_dir"] is None:
        data["class_dir"] = str(Path(d["output_dir"]) / "class_images")
    if data["resolution"] is None:
        data["resolution"] = default_resolution or 256
    if d["sample"]["prompt"] is None:
        d["sample"]["prompt"] = data["instance_prompt"]
    batch = train["batch_size"]
    if train["micro_batch_size"] is None:
        if batch % world:
            raise ConfigError(f"train.batch_size={batch} is not a multiple of the world size {world}")
        train["micro_batch_size"] = batch // world
    if batch % (train["micro_batch_size"] * world):
        raise ConfigError(f"train.batch_size={batch} must be a multiple of train.micro_batch_size x world size "
                          f"= {train['micro_batch_size']} x {world}")
    check_resolution(data["resolution"], down_factor)
    if train["mixed_precision"] == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 is not supported on CPU (use bf16 or no)")
    resolved = _validate(d)
    method.check(resolved.loss, resolved.data, fam.kind)
    if method.needs(resolved.loss).pairwise and batch < 3:
        raise ConfigError(f"the pairwise-similarity losses need train.batch_size >= 3 (got {batch})")
    if official and method.needs(resolved.loss).pairwise and resolved.train.micro_batch_size < 3:
        raise ConfigError("loss.mode=official takes the pairwise losses within each micro-batch (as the released "
                          f"code, per GPU batch): train.micro_batch_size must be >= 3 (got "
                          f"{resolved.train.micro_batch_size})")
    return resolved


def family_options(cfg: RunConfig) -> families.FamilyOptions:
    """The model family's settings of a resolved config."""
    m, t = cfg.model, cfg.train
    return families.FamilyOptions(vae=m.vae, max_sequence_length=m.max_sequence_length,
                                  guidance=3.5 if m.guidance is None else m.guidance,
                                  weighting_scheme=t.weighting_scheme, logit_mean=t.logit_mean, logit_std=t.logit_std,
                                  mode_scale=t.mode_scale, precondition_outputs=t.precondition_outputs,
                                  resolution=cfg.data.resolution)


def check_resolution(resolution: int, down_factor: int, key: str = "data.resolution") -> None:
    """The training resolution's rule (``dsfast train``, ``dsfast plan``): a multiple of the model's downsampling
    factor (:func:`dsfast.train.models.down_factor`) and even; ``key`` names the setting in the error."""
    if resolution % down_factor or resolution % 2:
        raise ConfigError(f"{key}={resolution} must be divisible by the model's downsampling factor "
                          f"{max(2, down_factor)}")


# what the released code trains with, where dsfast's defaults differ: guided-diffusion's unconditional training
# (Adam, no weight decay, random flips) and Text-to-Image/train_domainstudio.py (AdamW 1e-2, no --hflip)
RELEASED = {families.UNCONDITIONAL: dict(weight_decay=0.0, random_flip=True),
            families.TEXT2IMAGE: dict(weight_decay=1e-2, random_flip=False)}
_OFFICIAL_LOSS = dict(stencil="domainstudio", space="pixel", tau=1.0, direction="source||adapted", reduction="mean",
                      num_anchors=None, hfmse_weighting="none")


def _check_official(loss: dict, family: str) -> None:
    """loss.mode=official fixes the method's loss keys to the released code's values, which exists for unet2d and
    sd."""
    if family not in ("unet2d", "sd"):
        raise ConfigError(f"loss.mode=official reproduces the released DomainStudio code, which exists for unet2d and sd "
                          f"models only; the model is {family} (use loss.mode=dsfast)")
    for key, value in _OFFICIAL_LOSS.items():
        if key in loss and loss[key] != value:
            raise ConfigError(f"loss.mode=official uses loss.{key}={value!r} (the released code); got {loss[key]!r}")
    if loss.get("source", "frozen") not in ("frozen", "class_prompt"):
        raise ConfigError(f"loss.mode=official uses the released source side; loss.source={loss['source']!r} "
                          "is a dsfast option")


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
