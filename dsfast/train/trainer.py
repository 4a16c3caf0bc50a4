"""The DeepSpeed training loop: ``train(config, overrides) -> run dir``."""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch

from . import distributed as D
from .checkpoint import CheckpointManager, _maybe_kill
from .config import ConfigError, RunConfig, dump_config, load_config, resolve_defaults
from .data import DataError, load_folder  # noqa: F401 (DataError re-exported)
from .step import NonFiniteLoss, run_step


class TrainingError(RuntimeError):
    pass


DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_ds_config(cfg: RunConfig, world: int, num_params: int) -> dict:
    t, z = cfg.train, cfg.deepspeed
    micro = t.micro_batch_size
    accum = t.batch_size // (micro * world)
    cuda = torch.cuda.is_available()
    zero: dict = {"stage": z.zero_stage}
    if z.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if z.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    if z.zero_stage == 3 and num_params < 50_000_000:
        zero["stage3_param_persistence_threshold"] = 0  # else small models are not partitioned at all
    ds = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps, "weight_decay": t.weight_decay,
            **({} if cuda else {"torch_adam": True})}},
        "zero_optimization": zero,
        "bf16": {"enabled": t.mixed_precision == "bf16"},
        "fp16": {"enabled": t.mixed_precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if t.max_grad_norm > 0:
        ds["gradient_clipping"] = t.max_grad_norm
    if z.config:
        stock = json.loads(Path(z.config).read_text())
        ds = _deep_merge(ds, stock)
    return ds


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate_run(cfg: RunConfig, bundle, world: int, num_images: int, has_pairwise: bool) -> None:
    t = cfg.train
    if t.batch_size < 1:
        raise ConfigError("train.batch_size must be >= 1")
    if t.micro_batch_size is None:
        if t.batch_size % world:
            raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of the world size {world}")
        t.micro_batch_size = t.batch_size // world
    if t.micro_batch_size < 1 or t.batch_size % (t.micro_batch_size * world):
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size x world size "
            f"= {t.micro_batch_size} x {world}")
    r = cfg.data.resolution
    if r % bundle.down_factor or r % 2:
        raise ConfigError(
            f"data.resolution={r} must be divisible by the model's downsampling factor {max(2, bundle.down_factor)}")
    if has_pairwise:
        if num_images < 3:
            raise DataError(f"the pairwise-similarity losses need at least 3 training images; "
                            f"{cfg.data.instance_dir} has {num_images}")
        if t.batch_size < 3:
            raise ConfigError(f"the pairwise-similarity losses need train.batch_size >= 3 (got {t.batch_size})")
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 is not supported on CPU (use bf16 or no)")


def _infer_from(model, x, t, enc=None):
    return model(x, t) if enc is None else model(x, t, encoder_hidden_states=enc)


