"""``dsfast sample --run DIR [--prompt ...] --num 16 --out grid.png``: generate from a run's weights."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch


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
    is_text = hasattr(pipe, "tokenizer") and getattr(pipe, "tokenizer", None) is not None
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


def sample_images(run_or_pipeline_dir, num: int, *, seed: int = 0, prompt: str | None = None,
                  num_inference_steps: int = 50) -> torch.Tensor:
    """Generate ``num`` images from a run folder (its ``final/``) or a pipeline folder: (N, 3, H, W) in [0, 1]."""
    from diffusers import DiffusionPipeline

    path = _pipeline_dir(run_or_pipeline_dir)
    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    if prompt is None and getattr(pipe, "tokenizer", None) is not None:
        prompt = _run_prompt(path)
    return run_pipeline(pipe, num, seed=seed, prompt=prompt, num_inference_steps=num_inference_steps)


def _run_prompt(pipeline_dir: Path) -> str | None:
    cfg = pipeline_dir.parent / "config.yaml"
    if cfg.is_file():
        import yaml

        data = yaml.safe_load(cfg.read_text()) or {}
        return (data.get("sample") or {}).get("prompt") or (data.get("data") or {}).get("instance_prompt")
    return None


def make_grid(images: torch.Tensor, ncols: int | None = None) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> uint8 (rows*H, cols*W, 3) grid."""
    n, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = torch.zeros(c, nrows * h, ncols * w)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsfast sample", description=__doc__)
    ap.add_argument("--run", required=True, help="run folder (uses its final/) or a diffusers pipeline folder")
    ap.add_argument("--prompt", default=None, help="text-to-image prompt (default: the run's sample prompt)")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=50, help="number of inference steps")
    ap.add_argument("--out", default="grid.png", help="grid PNG to write")
    ap.add_argument("--out-dir", default=None, help="also write each image as a PNG into this folder")
    args = ap.parse_args(argv)
    from PIL import Image

    imgs = sample_images(args.run, args.num, seed=args.seed, prompt=args.prompt, num_inference_steps=args.steps)
    Image.fromarray(make_grid(imgs)).save(args.out)
    if args.out_dir:
        d = Path(args.out_dir)
        d.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs):
            Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(d / f"{i:05d}.png")
    print(f"wrote {args.out} ({args.num} images)")
    return 0
