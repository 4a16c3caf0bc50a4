"""``dsfast sample --run DIR [--prompt ...] --num 16 --out grid.png``: generate from a run's weights.

Sampling goes through the diffusers pipeline (``DDPMPipeline`` / ``StableDiffusionPipeline``) and its
scheduler; image i uses generator seed ``seed + i``, so the first images do not depend on ``num``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import DiffusionPipeline

from dsfast.images import save_grid, save_images

from . import distributed as D
from .data import count_images


def _pipeline_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / "model_index.json").is_file():
        return p
    if (p / "final" / "model_index.json").is_file():
        return p / "final"
    raise FileNotFoundError(f"{p}: neither a diffusers pipeline folder nor a run folder with final/ "
                            "(the run may not have finished)")


def run_pipeline(pipe, num: int, *, seed: int = 0, prompt: str | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, batch: int = 8) -> torch.Tensor:
    """``num`` images (N, 3, H, W) in [0, 1]; image i uses generator seed ``seed + i`` (stable across num)."""
    out = []
    is_text = getattr(pipe, "tokenizer", None) is not None
    if is_text and not prompt:
        raise ValueError("a text-to-image pipeline needs a prompt (--prompt)")
    for start in range(0, num, batch):
        n = min(batch, num - start)
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(n)]
        if is_text:
            res = pipe(prompt=[prompt] * n, generator=gens, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, output_type="np")
        else:
            res = pipe(batch_size=n, generator=gens, num_inference_steps=num_inference_steps, output_type="np")
        arr = torch.from_numpy(np.asarray(res.images)).float()
        if arr.ndim == 3:
            arr = arr[..., None]
        arr = arr.permute(0, 3, 1, 2)
        if arr.shape[1] == 1:
            arr = arr.repeat(1, 3, 1, 1)
        out.append(arr.clamp(0, 1))
    return torch.cat(out)


def generate_images(pipe, folder: str | Path, num: int, *, prompt: str, seed: int, num_inference_steps: int,
                    guidance_scale: float, what: str) -> None:
    """Fill ``folder`` up to ``num`` images of ``pipe`` (``class_<i>.png``, seed ``seed + i``), split across ranks."""
    folder = Path(folder)
    have = count_images(folder, what)
    if have >= num:
        return
    if D.rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    D.barrier()
    pipe.set_progress_bar_config(disable=True)
    for i in range(have, num):
        if i % D.world() == D.rank():
            img = run_pipeline(pipe, 1, seed=seed + i, prompt=prompt, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale)
            save_images(img, folder, prefix=f"class_{i:05d}_")
    D.barrier()


def sample_images(run_or_pipeline_dir, num: int, *, seed: int = 0, prompt: str | None = None,
                  num_inference_steps: int = 50) -> torch.Tensor:
    """Generate ``num`` images from a run folder (its ``final/``) or a pipeline folder: (N, 3, H, W) in [0, 1]."""
    path = _pipeline_dir(run_or_pipeline_dir)
    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    if prompt is None and getattr(pipe, "tokenizer", None) is not None:
        prompt = _run_prompt(path)
    return run_pipeline(pipe, num, seed=seed, prompt=prompt, num_inference_steps=num_inference_steps)


def _run_prompt(pipeline_dir: Path) -> str | None:
    cfg = pipeline_dir.parent / "config.yaml"
    if not cfg.is_file():
        return None
    data = yaml.safe_load(cfg.read_text()) or {}
    return (data.get("sample") or {}).get("prompt") or (data.get("data") or {}).get("instance_prompt")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsfast sample", description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run folder (uses its final/) or a diffusers pipeline folder")
    ap.add_argument("--prompt", default=None, help="text-to-image prompt (default: the run's sample prompt)")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=50, help="number of inference steps")
    ap.add_argument("--out", default="grid.png", help="grid PNG to write")
    ap.add_argument("--out-dir", default=None, help="also write each image as a PNG into this folder")
    args = ap.parse_args(argv)
    imgs = sample_images(args.run, args.num, seed=args.seed, prompt=args.prompt, num_inference_steps=args.steps)
    save_grid(imgs, args.out)
    if args.out_dir:
        save_images(imgs, args.out_dir)
    print(f"wrote {args.out} ({args.num} images)")
    return 0


__all__ = ["generate_images", "main", "run_pipeline", "sample_images"]