def train(config, overrides=(), *, resume: str | None = None) -> Path:
    """Train a run; returns the run folder. See the README for the config keys."""
    D.setup_env()
    cfg = load_config(config, overrides)
    if resume is not None:
        cfg.train.resume = resume
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from .models import EMA, family_of, gathered_params, load_bundle, model_index, trainable_named_parameters

    index = model_index(cfg.model.pretrained)
    family = family_of(index)
    resolve_defaults(cfg, family)
    dtype = DTYPES[cfg.train.mixed_precision]

    # Everything that can be wrong with the input is checked before any process group exists.
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    torch.manual_seed(cfg.train.seed)
    bundle = load_bundle(cfg, family, index, dtype)
    if cfg.data.resolution is None:
        cfg.data.resolution = bundle.default_resolution or 256
    from .methods import build_method

    method_probe_pairwise = cfg.method == "domainstudio" and (cfg.loss.image > 0 or cfg.loss.hf > 0)
    images = load_folder(cfg.data.instance_dir, cfg.data.resolution, bundle.channels, cfg.data.center_crop)
    validate_run(cfg, bundle, world, images.shape[0], method_probe_pairwise)

    import deepspeed

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    assert (D.world(), D.rank()) == (world, rank), "WORLD_SIZE/RANK disagree with the process group"

    run_dir = Path(cfg.output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    D.barrier()

    unet = bundle.unet
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    ema = None
    zero3 = cfg.deepspeed.zero_stage == 3
    named = trainable_named_parameters(unet)
    names = {n for n, _ in named}
    if cfg.train.ema and rank == 0:
        ema = EMA({n: p for n, p in named}, cfg.train.ema)

    extras = {}
    if family == "text2image":
        extras = method_prepare_text2image(cfg, bundle, images, dtype, run_dir)

    ds_config = build_ds_config(cfg, world, sum(p.numel() for _, p in named))
    warmup = cfg.train.warmup_steps

    def lr_lambda(s):
        return min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0

    engine, _, _, lr_sched = deepspeed.initialize(
        model=unet, model_parameters=[p for _, p in named], config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    method = build_method(cfg, bundle, engine, dtype, extras)

    ckpts = CheckpointManager(run_dir / "checkpoints", cfg.keep_last)
    start = 0
    ckpt_dir = _resume_dir(cfg, ckpts)
    if ckpt_dir is not None:
        start = ckpts.load(engine, ckpt_dir, ema=ema)
        if rank == 0:
            print(f"dsfast: resumed from {ckpt_dir} at step {start}", flush=True)

    metrics_path = run_dir / "metrics.jsonl"
    writer = None
    if rank == 0:
        _truncate_metrics(metrics_path, start)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=rank != 0, desc=cfg.method, dynamic_ncols=True)
    t = cfg.train
    per_rank = t.batch_size // world
    micro = t.micro_batch_size
    T = bundle.scheduler.config.num_train_timesteps
    noise_shape = method.noise_shape(cfg.data.resolution)
    last_time = time.perf_counter()

    def backward(loss):
        engine.backward(loss)
        engine.step()

    step = start
    try:
        while step < t.max_steps:
            ks = list(range(rank * per_rank, (rank + 1) * per_rank))
            mbs = [method.make_micro_batch(images, step, ks[i:i + micro], noise_shape, T)
                   for i in range(0, per_rank, micro)]
            try:
                logs = run_step(method, mbs, backward, step=step)
            except NonFiniteLoss as exc:
                last = ckpts.latest()
                raise TrainingError(
                    f"{exc}: training stopped; the last good checkpoint is "
                    f"{last if last is not None else '(none saved yet)'}") from None
            step += 1
            if ema is not None or (cfg.train.ema and zero3):
                cur = gathered_params(engine.module, names, zero3)
                if ema is not None:
                    ema.update(cur, step - 1)
            now = time.perf_counter()
            dt, last_time = now - last_time, now
            logs["lr"] = lr_sched.get_last_lr()[0] if lr_sched is not None else t.lr
            logs["sec_per_step"] = dt
            if rank == 0:
                if step % t.log_every == 0 or step == t.max_steps:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": step, **logs}) + "\n")
                    for k, v in logs.items():
                        writer.add_scalar(f"train/{k}", v, step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k not in ("lr", "sec_per_step")},
                                refresh=False)
                bar.update(1)
            _maybe_kill(f"step:{step}")
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == t.max_steps:
                ckpts.save(engine, step, ema=ema)
            if cfg.sample_every and step % cfg.sample_every == 0:
                _sample_grid(cfg, bundle, engine, ema, names, zero3, run_dir, step, writer)
    finally:
        bar.close()
        if writer is not None:
            writer.flush()
            writer.close()

    _save_final(cfg, bundle, engine, ema, names, zero3, run_dir)
    D.barrier()
    return run_dir


def method_prepare_text2image(cfg, bundle, images, dtype, run_dir):
    from .text2image import prepare

    return prepare(cfg, bundle, images, dtype, run_dir)


def _resume_dir(cfg: RunConfig, ckpts: CheckpointManager):
    mode = cfg.train.resume
    if mode in ("none", "", None):
        return None
    if mode in ("auto", "latest"):
        d = ckpts.latest()
        if d is None and mode == "latest":
            raise ConfigError(f"--resume latest: no complete checkpoint under {ckpts.root}")
        return d
    p = Path(mode)
    if not p.is_dir():
        raise ConfigError(f"train.resume={mode}: not a checkpoint folder")
    return p


def _truncate_metrics(path: Path, start: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= start:
                keep.append(line)
        except (ValueError, KeyError):
            pass
    path.write_text("".join(line + "\n" for line in keep))


def _weights_for_export(bundle, engine, ema, names, zero3):
    from .models import full_state_dict

    sd = full_state_dict(engine.module, zero3)
    if sd is not None and ema is not None:
        sd.update({k: v.clone() for k, v in ema.params.items()})
    return sd


def _sample_grid(cfg, bundle, engine, ema, names, zero3, run_dir, step, writer) -> None:
    from .sample import make_grid, run_pipeline
    from .pipelines import build_pipeline

    sd = _weights_for_export(bundle, engine, ema, names, zero3)
    if D.rank() == 0:
        pipe = build_pipeline(cfg, bundle, sd)
        imgs = run_pipeline(pipe, cfg.sample.num, seed=cfg.sample.seed, prompt=cfg.sample.prompt,
                            num_inference_steps=cfg.sample.num_inference_steps,
                            guidance_scale=cfg.sample.guidance_scale)
        grid = make_grid(imgs)
        out = run_dir / "samples"
        out.mkdir(exist_ok=True)
        from PIL import Image

        Image.fromarray(grid).save(out / f"step_{step:08d}.png")
        if writer is not None:
            writer.add_image("samples", torch.from_numpy(grid).permute(2, 0, 1), step)
    D.barrier()


def _save_final(cfg, bundle, engine, ema, names, zero3, run_dir) -> None:
    from .pipelines import save_final

    sd = _weights_for_export(bundle, engine, ema, names, zero3)
    if D.rank() == 0:
        save_final(cfg, bundle, sd, run_dir / "final")
    D.barrier()
