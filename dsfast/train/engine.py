"""The training engine: DeepSpeed set-up, the step loop with exact global-batch gradients, logging,
checkpoints, sample grids and the final export. It drives a method object (``methods``) and never
asks which method it is.

One optimizer step over the global batch. A method's *global* terms (DomainStudio's pairwise-similarity
losses, and with them its hf-MSE, all in one loss call) couple every sample of the global batch, or take
the global batch's mean of per-sample terms; two schemes give their exact gradient whatever the ranks and
micro-batches:

* one micro-batch per rank: forward with grad, all-gather the x0 features (and the real x0 and
  per-sample weights the hf-MSE reads; the gradient of the loss, computed identically on every rank,
  flows back to the rank's own slice), add
  ``world * L_global`` (the data-parallel all-reduce averages over ranks);
* several micro-batches (gradient accumulation): pass 1 forwards every micro-batch without grad to
  get the source and adapted x0, gathers them across ranks, takes the global loss and
  ``G = dL_global / d x0_adapted`` of the full batch; pass 2 re-forwards each micro-batch with grad
  and back-propagates ``per-sample loss + accum * world * <G_own, x0>``. The same timesteps/noise
  are drawn in both passes (they are functions of (seed, step, sample)), and pass 2 replays the RNG
  state (CPU and, on a GPU, the device's) each micro-batch's pass-1 forward started from, so dropout
  draws the same masks in both passes (as ``torch.utils.checkpoint`` with ``preserve_rng_state``);
  afterwards the RNG is where pass 1 left it. The gradient is exactly that of the large-batch loss
  evaluated with pass 1's masks (a model without dropout: of the large-batch loss).

Backward hooks of the engine average over ranks and divide by the accumulation steps, hence the
``accum * world`` factors.

On logging steps (``grad_norms``) ``grad_norm/<term>`` is the norm, over the global batch, of
d(λ·term)/d(UNet outputs) of each loss term (autograd through the loss heads only, not the UNet):
a per-sample term's micro-batch gradient is scaled by 1/(accum·world) (it enters the global loss as a
mean); a global term's gradient reaches each rank's own outputs through the all-gather (one
micro-batch) or, with several, through its own cached ``dL_term/dx0`` (pass 1) times dx0/d outputs
(pass 2). Squared norms are summed over micro-batches and ranks.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import deepspeed
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from dsfast.images import make_grid, save_grid

from . import distributed as D
from . import methods
from .checkpoint import (
    LOCK_NAME,
    CheckpointManager,
    check_output_dir,
    disk_full_message,
    folder_bytes,
    is_disk_full,
    lock_output_dir,
    maybe_kill,
    problem,
)
from .config import RunConfig, dump_config, family_options, load_config, resolve
from .data import Draws, load_images
from .ds_config import build_ds_config, client_optimizer, size_zero_buffers
from .errors import ConfigError, DataError, NonFiniteLoss, TrainingError
from .models import (
    EMA,
    build_pipeline,
    describe,
    export_weights,
    load,
    lora_config,
    save_final,
    trainable_named_parameters,
    update_ema,
)
from .sample import run_pipeline

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# metrics.jsonl: sec_per_step is the training step alone; checkpoint_sec / sample_sec the work after it
_NOT_IN_BAR = ("lr", "sec_per_step", "checkpoint_sec", "sample_sec")


# ----------------------------------------------------------------------------- one optimizer step

def _check(value: torch.Tensor | None, what: str, step: int) -> None:
    """``step`` counts the updates done before this one (from 0); messages count steps from 1, as metrics do."""
    bad = value is not None and not bool(torch.isfinite(value.detach()).all())
    if D.any_flag(bad):
        raise NonFiniteLoss(f"non-finite {what} in step {step + 1}")


def _add_terms(acc: dict, terms: dict, scale: float) -> None:
    for k, v in terms.items():
        acc[k] = acc.get(k, 0.0) + float(v.detach()) * scale


def _gather(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else D.all_gather_cat(x.detach())


def _cat(xs) -> torch.Tensor | None:
    return None if xs[0] is None else torch.cat(xs)


def _with_global(logs: dict, per_sample: float, global_terms: dict, total: torch.Tensor) -> dict:
    logs = D.all_reduce_mean({**logs, "per_sample": per_sample})
    logs.update({k: float(v.detach()) for k, v in global_terms.items()})
    logs["loss"] = logs.pop("per_sample") + float(total.detach())
    return logs


def _grad_sq(acc: dict, heads: dict, outputs, scale: float) -> None:
    """Adds scale² |d head / d outputs|² of each head (the graph is kept for the backward)."""
    for name, head in heads.items():
        grads = torch.autograd.grad(head, outputs, retain_graph=True, allow_unused=True)
        sq = sum(float(g.float().pow(2).sum()) for g in grads if g is not None)
        acc[name] = acc.get(name, 0.0) + scale * scale * sq


def _grad_norms(acc: dict) -> dict:
    total = D.all_reduce_mean(acc)
    return {f"grad_norm/{k}": (v * D.world()) ** 0.5 for k, v in total.items()}


def _rng_state(device: torch.device):
    """What dropout draws from: the CPU RNG state and, on a GPU, the device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    cpu, gpu = state
    torch.set_rng_state(cpu)
    if gpu is not None:
        torch.cuda.set_rng_state(gpu, device)


