"""``dsfast pretrain``: train the demo's small *source* model from scratch on CPU.

A diffusers ``UNet2DModel`` (32x32, block_out_channels (16, 32, 64), one layer per block,
one attention block — the mid block's, at 8x8) and a ``DDPMScheduler`` (1000 steps, linear
beta schedule 1e-4..0.02 as in DDPM and the official DomainStudio code, epsilon prediction;
"trailing" timestep spacing, so that few-step DDIM sampling starts from t = 999), trained with the plain DDPM objective L_simple
``‖ε − ε̂(x_t, t)‖²`` on the procedural *source* domain of :mod:`dsfast.demo_data`
(flat shapes on smooth backgrounds), with plain ``torch.optim.AdamW``, linear warm-up then
cosine decay, and an EMA of the weights (the EMA weights are saved).

Everything random (model init, dataset, batch order, flips, timesteps, noise) comes from
``--seed`` / ``--data-seed``; a rerun with the same arguments, torch version and thread count
gives the same weights. The output folder is a diffusers ``DDPMPipeline`` (``model_index.json``,
``unet/``, ``scheduler/``; safetensors) loadable with ``from_pretrained``, plus ``README.md``
(the exact command, seeds, time) and ``samples.png`` (a DDIM sample grid).

Example (what made ``assets/source_model``): ``dsfast pretrain --out assets/source_model``.
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

from dsfast import demo_data

DEFAULTS = dict(out="assets/source_model", steps=3000, batch_size=16, lr=7e-4, warmup=200, min_lr_ratio=0.1,
                weight_decay=0.0, ema=0.999, num_images=8000, seed=0, data_seed=0, resolution=32, threads=2,
                sample_num=64, sample_steps=50)


def build_unet(resolution: int = 32):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
        add_attention=True,  # the single attention block: in the mid block (8x8)
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon", clip_sample=True, timestep_spacing="trailing")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dsfast pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DEFAULTS
    p.add_argument("--out", default=d["out"], help="output folder (a diffusers DDPMPipeline)")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--warmup", type=int, default=d["warmup"], help="linear warm-up steps")
    p.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"], help="cosine decay floor, x lr")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--ema", type=float, default=d["ema"], help="EMA decay (0 disables EMA)")
    p.add_argument("--num-images", type=int, default=d["num_images"], help="size of the generated source set")
    p.add_argument("--seed", type=int, default=d["seed"], help="model init, batch order, timesteps, noise")
    p.add_argument("--data-seed", type=int, default=d["data_seed"], help="seed of the source-domain generator")
    p.add_argument("--resolution", type=int, default=d["resolution"])
    p.add_argument("--threads", type=int, default=d["threads"], help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--sample-num", type=int, default=d["sample_num"], help="images in samples.png (0: none)")
    p.add_argument("--sample-steps", type=int, default=d["sample_steps"], help="DDIM steps for samples.png")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ddim_sample(unet, scheduler_config, num: int, steps: int = 50, seed: int = 0, batch: int = 64,
                eta: float = 1.0) -> torch.Tensor:
    """DDIM samples of an unconditional UNet, ``(num, 3, H, W)`` in [0, 1].

    ``eta = 1`` (stochastic, DDPM-like noise at each of the few steps) by default: with this small,
    briefly trained model deterministic DDIM (eta 0) washes the background colours out to grey.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    device = next(unet.parameters()).device
    out = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        x = torch.randn(n, unet.config.in_channels, size, size, generator=gen).to(device)
        for t in sched.timesteps:
            eps = unet(x, t).sample
            x = sched.step(eps, t, x, eta=eta, generator=gen).prev_sample
        out.append(((x.clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: Path, cols: int = 8, pad: int = 2) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.float32)
    arr = images.permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[k]
    Image.fromarray(demo_data.to_uint8(grid)).save(path)


def main(argv=None) -> int:
    from diffusers import DDPMPipeline
    from tqdm.auto import tqdm

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.num_images < 1:
        raise SystemExit("dsfast pretrain: --steps, --batch-size and --num-images must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    device = torch.device(args.device)
    t_start = time.time()

    print(f"generating {args.num_images} source images (data seed {args.data_seed}) ...", flush=True)
    data = demo_data.to_tensor(demo_data.source_images(args.num_images, seed=args.data_seed, size=args.resolution))

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    unet = build_unet(args.resolution).to(device)
    scheduler = build_scheduler()
    ema = copy.deepcopy(unet).eval().requires_grad_(False) if args.ema > 0 else None
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    alphas = scheduler.alphas_cumprod.to(device)
    print(f"UNet2DModel: {n_params / 1e6:.2f}M parameters; {args.steps} steps x batch {args.batch_size}", flush=True)

    log = []
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(args.steps), desc="pretrain", dynamic_ncols=True)
    for step in bar:
        if len(order) < args.batch_size:  # epochs of a seeded permutation
            order = torch.cat([order, torch.randperm(len(data), generator=gen)])
        idx, order = order[: args.batch_size], order[args.batch_size:]
        x0 = data[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, noise)
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
    train_s = time.time() - t_start

    final = (ema if ema is not None else unet).eval()
    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=final, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps({"loss": [round(v, 5) for v in log]}))
    if args.sample_num > 0:
        print(f"sampling {args.sample_num} images ({args.sample_steps} DDIM steps) ...", flush=True)
        samples = ddim_sample(final, scheduler.config, args.sample_num, args.sample_steps, seed=args.seed)
        save_grid(samples, out / "samples.png")
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    command = "dsfast pretrain " + shlex.join(argv) if argv else "dsfast pretrain"
    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(vars(args).items()))
    (out / "README.md").write_text(f"""# dsfast demo source model

A small unconditional pixel-space DDPM (diffusers `UNet2DModel` + `DDPMScheduler`, 32x32 RGB,
{n_params / 1e6:.2f}M parameters) trained from scratch by `dsfast pretrain` on the procedural
*source* domain of `dsfast/demo_data.py` (`source_images(num_images={args.num_images}, seed={args.data_seed})`:
one or two flat-coloured shapes — disc, square, triangle, ring, plus — on a solid or gradient background).
It is the pretrained model that `make demo` adapts to the 10-image *sketch* target domain.

Made with exactly:

```
{command}
```

| setting | value |
|---|---|
{settings}

Objective: DDPM L_simple (epsilon MSE, uniform t over 1000 steps, linear beta schedule), AdamW,
linear warm-up then cosine decay to {args.min_lr_ratio}x lr, grad-norm clip 1.0, random horizontal flips;
the saved weights are the EMA (decay {args.ema}, warm-up `min(decay, (1+step)/(10+step))`).
Trained in {train_s / 60:.1f} min on {torch.get_num_threads()} CPU thread(s) ({platform.processor() or platform.machine()},
torch {torch.__version__}); final loss (mean of the last 50 steps) {np.mean(log[-50:]):.4f}.
Folder size {size_mb:.1f} MB. `samples.png`: {args.sample_num} DDIM samples ({args.sample_steps} steps, eta 1, seed {args.seed}).

Load it with `diffusers.DDPMPipeline.from_pretrained("{out}")` or `UNet2DModel.from_pretrained("{out}", subfolder="unet")`.
""")
    print(f"saved {out} ({size_mb:.1f} MB) in {(time.time() - t_start) / 60:.1f} min; "
          f"final loss {np.mean(log[-50:]):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
