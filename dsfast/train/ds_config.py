"""The DeepSpeed config of a run: generated from the ``train`` and ``deepspeed`` sections, or a stock
Hugging Face-style DeepSpeed JSON (``deepspeed.config``) reconciled with them.

A stock JSON is read once, in :func:`adopt_stock_json` (part of :func:`~dsfast.train.config.load_config`),
on the plain config dict, so the run's ``config.yaml`` records what it trains with:

* ``"auto"`` means "the dsfast value" (as the transformers/accelerate integrations do);
* a concrete value of a key dsfast owns (batch sizes, lr, betas, eps, weight decay, clipping,
  precision, ZeRO stage and offload) becomes the dsfast key's value when the dsfast config does
  not set that key, and is one error naming both keys when it sets it to something else;
* ``optimizer`` must be AdamW (dsfast's optimizer; its params map onto ``train.*``); ``scheduler``
  must be ``WarmupLR``, which maps onto dsfast's linear warm-up (``train.warmup_steps``, ``train.lr``).
  Both sections are then dropped from the DeepSpeed config: dsfast builds the optimizer section and
  its own schedule from the ``train`` keys. Any other type is refused, naming the dsfast keys to use;
* every other key of the JSON (bucket sizes, ``overlap_comm``, loss scaling, ...) goes to DeepSpeed
  unchanged, and an ``"auto"`` among them is dropped (DeepSpeed's default).

:func:`build_ds_config` then builds the DeepSpeed dict from the resolved config; it runs before any
process group exists, so a gradient-accumulation value the run cannot have is reported at once.
:func:`size_zero_buffers` sizes DeepSpeed's ZeRO buffers by the model once it is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ConfigError

AUTO = "auto"
PRECISIONS = ("bf16", "fp16")

# (path in the DeepSpeed JSON, dsfast key, JSON value -> dsfast value)
_SCALARS = (
    (("train_batch_size",), "train.batch_size", int),
    (("train_micro_batch_size_per_gpu",), "train.micro_batch_size", int),
    (("gradient_clipping",), "train.max_grad_norm", float),
    (("zero_optimization", "stage"), "deepspeed.zero_stage", int),
    (("zero_optimization", "offload_optimizer", "device"), "deepspeed.offload_optimizer", str),
    (("zero_optimization", "offload_param", "device"), "deepspeed.offload_param", str),
    (("optimizer", "params", "lr"), "train.lr", float),
    (("optimizer", "params", "eps"), "train.adam_eps", float),
    (("optimizer", "params", "weight_decay"), "train.weight_decay", float),
    (("scheduler", "params", "warmup_max_lr"), "train.lr", float),
    (("scheduler", "params", "warmup_num_steps"), "train.warmup_steps", int),
)
OPTIMIZERS = ("AdamW",)
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
SMALL_ZERO3_MODEL = 50_000_000  # trainable parameters below which ZeRO-3 persists nothing by default
SCHEDULERS = ("WarmupLR",)


def _get(d: dict, path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _dsfast_get(data: dict, key: str):
    section, name = key.split(".")
    return (data.get(section) or {}).get(name)


def _dsfast_set(data: dict, key: str, value) -> None:
    section, name = key.split(".")
    if data.get(section) is None:
        data[section] = {}
    data[section][name] = value


def _name(path) -> str:
    return ".".join(path)


def _same(have, value, conv) -> bool:
    try:
        return conv(have) == value  # the dsfast side may still be a string (a YAML "3e-4", an override)
    except (TypeError, ValueError):
        return False


def _reconcile(data: dict, path, key: str, value, src: str, conv=str) -> None:
    """A concrete JSON value for dsfast ``key``: adopt it, or one error if the dsfast config says otherwise."""
    have = _dsfast_get(data, key)
    if have is None:
        _dsfast_set(data, key, value)
    elif not _same(have, value, conv):
        raise ConfigError(f"{src}: {_name(path)}={value!r} contradicts {key}={have!r} "
                          f"(set one of them, or write \"auto\" in the JSON)")


def read_stock_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config={path}: file not found")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config={path}: not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed.config={path}: must hold a JSON object")
    return ds


def _check_type(ds: dict, section: str, allowed, use: str, src: str) -> None:
    if section not in ds:
        return
    kind = _get(ds, (section, "type"))
    if kind not in allowed:
        raise ConfigError(f"{src}: {section} type {kind!r} is not supported; dsfast trains with "
                          f"{' / '.join(allowed)} set by {use} (remove the '{section}' section or use "
                          f"type {allowed[0]})")


def adopt_stock_json(data: dict) -> dict:
    """Reconcile the stock DeepSpeed JSON named by ``deepspeed.config`` with the config dict ``data``
    (in place; returned): see the module docstring. A no-op without ``deepspeed.config``."""
    path = _dsfast_get(data, "deepspeed.config")
    if not path:
        return data
    src = f"deepspeed.config={path}"
    ds = read_stock_json(path)
    _check_type(ds, "optimizer", OPTIMIZERS, "train.lr, train.weight_decay, train.adam_beta1/2, train.adam_eps", src)
    _check_type(ds, "scheduler", SCHEDULERS, "train.warmup_steps (linear warm-up to train.lr)", src)
    sp = _get(ds, ("scheduler", "params")) or {}
    if sp.get("warmup_type", "linear") != "linear":
        raise ConfigError(f"{src}: scheduler.params.warmup_type={sp['warmup_type']!r} is not supported; "
                          "dsfast's warm-up is linear (train.warmup_steps)")
    if sp.get("warmup_min_lr", AUTO) not in (AUTO, 0, 0.0):
        raise ConfigError(f"{src}: scheduler.params.warmup_min_lr={sp['warmup_min_lr']!r} is not supported; "
                          "dsfast's warm-up starts from 0 (remove it or write \"auto\")")
    for jpath, key, conv in _SCALARS:
        value = _get(ds, jpath)
        if value is not None and value != AUTO:
            _reconcile(data, jpath, key, conv(value), src, conv)
    betas = _get(ds, ("optimizer", "params", "betas"))
    if betas is not None and betas != AUTO:
        for i, b in enumerate(betas):
            _reconcile(data, ("optimizer", "params", f"betas[{i}]"), f"train.adam_beta{i + 1}", float(b), src, float)
    if all(_get(ds, (name, "enabled")) is True for name in PRECISIONS):
        raise ConfigError(f"{src}: bf16.enabled and fp16.enabled are both true")
    for name in PRECISIONS:
        on, have = _get(ds, (name, "enabled")), _dsfast_get(data, "train.mixed_precision")
        if on is True and have is None:
            _dsfast_set(data, "train.mixed_precision", name)
        elif (on is True and have != name) or (on is False and have == name):
            raise ConfigError(f"{src}: {name}.enabled={str(on).lower()} contradicts train.mixed_precision={have!r} "
                              "(set one of them, or write \"auto\" in the JSON)")
    return data


def _fill_auto(node, generated):
    """``node`` with every ``"auto"`` replaced by the generated value at the same place (dropped if none)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        gen = generated.get(k) if isinstance(generated, dict) else None
        if v == AUTO:
            if gen is not None:
                out[k] = gen
        elif isinstance(v, dict):
            out[k] = _fill_auto(v, gen)
        else:
            out[k] = v
    return out


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(t, z, world: int) -> dict:
    """The DeepSpeed config of the resolved ``train`` and ``deepspeed`` sections, merged with the stock
    JSON of ``deepspeed.config`` (already reconciled by :func:`adopt_stock_json`)."""
    cuda = torch.cuda.is_available()
    zero: dict = {"stage": z.zero_stage}
    if z.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if z.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    ds = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.batch_size // (t.micro_batch_size * world),
        **({} if t.optimizer == "adamw8bit" else {"optimizer": {"type": "AdamW", "params": {  # client_optimizer
            "lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps, "weight_decay": t.weight_decay,
            **({} if cuda else {"torch_adam": True})}}}),
        "zero_optimization": zero,
        "bf16": {"enabled": t.mixed_precision == "bf16"},
        "fp16": {"enabled": t.mixed_precision == "fp16"},
        "gradient_clipping": t.max_grad_norm,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if not z.config:
        return ds
    stock = read_stock_json(z.config)
    gas = _get(stock, ("gradient_accumulation_steps",))
    if gas not in (None, AUTO) and int(gas) != ds["gradient_accumulation_steps"]:
        raise ConfigError(f"deepspeed.config={z.config}: gradient_accumulation_steps={gas} contradicts "
                          f"train.batch_size / (train.micro_batch_size x world size) = {t.batch_size} / "
                          f"({t.micro_batch_size} x {world}) = {ds['gradient_accumulation_steps']}")
    # dsfast's AdamW section from the train keys and its own warm-up (both reconciled above)
    stock = {k: v for k, v in stock.items() if k not in ("optimizer", "scheduler")}
    for name in PRECISIONS:  # the precision is train.mixed_precision (reconciled above)
        if name in stock:
            stock[name] = {**stock[name], "enabled": ds[name]["enabled"]}
    return _deep_merge(ds, _fill_auto(stock, ds))