def run_step(method, model, micro_batches, backward, *, step: int, device: torch.device,
             grad_norms: bool = False) -> dict[str, float]:
    """Forward/backward all micro-batches of this rank for one optimizer step on ``device`` (the model's).

    ``backward(loss)`` back-propagates one micro-batch (and steps the engine).
    Returns the logged terms, averaged over micro-batches and ranks (+ ``grad_norm/<term>`` with ``grad_norms``).
    """
    accum, world = len(micro_batches), D.world()
    logs: dict[str, float] = {}
    sq: dict[str, float] = {}
    if not method.has_global:
        for mb in micro_batches:
            out = method.forward(model, mb, need_source=False)
            _check(out.loss, "loss", step)
            _add_terms(logs, {"loss": out.loss, **out.terms}, 1.0 / accum)
            if grad_norms:
                _grad_sq(sq, out.heads, out.outputs, 1.0 / (accum * world))
            backward(out.loss)
        logs = D.all_reduce_mean(logs)
        return {**logs, **_grad_norms(sq)} if grad_norms else logs

    if accum == 1:
        out = method.forward(model, micro_batches[0], need_source=True)
        _check(out.adapted, "x0 prediction", step)
        _check(out.source, "source x0 prediction", step)
        total, terms = method.global_loss(_gather(out.source), D.gather_with_grad(out.adapted), _gather(out.real),
                                          _gather(out.hfmse_weights), step)
        _check(out.loss + total, "loss", step)
        if grad_norms:
            _grad_sq(sq, out.heads, out.outputs, 1.0 / world)
            _grad_sq(sq, {k: method.global_weights[k] * v for k, v in terms.items()}, out.outputs, 1.0)
        backward(out.loss + world * total)
        logs = {k: float(v.detach()) for k, v in out.terms.items()}
        logs = _with_global(logs, float(out.loss.detach()), terms, total)
        return {**logs, **_grad_norms(sq)} if grad_norms else logs

    # Pass 1: features of every micro-batch without grad, and the RNG state each forward starts from.
    states, outs = [], []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(_rng_state(device))
            outs.append(method.forward(model, mb, need_source=True))
    after_pass1 = _rng_state(device)
    ada_local = torch.cat([o.adapted for o in outs])
    src_local, real_local = _cat([o.source for o in outs]), _cat([o.real for o in outs])
    weights_local = _cat([o.hfmse_weights for o in outs])
    _check(ada_local, "x0 prediction", step)
    _check(src_local, "source x0 prediction", step)
    sizes = [o.adapted.shape[0] for o in outs]
    del outs
    ada_all = D.all_gather_cat(ada_local).detach().requires_grad_(True)
    with torch.enable_grad():
        total, terms = method.global_loss(_gather(src_local), ada_all, _gather(real_local), _gather(weights_local),
                                          step)
        (grad_all,) = torch.autograd.grad(total, ada_all, retain_graph=grad_norms)
        term_grads = {k: torch.autograd.grad(method.global_weights[k] * v, ada_all, retain_graph=True)[0]
                      for k, v in terms.items()} if grad_norms else {}
    _check(total, "global-batch loss", step)
    n_local, r = ada_local.shape[0], D.rank()
    own = slice(r * n_local, (r + 1) * n_local)
    grad_own = grad_all[own]
    term_grads = {k: g[own] for k, g in term_grads.items()}
    del ada_all, grad_all, src_local, ada_local, real_local, weights_local

    # Pass 2: re-forward each micro-batch with grad (pass 1's dropout masks), back-propagate cached gradient + own terms.
    offset, per_sample = 0, 0.0
    for mb, m, state in zip(micro_batches, sizes, states):
        _set_rng_state(state, device)
        out = method.forward(model, mb, need_source=False)
        g = grad_own[offset:offset + m].to(out.adapted.dtype)
        offset += m
        _check(out.loss, "loss", step)
        _add_terms(logs, out.terms, 1.0 / accum)
        per_sample += float(out.loss.detach()) / accum
        if grad_norms:
            _grad_sq(sq, out.heads, out.outputs, 1.0 / (accum * world))
            _grad_sq(sq, {k: (tg[offset - m:offset].to(out.adapted.dtype) * out.adapted).sum()
                          for k, tg in term_grads.items()}, out.outputs, 1.0)
        backward(out.loss + (accum * world) * (g * out.adapted).sum())
    _set_rng_state(after_pass1, device)
    logs = _with_global(logs, per_sample, terms, total)
    return {**logs, **_grad_norms(sq)} if grad_norms else logs


