"""``dsfast sample --run DIR [--checkpoint latest|step_N] [--prompt ...] --num 16 --out grid.png``.

Generates from a run's weights: its ``final/``, one of its checkpoints (a run still training, or
one that was stopped), or any diffusers pipeline folder. Sampling goes through the diffusers pipeline
(the model family's: ``DDPMPipeline``, ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
``FluxPipeline``) and its scheduler; image i uses generator seed
``seed + i``, so the first images do not depend on ``num``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from diffusers.utils import logging as diffusers_logging

from dsfast.argtypes import ArgumentParser, output_file, positive_int
from dsfast.images import save_grid, save_images

from . import distributed as D
from .checkpoint import CheckpointManager, problem, read_weights, tag_of
from .data import count_images
from .errors import USER_ERRORS, ConfigError, ModelError
from .families import FamilyOptions, load_pipeline
from .models import describe, load, load_adapters, lora_config, trainable_named_parameters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype


def _checkpoints(run: Path) -> CheckpointManager:
    """A run's checkpoints; a newest one that does not verify is passed over with one line on stderr."""
    return CheckpointManager(run / "checkpoints", keep_last=0, report=lambda line: print(line, file=sys.stderr))


def _pipeline_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / "model_index.json").is_file():
        return p
    if (p / "final" / "model_index.json").is_file():
        return p / "final"
    if not p.is_dir():
        raise ModelError(f"{p}: no such folder (give a run folder or a diffusers pipeline folder)")
    if (p / "config.yaml").is_file():
        tags = _checkpoints(p).complete_tags()
        hint = (f"sample from a checkpoint with --checkpoint latest or --checkpoint step_N (it has "
                f"{', '.join(tags)})" if tags else "and it has no complete checkpoint either")
        raise ModelError(f"{p}: the run has no final/ weights (not finished, or stopped); {hint}")
    raise ModelError(f"{p}: neither a diffusers pipeline folder nor a run folder")


def _checkpoint_dir(run: Path, which: str) -> Path:
    ckpts = _checkpoints(run)
    if which == "latest":
        d = ckpts.latest()
        if d is None:
            raise ModelError(f"--checkpoint latest: no complete checkpoint under {ckpts.root}{ckpts.passed_over()}")
        return d
    step = which.removeprefix("step_")
    if not step.isdigit():
        raise ConfigError(f"--checkpoint {which}: use 'latest' or step_N (e.g. step_500)")
    d = ckpts.root / tag_of(int(step))
    why = problem(d)
    if why is not None:
        have = ", ".join(ckpts.complete_tags()) or "none"
        raise ModelError(f"--checkpoint {which}: {d} cannot be used: {why} (usable ones: {have})")
    return d


def checkpoint_pipeline(run_dir: str | Path, which: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The pipeline of a run's checkpoint (``latest`` or ``step_N``) on ``device`` in ``dtype``: the run's pretrained
    pipeline with the checkpoint's trained weights (EMA weights when the run keeps an EMA, as in ``final/``). The
    parts are loaded once, in ``dtype`` on ``device``; the weights go into the loaded denoiser (under LoRA only
    the adapters: the base weights stay as the pretrained folder holds them)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ModelError(f"--checkpoint needs a run folder (with config.yaml); {run} is not one")
    d = _checkpoint_dir(run, which)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    model = cfg["model"]
    info = describe(model["pretrained"])
    lora = lora_config(info, model["lora_rank"], model.get("lora_alpha"))
    bundle = load(info, model["pretrained"], dtype=dtype, lora=lora, frozen_source=False, device=device,
                  options=FamilyOptions(vae=model.get("vae")))
    sd = read_weights(d, cfg["deepspeed"]["zero_stage"], trainable_named_parameters(bundle.unet))
    if lora is None:
        bundle.unet.load_state_dict(sd)
    else:
        load_adapters(bundle.unet, sd)
    del sd
    return bundle.family.pipeline(bundle.unet.eval(), device, dtype)


def run_pipeline(pipe, num: int, *, seed: int = 0, prompt: str | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, batch: int = 8, resolution: int | None = None,
                 embeds: dict | None = None) -> torch.Tensor:
    """``num`` images (N, 3, H, W) in [0, 1] of ``pipe`` on its device; image i uses CPU generator seed ``seed + i``
    (stable across num and devices). ``resolution``: the size of text-to-image images (None: the pipeline's).
    ``embeds``: the prompt's cached embeddings (``Family.sample_conditioning``) in its place, for a pipeline
    without text encoders."""
    if num < 1:
        raise ConfigError(f"the number of images must be at least 1 (got {num})")
    out = []
    is_text = getattr(pipe, "tokenizer", None) is not None
    if is_text and not prompt and embeds is None:
        raise ConfigError("a text-to-image pipeline needs a prompt (--prompt)")
    pipe.set_progress_bar_config(disable=True)
    for start in range(0, num, batch):
        n = min(batch, num - start)
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(n)]
        if is_text:
            size = {} if resolution is None else {"height": resolution, "width": resolution}
            text = ({"prompt": [prompt] * n} if embeds is None else
                    {k: v.expand(n, *v.shape[1:]) for k, v in embeds.items() if v is not None})
            res = pipe(**text, generator=gens, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, output_type="pt", **size)
        else:
            res = pipe(batch_size=n, generator=gens, num_inference_steps=num_inference_steps, output_type="pt")
        # (n, C, H, W) in the pipeline's precision ("np" would fail in bfloat16: numpy has no such type)
        arr = res.images.float().cpu()
        if not bool(torch.isfinite(arr).all()):
            raise ModelError("the pipeline produced non-finite images (NaN/inf): its weights have diverged")
        if arr.shape[1] == 1:
            arr = arr.repeat(1, 3, 1, 1)
        out.append(arr.clamp(0, 1))
    return torch.cat(out)