def client_optimizer(t, params):
    """The optimizer dsfast gives DeepSpeed itself (None: DeepSpeed's AdamW of the config's ``optimizer`` section):
    ``train.optimizer=adamw8bit`` is bitsandbytes' ``AdamW8bit`` (as diffusers' ``--use_8bit_adam``): 8-bit
    block-wise quantized moments of tensors of 4096 elements or more (under ZeRO-1/2 the flat partition of all
    trained weights), float32 moments of smaller ones. bitsandbytes runs it on CPU and GPU without a compile step."""
    if t.optimizer != "adamw8bit":
        return None
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                               weight_decay=t.weight_decay)


def reduce_bucket_elements(trainable: int) -> int:
    """dsfast's default ``reduce_bucket_size``: DeepSpeed's, or the trainable parameter count if smaller
    (a bucket that holds every gradient; no parameter is ever larger than it)."""
    return min(REDUCE_BUCKET, trainable)


def size_zero_buffers(ds: dict, trainable: int) -> dict:
    """Sizes of DeepSpeed's ZeRO buffers for a model of ``trainable`` parameters, where ``ds`` does not set
    them (a stock JSON's "auto" was dropped by :func:`build_ds_config`, so it gets them too); in place.

    * ``reduce_bucket_size`` (:func:`reduce_bucket_elements`): ZeRO-2/3 allocate the gradient reduce bucket
      whole, 2 GiB in float32 at DeepSpeed's default, however small the model;
    * at stage 3 on a model under 50 M trainable parameters ``stage3_param_persistence_threshold`` 0, else
      ZeRO-3 partitions none of its parameters.

    The other sizes bound buffers that never exceed the model (prefetch, live parameters) or allocate
    nothing (``allgather_bucket_size`` only splits the all-gather), so DeepSpeed's defaults stay."""
    zero = ds["zero_optimization"]
    if zero["stage"] >= 1:
        zero.setdefault("reduce_bucket_size", reduce_bucket_elements(trainable))
    if zero["stage"] == 3 and trainable < SMALL_ZERO3_MODEL:
        zero.setdefault("stage3_param_persistence_threshold", 0)
    return ds