# ----------------------------------------------------------------------------- DeepSpeed

def _resume_dir(mode: str, ckpts: CheckpointManager) -> Path | None:
    if mode in ("none", ""):
        return None
    if mode in ("auto", "latest"):
        d = ckpts.latest()
        if d is None and mode == "latest":
            raise ConfigError(f"--resume latest: no complete checkpoint under {ckpts.root}{ckpts.passed_over()}")
        if d is None and ckpts.passed_over() and ckpts.report is not None:
            ckpts.report(f"dsfast: no usable checkpoint under {ckpts.root}{ckpts.passed_over()}; starting at step 0")
        return d
    p = Path(mode)
    if not p.is_dir():
        raise ConfigError(f"train.resume={mode}: not a checkpoint folder")
    why = problem(p)
    if why is not None:
        raise ConfigError(f"train.resume={mode}: not a usable dsfast checkpoint: {why}")
    return p


# ----------------------------------------------------------------------------- logging

class MetricsLog:
    """``metrics.jsonl`` and TensorBoard scalars (rank 0); a resumed run first drops lines past its step."""

    def __init__(self, run_dir: Path, start: int):
        self.path = run_dir / "metrics.jsonl"
        self.last = 0  # the last step with a line
        if self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start:
                        keep.append(line)
                except (ValueError, KeyError):
                    pass
            self.path.write_text("".join(line + "\n" for line in keep))
            self.last = max((json.loads(line)["step"] for line in keep), default=0)
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)

    def write(self, step: int, logs: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")
        self.last = step
        for k, v in logs.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _grid_path(run_dir: Path, step: int) -> Path:
    return run_dir / "samples" / f"step_{step:08d}.png"


def _sample_grid(cfg: RunConfig, bundle, sd, run_dir: Path, step: int, log: MetricsLog | None,
                 device: torch.device, embeds: dict | None = None) -> None:
    if D.rank() != 0:
        return
    s = cfg.sample
    # the training RNG goes on as if no grid were drawn (a resumed run redraws a lost grid from the checkpoint)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pipe = build_pipeline(bundle, sd, device=device, dtype=DTYPES[cfg.train.mixed_precision])
        imgs = run_pipeline(pipe, s.num, seed=s.seed, prompt=s.prompt,
                            num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                            resolution=cfg.data.resolution, embeds=embeds)
    out = _grid_path(run_dir, step)
    out.parent.mkdir(exist_ok=True)
    save_grid(imgs, out)
    if log is not None:
        log.writer.add_image("samples", torch.from_numpy(make_grid(imgs)).permute(2, 0, 1), step)


# ----------------------------------------------------------------------------- train

def _log_due(step: int, t) -> bool:
    """Whether step ``step`` (from 1) writes a metrics line."""
    return step % t.log_every == 0 or step == t.max_steps


def train(config, overrides=(), *, resume: str | None = None, on_valid=None) -> Path:
    """Train a run; returns the run folder. The config keys: docs/config.md. ``on_valid()`` is called once
    the input has passed every check that needs no model weights, before anything is loaded or written."""
    D.setup_env()
    device = D.device()  # where DeepSpeed puts the engine (engine.device): every tensor of training lives there
    raw = load_config(config, overrides)
    if resume is not None:
        raw = raw.model_copy(update={"train": raw.train.model_copy(update={"resume": resume})})
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])

    # Everything that can be wrong with the input is checked before any process group exists.
    check_output_dir(Path(raw.output_dir))
    ckpts = CheckpointManager(Path(raw.output_dir) / "checkpoints", raw.keep_last,
                              report=(lambda line: print(line, file=sys.stderr, flush=True)) if rank == 0 else None)
    ckpt_dir = _resume_dir(raw.train.resume, ckpts)  # before anything is written
    info = describe(raw.model.pretrained)
    cfg = resolve(raw, info.family, world=world, default_resolution=info.default_resolution,
                  down_factor=info.down_factor)
    ds_config = build_ds_config(cfg.train, cfg.deepspeed, world)
    method_cls = methods.get(cfg.method, info.family, cfg.loss.mode)
    if on_valid is not None:
        on_valid()
    needs = method_cls.needs(cfg.loss)
    t = cfg.train
    dtype = DTYPES[t.mixed_precision]
    torch.manual_seed(t.seed)
    bundle = load(info, cfg.model.pretrained, dtype=dtype, frozen_source=needs.frozen_source,
                  lora=lora_config(info, cfg.model.lora_rank, cfg.model.lora_alpha), device=device,
                  options=family_options(cfg))
    images = load_images(cfg.data.instance_dir, cfg.data.resolution, channels=info.channels,
                         center_crop=cfg.data.center_crop)
    if needs.pairwise and images.shape[0] < 3:
        raise DataError(f"the pairwise-similarity losses need at least 3 training images; "
                        f"{cfg.data.instance_dir} has {images.shape[0]}")

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        D.init_process_group()
    assert (D.world(), D.rank()) == (world, rank), "WORLD_SIZE/RANK disagree with the process group"

    run_dir = Path(cfg.output_dir)
    lock = lock_output_dir(run_dir) if rank == 0 else None  # None on rank 0: another run holds the folder
    if D.any_flag(rank == 0 and lock is None):
        raise TrainingError(f"output_dir {run_dir} is in use by another dsfast train (it holds {run_dir / LOCK_NAME}); "
                            "wait for it to finish or choose another output_dir")
    try:
        if rank == 0:
            dump_config(cfg, run_dir / "config.yaml")
        D.barrier()

        unet = bundle.unet
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        process = bundle.family.process
        draws = Draws(seed=t.seed, batch_size=t.batch_size, num_timesteps=process.num_timesteps,
                      random_flip=cfg.data.random_flip, sample_t=process.draw)
        method = method_cls(bundle=bundle, images=images, draws=draws, loss=cfg.loss, data=cfg.data, sample=cfg.sample,
                            dtype=dtype, device=device)
        # the method has encoded its prompts: the sample grids' prompt too, then the text encoders go
        embeds = None
        if cfg.model.drop_text_encoders:
            embeds = bundle.family.sample_conditioning(cfg.sample.prompt, cfg.sample.guidance_scale > 1)
            bundle.family.drop_text_encoders()
        else:
            bundle.family.offload_text_encoders()
        named = trainable_named_parameters(unet)
        # the EMA starts from the pretrained weights, taken before ZeRO-3 partitions them
        ema = EMA(named, t.ema, t.ema_warmup) if t.ema and rank == 0 else None
        size_zero_buffers(ds_config, sum(p.numel() for _, p in named))

        def warmup(s: int) -> float:
            return min(1.0, (s + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0

        params = [p for _, p in named]
        engine, _, _, lr_sched = deepspeed.initialize(
            model=unet, model_parameters=params, optimizer=client_optimizer(t, params), config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup))
        zero3 = cfg.deepspeed.zero_stage == 3
        if ema is not None:
            ema.to(device)

        start = 0
        if ckpt_dir is not None:
            start, saved_logs = ckpts.load(engine, ckpt_dir, ema=ema)
            # train.lr of this run applies from here on (the loaded optimizer holds the one it was saved with):
            # a run that diverged resumes with a smaller one; an unchanged lr continues bit-identically
            lr_sched.base_lrs = [t.lr] * len(lr_sched.base_lrs)
            for group in lr_sched.optimizer.param_groups:
                group["lr"] = t.lr * warmup(lr_sched.last_epoch)
            if rank == 0:
                print(f"dsfast: resumed from {ckpt_dir} at step {start}", flush=True)

        log = MetricsLog(run_dir, start) if rank == 0 else None
        if start:  # what a kill between the checkpoint and the end of its step lost: the grid and the metrics line
            if cfg.sample_every and start % cfg.sample_every == 0 and D.any_flag(
                    rank == 0 and not _grid_path(run_dir, start).is_file()):
                _sample_grid(cfg, bundle, export_weights(engine, ema, zero3), run_dir, start, log, device, embeds)
                D.barrier()
            if log is not None and _log_due(start, t) and log.last < start:
                log.write(start, saved_logs)
        bar = tqdm(total=t.max_steps, initial=start, disable=rank != 0, desc=cfg.method, dynamic_ncols=True)
        per_rank = t.batch_size // world

        step = start

        def backward(loss):
            engine.backward(loss)
            maybe_kill(f"backward:{step + 1}")
            engine.step()

        def stopped(exc: NonFiniteLoss) -> TrainingError:
            # the weights after `step` updates gave it: their checkpoint, if one was saved, must not be resumed
            ckpts.diverged(step)
            last = ckpts.latest(quiet=True)
            return TrainingError(f"{exc}: training stopped; the last good checkpoint is "
                                 f"{last if last is not None else '(none saved yet)'}")

        try:
            while step < t.max_steps:
                started = time.perf_counter()
                ks = list(range(rank * per_rank, (rank + 1) * per_rank))
                mbs = [method.micro_batch(step, ks[i:i + t.micro_batch_size])
                       for i in range(0, per_rank, t.micro_batch_size)]
                grad_norms = t.log_grad_norms and _log_due(step + 1, t)
                try:
                    # With grad norms the forward runs on the module itself: DeepSpeed hooks the engine's outputs
                    # and would take the per-term autograd.grad for the start of the backward.
                    logs = run_step(method, engine.module if grad_norms else engine, mbs, backward, step=step,
                                    device=device, grad_norms=grad_norms)
                except NonFiniteLoss as exc:
                    raise stopped(exc) from None
                ckpts.confirm()  # the newest checkpoint's weights gave a finite step
                if t.ema:
                    update_ema(ema, engine, zero3, step)
                step += 1
                logs["lr"] = lr_sched.get_last_lr()[0] if lr_sched is not None else t.lr
                logs["sec_per_step"] = time.perf_counter() - started  # the training step only
                maybe_kill(f"step:{step}")
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == t.max_steps:
                    started = time.perf_counter()
                    try:
                        ckpts.save(engine, step, ema=ema, logs=logs)
                    except NonFiniteLoss as exc:
                        raise stopped(exc) from None
                    logs["checkpoint_sec"] = time.perf_counter() - started
                    maybe_kill(f"saved:{step}")
                if cfg.sample_every and step % cfg.sample_every == 0:
                    started = time.perf_counter()
                    _sample_grid(cfg, bundle, export_weights(engine, ema, zero3), run_dir, step, log, device, embeds)
                    D.barrier()
                    logs["sample_sec"] = time.perf_counter() - started
                    maybe_kill(f"sampled:{step}")
                if log is not None:
                    if _log_due(step, t):
                        log.write(step, logs)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k not in _NOT_IN_BAR}, refresh=False)
                    bar.update(1)
            ckpts.confirm()  # the run ended: the last checkpoint is its result
        finally:
            bar.close()
            if log is not None:
                log.close()

        sd = export_weights(engine, ema, zero3)
        failed = None
        if rank == 0:
            try:
                save_final(bundle, sd, run_dir / "final")
            except Exception as exc:  # noqa: BLE001 - safetensors reports a full disk as its own error type
                failed = exc
        if D.any_flag(failed is not None):
            if failed is None:
                raise TrainingError("final/ could not be written on rank 0 (its error says why)")
            if not is_disk_full(failed, run_dir):
                raise failed
            last = ckpts.latest(quiet=True)
            pretrained = Path(cfg.model.pretrained)  # final/ is a pipeline of the same parts
            need = folder_bytes(pretrained) if pretrained.is_dir() else None
            raise TrainingError(f"{disk_full_message(run_dir, 'final/', need)}; final/ was not written (nothing "
                                f"partial left); its weights are in {last}: free space and run the same command "
                                "again to write it")
        D.barrier()
        return run_dir
    except OSError as exc:  # a full disk anywhere else (metrics, sample grids, TensorBoard): one line too
        if not is_disk_full(exc, run_dir):
            raise
        last = ckpts.latest(quiet=True)
        raise TrainingError(f"{disk_full_message(run_dir, 'the run folder', None)} ({exc.filename or exc}); "
                            f"the last good checkpoint is {last if last else '(none saved yet)'}") from None
    finally:
        if lock is not None:
            lock.close()  # the OS drops the lock of a killed process too