def generate_images(make_pipe, folder: str | Path, num: int, *, prompt: str, seed: int, num_inference_steps: int,
                    guidance_scale: float, what: str, resolution: int | None = None) -> None:
    """Fill ``folder`` up to ``num`` images of the pipeline ``make_pipe()`` (``class_<i>.png``, seed ``seed + i``),
    split across ranks; the pipeline is built only where images are missing."""
    folder = Path(folder)
    have = count_images(folder, what)
    if have >= num:
        return
    if D.rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    D.barrier()
    mine = [i for i in range(have, num) if i % D.world() == D.rank()]
    pipe = make_pipe() if mine else None
    for i in mine:
        img = run_pipeline(pipe, 1, seed=seed + i, prompt=prompt, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, resolution=resolution)
        save_images(img, folder, prefix=f"class_{i:05d}_")
    D.barrier()


def sample_images(run_or_pipeline_dir, num: int, *, seed: int = 0, prompt: str | None = None,
                  num_inference_steps: int = 50, checkpoint: str | None = None,
                  device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Generate ``num`` images from a run folder (its ``final/``, or with ``checkpoint="latest"|"step_N"``
    one of its checkpoints) or a pipeline folder: (N, 3, H, W) in [0, 1]. The pipeline runs on ``device``
    (default: ``LOCAL_RANK``'s GPU when there is one, else the CPU) in ``dtype`` (float16: a GPU only)."""
    device = D.device() if device is None else torch.device(device)
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("float16 sampling needs a GPU; on the CPU use float32 or bfloat16")
    if checkpoint is None:
        path = _pipeline_dir(run_or_pipeline_dir)
        diffusers_logging.disable_progress_bar()  # the "Loading pipeline components" bar
        pipe = load_pipeline(str(path), dtype=dtype).to(device)
        run = path.parent
    else:
        pipe = checkpoint_pipeline(run_or_pipeline_dir, checkpoint, device, dtype)
        run = Path(run_or_pipeline_dir)
    cfg = _run_config(run)
    if prompt is None and getattr(pipe, "tokenizer", None) is not None:
        prompt = (cfg.get("sample") or {}).get("prompt") or (cfg.get("data") or {}).get("instance_prompt")
    return run_pipeline(pipe, num, seed=seed, prompt=prompt, num_inference_steps=num_inference_steps,
                        resolution=(cfg.get("data") or {}).get("resolution"))


def _run_config(run: Path) -> dict:
    """The run's resolved config (its prompt and training resolution are the sampling defaults); {} without one."""
    cfg = run / "config.yaml"
    return (yaml.safe_load(cfg.read_text()) or {}) if cfg.is_file() else {}


def parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog="dsfast sample",
        description="Generate images from a run's weights (final/ or a checkpoint) or a diffusers pipeline folder.")
    ap.add_argument("--run", required=True, help="run folder (uses its final/) or a diffusers pipeline folder")
    ap.add_argument("--checkpoint", default=None, metavar="latest|step_N",
                    help="sample from this checkpoint of the run instead of final/ (e.g. while it trains)")
    ap.add_argument("--prompt", default=None, help="text-to-image prompt (default: the run's sample prompt)")
    ap.add_argument("--num", type=positive_int, default=16, help="number of images (default: 16)")
    ap.add_argument("--seed", type=int, default=0, help="image i uses generator seed SEED + i (default: 0)")
    ap.add_argument("--steps", type=positive_int, default=50, help="number of inference steps (default: 50)")
    ap.add_argument("--out", type=output_file, default="grid.png",
                    help="grid PNG to write; its folder must exist (default: grid.png)")
    ap.add_argument("--out-dir", default=None, help="also write each image as a PNG into this folder")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32",
                    help="precision of the pipeline (default: float32; float16 needs a GPU)")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.out_dir and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
            raise ConfigError(f"--out-dir {args.out_dir} exists and is not a folder")
        imgs = sample_images(args.run, args.num, seed=args.seed, prompt=args.prompt, num_inference_steps=args.steps,
                             checkpoint=args.checkpoint, dtype=DTYPES[args.dtype])
    except USER_ERRORS as exc:
        print(f"dsfast sample: error: {exc}", file=sys.stderr)
        return 1
    save_grid(imgs, args.out)
    if args.out_dir:
        save_images(imgs, args.out_dir)
    print(f"wrote {args.out} ({args.num} images)")
    return 0


__all__ = ["checkpoint_pipeline", "generate_images", "main", "run_pipeline", "sample_images"]
