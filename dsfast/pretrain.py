"""``dsfast pretrain``: train the demo's *source* model from scratch on CPU.

The source domain is scikit-learn's bundled 8x8 handwritten digits (1,797 images, shipped in the
wheel), bilinearly resized to 16x16, one channel, in [-1, 1] (:func:`dsfast.demo_data.source_digits`).
The model is a diffusers ``UNet2DModel`` (16x16, 1 channel, block_out_channels (32, 64, 64), one
layer per block, Down / AttnDown / AttnDown) with a ``DDPMScheduler`` (1000 steps, linear beta
schedule 1e-4..0.02 as in DDPM and the official DomainStudio code, epsilon prediction), trained with
L_simple ``‖ε − ε̂(x_t, t)‖²`` (uniform t; noising by the scheduler's ``add_noise``), AdamW with a
linear warm-up then cosine decay, and an EMA of the weights (the EMA weights are saved).
No flips (digits are not mirror-symmetric).

Everything random (init, batch order, timesteps, noise) comes from ``--seed``; a rerun with the same
arguments, torch version and thread count gives the same weights. The output folder is a diffusers
``DDPMPipeline`` (safetensors) loadable with ``from_pretrained``, plus ``README.md`` (the exact
command and settings), ``train_log.json`` (the loss per step) and ``samples.png`` (DDIM samples).

What made ``assets/source_model``: ``dsfast pretrain --out assets/source_model`` (the defaults).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dsfast.argtypes import ArgumentParser, finite_float, non_negative_int, positive_float, positive_int, torch_device

DEFAULTS = dict(out="assets/source_model", steps=2000, batch_size=64, lr=1e-3, warmup=100, min_lr_ratio=0.1,
                weight_decay=0.0, ema=0.999, seed=0, threads=2, sample_num=100, sample_steps=50, save_every=250)
BLOCK_OUT_CHANNELS = (32, 64, 64)


def build_unet(size: int = 16):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=BLOCK_OUT_CHANNELS,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon", clip_sample=True, timestep_spacing="trailing")


def parse_args(argv):
    p = ArgumentParser(prog="dsfast pretrain", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DEFAULTS
    p.add_argument("--out", default=d["out"], help="output folder (a diffusers DDPMPipeline)")
    p.add_argument("--steps", type=positive_int, default=d["steps"])
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"])
    p.add_argument("--lr", type=positive_float, default=d["lr"])
    p.add_argument("--warmup", type=non_negative_int, default=d["warmup"], help="linear warm-up steps")
    p.add_argument("--min-lr-ratio", type=finite_float, default=d["min_lr_ratio"],
                   help="cosine decay floor, x lr (0 to 1)")
    p.add_argument("--weight-decay", type=finite_float, default=d["weight_decay"], help="AdamW weight decay (>= 0)")
    p.add_argument("--ema", type=finite_float, default=d["ema"], help="EMA decay, 0 <= ema < 1 (0 disables EMA)")
    p.add_argument("--seed", type=int, default=d["seed"], help="model init, batch order, timesteps, noise")
    p.add_argument("--threads", type=non_negative_int, default=d["threads"],
                   help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--sample-num", type=non_negative_int, default=d["sample_num"], help="images in samples.png (0: none)")
    p.add_argument("--sample-steps", type=positive_int, default=d["sample_steps"], help="DDIM steps for samples.png")
    p.add_argument("--save-every", type=non_negative_int, default=d["save_every"],
                   help="also write the EMA pipeline to --out every N steps (0: only at the end)")
    p.add_argument("--device", type=torch_device, default="cpu")
    args = p.parse_args(argv)
    for flag, value, ok, rule in (("--min-lr-ratio", args.min_lr_ratio, 0 <= args.min_lr_ratio <= 1, "in [0, 1]"),
                                  ("--weight-decay", args.weight_decay, args.weight_decay >= 0, "at least 0"),
                                  ("--ema", args.ema, 0 <= args.ema < 1, "in [0, 1)")):
        if not ok:
            p.error(f"argument {flag}: must be {rule}, got {value:g}")
    return args


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def ddim_samples(pipeline_dir: str | Path, num: int, steps: int = 50) -> torch.Tensor:
    """``num`` samples of a pipeline folder (diffusers ``DDIMPipeline``, eta 0), ``(num, C, H, W)`` in [0, 1],
    quantised to 8 bits (what PNGs hold); sample i starts from the noise of seed i, so two models
    sampled with the same ``num`` get the same noise per sample."""
    from diffusers import DDIMPipeline
    from diffusers.utils import logging as diffusers_logging

    from dsfast.train.sample import run_pipeline

    diffusers_logging.disable_progress_bar()  # the "Loading pipeline components" bar (the demo printed one per model)
    pipe = DDIMPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    channels = pipe.unet.config.out_channels
    images = run_pipeline(pipe, num, seed=0, num_inference_steps=steps, batch=min(num, 100))[:, :channels]
    return torch.round(images * 255) / 255


def _save(unet, scheduler, out: Path) -> None:
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    from dsfast.demo_data import source_digits
    from dsfast.images import save_grid

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    try:  # the folder now: an --out that cannot be one costs no training
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"dsfast pretrain: error: --out {out}: cannot make this folder ({exc.strerror})", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t_start = time.time()

    data, _ = source_digits()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    unet = build_unet(data.shape[-1]).to(device)
    scheduler = build_scheduler()
    ema = copy.deepcopy(unet).eval().requires_grad_(False) if args.ema > 0 else None
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    print(f"{len(data)} source digits {tuple(data.shape[1:])}; UNet2DModel {n_params / 1e6:.2f}M parameters; "
          f"{args.steps} steps x batch {args.batch_size}", flush=True)

    log = []
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(args.steps), desc="pretrain", dynamic_ncols=True, mininterval=10)
    for step in bar:
        if len(order) < args.batch_size:  # epochs of a seeded permutation
            order = torch.cat([order, torch.randperm(len(data), generator=gen)])
        idx, order = order[: args.batch_size], order[args.batch_size:]
        x0 = data[idx].to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if ema is not None:
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - decay)
        log.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{np.mean(log[-50:]):.4f}", lr=f"{lr_at(step, args):.1e}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            _save(ema if ema is not None else unet, scheduler, out)
    train_s = time.time() - t_start

    final = (ema if ema is not None else unet).eval()
    _save(final, scheduler, out)
    (out / "train_log.json").write_text(json.dumps({"loss": [round(v, 5) for v in log]}))
    if args.sample_num > 0:
        print(f"sampling {args.sample_num} images ({args.sample_steps} DDIM steps) ...", flush=True)
        save_grid(ddim_samples(out, args.sample_num, args.sample_steps), out / "samples.png", cols=10, pad=1)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    command = "dsfast pretrain " + shlex.join(argv) if argv else "dsfast pretrain"
    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(vars(args).items()))
    (out / "README.md").write_text(f"""# dsfast demo source model

