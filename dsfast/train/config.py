"""Run configuration: YAML -> nested dataclasses, dotted ``key=value`` overrides, method defaults.

Every key has a documented default (see the README table). ``None`` means "the method's
official default", filled in by :func:`resolve_defaults` once the model family is known
(unconditional UNet2DModel pipeline vs Stable-Diffusion family). The resolved config is
written to ``<run>/config.yaml`` so a run is reproducible from its folder alone.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

METHODS = ("domainstudio", "dreambooth", "finetune")
PRECISIONS = ("no", "bf16", "fp16")
OFFLOAD = ("none", "cpu")
SPACES = ("pixel", "latent")
SOURCES = ("frozen", "class_prompt", "lora_off")


class ConfigError(ValueError):
    """A bad configuration value or an unknown key (the message names the key)."""


@dataclass
class ModelConfig:
    pretrained: str = ""  # local diffusers pipeline folder or hub id
    lora_rank: int = 0  # 0 = full fine-tune of the UNet; >0 = peft LoRA adapters on the UNet
    lora_alpha: float | None = None  # None = lora_rank


@dataclass
class DataConfig:
    instance_dir: str = ""
    instance_prompt: str | None = None  # text-to-image only, e.g. "a sks dog"
    class_prompt: str | None = None  # text-to-image only, e.g. "a dog"
    class_dir: str | None = None  # None = <output_dir>/class_images
    num_class_images: int = 200
    resolution: int | None = None  # None = the model's sample size (pixels)
    random_flip: bool = True
    center_crop: bool = True


@dataclass
class LossConfig:
    prior: float | None = None  # lambda_prior (dreambooth, text-to-image domainstudio)
    image: float | None = None  # lambda_img: pairwise-similarity KL of x0
    hf: float | None = None  # lambda_hf: pairwise-similarity KL of hf(x0)
    hfmse: float | None = None  # lambda_hfmse: MSE of hf(x0) to the real image
    stencil: str = "domainstudio"  # domainstudio | pywt
    space: str = "pixel"  # pixel | latent (text-to-image domainstudio)
    source: str | None = None  # frozen | class_prompt | lora_off; None = method default
    tau: float = 1.0
    direction: str = "source||adapted"
    reduction: str = "mean"
    num_anchors: int | None = None  # random anchor rows of the pairwise loss (None = all)
    backend: str = "auto"


@dataclass
class TrainConfig:
    max_steps: int = 800
    batch_size: int | None = None  # global batch (instance images per optimizer step)
    micro_batch_size: int | None = None  # per rank per forward; None = batch_size / world size
    lr: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema: float | None = None  # EMA decay, 0 = off
    resume: str = "auto"  # auto | latest | none | <checkpoint dir>
    log_every: int = 1


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: str = "none"
    offload_param: str = "none"
    config: str | None = None  # stock DeepSpeed JSON; its keys win over the generated ones


@dataclass
class SampleConfig:
    num: int = 16
    num_inference_steps: int = 50
    seed: int = 0
    prompt: str | None = None  # text-to-image; None = data.instance_prompt
    guidance_scale: float = 7.5


@dataclass
class RunConfig:
    method: str = "domainstudio"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output_dir: str | None = None  # None = runs/<config file stem> (runs/dsfast without a file)
    checkpoint_every: int = 500  # 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept (0 = all)
    sample_every: int = 500  # 0 = never

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- building

def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                f"unknown config key '{prefix}{key}' (known keys under '{prefix.rstrip('.') or '<root>'}': "
                f"{', '.join(sorted(known))})"
            )
        f = known[key]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = yaml.safe_load(raw) if raw.strip() != "" else None
        out.append((key, value))
    return out


def load_config(config: dict | str | Path | RunConfig, overrides=()) -> RunConfig:
    """Build a :class:`RunConfig` from a dict, a YAML path or an existing config, plus ``key=value`` overrides."""
    source_name = None
    if isinstance(config, RunConfig):
        data = config.to_dict()
    elif isinstance(config, dict):
        data = json.loads(json.dumps(config))  # deep copy, plain types
    else:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a YAML mapping")
        source_name = path.stem
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    cfg = _build(RunConfig, data)
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / (source_name or "dsfast"))
    _coerce(cfg)
    validate_static(cfg)
    return cfg


def _coerce(cfg: RunConfig) -> None:
    """YAML reads 1e-4 as a string; coerce numbers and types of every field by its annotation."""
    def walk(obj, prefix):
        for f in fields(obj):
            v = getattr(obj, f.name)
            name = prefix + f.name
            if dataclasses.is_dataclass(v):
                walk(v, name + ".")
                continue
            if v is None:
                continue
            ann = str(f.type)
            try:
                if ann.startswith("float"):
                    v = float(v)
                elif ann.startswith("int"):
                    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                        raise ValueError
                    v = int(v)
                elif ann.startswith("bool"):
                    if not isinstance(v, bool):
                        raise ValueError
                elif ann.startswith("str"):
                    v = str(v)
            except (TypeError, ValueError):
                raise ConfigError(f"config key '{name}' has a bad value {v!r} (expected {ann})") from None
            setattr(obj, f.name, v)
    walk(cfg, "")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{name}' must be one of {', '.join(map(str, choices))}; got {value!r}")


def validate_static(cfg: RunConfig) -> None:
    """Checks that need neither the model nor the data."""
    _choice("method", cfg.method, METHODS)
    _choice("train.mixed_precision", cfg.train.mixed_precision, PRECISIONS)
    _choice("deepspeed.zero_stage", cfg.deepspeed.zero_stage, (0, 1, 2, 3))
    _choice("deepspeed.offload_optimizer", cfg.deepspeed.offload_optimizer, OFFLOAD)
    _choice("deepspeed.offload_param", cfg.deepspeed.offload_param, OFFLOAD)
    _choice("loss.space", cfg.loss.space, SPACES)
    _choice("loss.stencil", cfg.loss.stencil, ("domainstudio", "pywt"))
    _choice("loss.direction", cfg.loss.direction, ("source||adapted", "adapted||source"))
    _choice("loss.reduction", cfg.loss.reduction, ("mean", "batchmean", "sum"))
    if cfg.loss.source is not None:
        _choice("loss.source", cfg.loss.source, SOURCES)
    if cfg.deepspeed.offload_param == "cpu" and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param=cpu needs deepspeed.zero_stage=3")
    if cfg.deepspeed.offload_optimizer == "cpu" and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer=cpu needs deepspeed.zero_stage >= 1")
    if not cfg.model.pretrained:
        raise ConfigError("config key 'model.pretrained' is required (a diffusers pipeline folder or hub id)")
    if not cfg.data.instance_dir:
        raise ConfigError("config key 'data.instance_dir' is required (a folder of training images)")
    if cfg.model.lora_rank < 0:
        raise ConfigError("config key 'model.lora_rank' must be >= 0")
    if cfg.train.max_steps < 1:
        raise ConfigError("config key 'train.max_steps' must be >= 1")
    for k in ("checkpoint_every", "keep_last", "sample_every"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"config key '{k}' must be >= 0")
    if cfg.loss.source == "lora_off" and cfg.model.lora_rank == 0:
        raise ConfigError("loss.source=lora_off needs model.lora_rank > 0")
    if cfg.train.ema is not None and not 0.0 <= cfg.train.ema < 1.0:
        raise ConfigError("config key 'train.ema' must be in [0, 1)")


# Official defaults (DESIGN.md): key -> value, per (method, family).
DEFAULTS = {
    ("domainstudio", "unconditional"): dict(
        image=4.0, hf=4.0, hfmse=1.0, prior=0.0, lr=1e-4, ema=0.9999, batch_size=4, source="frozen"),
    ("domainstudio", "text2image"): dict(
        image=100.0, hf=100.0, hfmse=0.1, prior=1.0, lr=5e-6, ema=0.0, batch_size=4, source="class_prompt",
        resolution=512),
    ("dreambooth", "unconditional"): None,  # DreamBooth needs prompts
    ("dreambooth", "text2image"): dict(
        image=0.0, hf=0.0, hfmse=0.0, prior=1.0, lr=5e-6, ema=0.0, batch_size=1, source="frozen", resolution=512),
    ("finetune", "unconditional"): dict(
        image=0.0, hf=0.0, hfmse=0.0, prior=0.0, lr=1e-4, ema=0.9999, batch_size=4, source="frozen"),
    ("finetune", "text2image"): dict(
        image=0.0, hf=0.0, hfmse=0.0, prior=0.0, lr=5e-6, ema=0.0, batch_size=4, source="frozen", resolution=512),
}


def resolve_defaults(cfg: RunConfig, family: str) -> RunConfig:
    """Fill every ``None`` with the official default of (method, model family)."""
    d = DEFAULTS[(cfg.method, family)]
    if d is None:
        raise ConfigError(
            f"method '{cfg.method}' needs a text-to-image (Stable Diffusion family) model; "
            f"{cfg.model.pretrained} is an unconditional pipeline")
    for key in ("image", "hf", "hfmse", "prior", "source"):
        if getattr(cfg.loss, key) is None:
            setattr(cfg.loss, key, d[key])
    for key in ("lr", "ema", "batch_size"):
        if getattr(cfg.train, key) is None:
            setattr(cfg.train, key, d[key])
    # data.resolution None: filled from the model's sample size once it is loaded
    if cfg.data.class_dir is None:
        cfg.data.class_dir = str(Path(cfg.output_dir) / "class_images")
    if cfg.sample.prompt is None:
        cfg.sample.prompt = cfg.data.instance_prompt
    if family == "unconditional" and cfg.loss.source != "frozen":
        raise ConfigError("loss.source must be 'frozen' for an unconditional model")
    if family == "text2image":
        if not cfg.data.instance_prompt:
            raise ConfigError("config key 'data.instance_prompt' is required for a text-to-image model")
        needs_class = cfg.loss.prior > 0 or (cfg.method == "domainstudio" and cfg.loss.source == "class_prompt")
        if needs_class and not cfg.data.class_prompt:
            raise ConfigError(
                "config key 'data.class_prompt' is required (prior preservation / class-prompt source)")
    return cfg


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