An unconditional pixel-space DDPM (diffusers `UNet2DModel` + `DDPMScheduler`, 16x16, 1 channel,
{n_params / 1e6:.2f}M parameters, block_out_channels {BLOCK_OUT_CHANNELS}, Down / AttnDown / AttnDown)
trained from scratch by `dsfast pretrain` on scikit-learn's bundled handwritten digits
(`sklearn.datasets.load_digits`: 1,797 8x8 images, bilinear to 16x16, white on black, in [-1, 1]).
It is the pretrained model that `make demo` adapts to 10 target images (bold white digits on grey paper).

Made with exactly (from the repository root):

```
OMP_WAIT_POLICY=PASSIVE {command}
```

(`OMP_WAIT_POLICY=PASSIVE` only stops OpenMP's busy-waiting, which slows training on a shared
machine; it changes no numbers. Bit-identical weights need the same torch version and thread count.)

| setting | value |
|---|---|
{settings}

Objective: DDPM L_simple (epsilon MSE, uniform t over 1000 steps, linear beta schedule 1e-4..0.02),
AdamW, linear warm-up then cosine decay to {args.min_lr_ratio}x lr, grad-norm clip 1.0, no flips;
the saved weights are the EMA (decay {args.ema}, warm-up `min(decay, (1+step)/(10+step))`).
Trained in {train_s / 60:.1f} min on {torch.get_num_threads()} CPU thread(s) ({platform.processor() or platform.machine()},
torch {torch.__version__}); final loss (mean of the last 50 steps) {np.mean(log[-50:]):.4f}.
Folder size {size_mb:.1f} MB. `samples.png`: {args.sample_num} samples (diffusers `DDIMPipeline`,
{args.sample_steps} steps, eta 0, image i from the noise of seed i).

Load it with `diffusers.DDPMPipeline.from_pretrained("{out}")` or `UNet2DModel.from_pretrained("{out}", subfolder="unet")`.
""")
    print(f"saved {out} ({size_mb:.1f} MB) in {(time.time() - t_start) / 60:.1f} min; "
          f"final loss {np.mean(log[-50:]):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
