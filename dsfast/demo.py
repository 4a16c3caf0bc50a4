"""``python -m dsfast.demo`` (``make demo``): few-shot adaptation of a small DDPM, fine-tuning vs DomainStudio.

1. Writes the 10-image *sketch* target domain (:mod:`dsfast.demo_data`) to ``<out>/target/``.
2. Adapts the committed source model (``assets/source_model``, trained by ``dsfast pretrain`` on
   flat-coloured shapes) to those 10 images twice, with the same steps, batch, lr and seed:
   plain ``finetune`` (L_simple only) and ``domainstudio`` (L_simple + the pairwise-similarity
   KL of x̃0 and of its high-frequency part + hf-MSE, weights 4 / 4 / 0.05 — the official
   unconditional code's flags are 4 / 4 / 1 but it adds the hf-MSE term times 0.05), both through
   :func:`dsfast.train.train`.
3. Samples the source, fine-tuned and DomainStudio models with the same noise
   (DDIM, 50 steps, eta 1) and scores them against the 10 training images with :mod:`dsfast.eval`
   (the weight-free *fallback* distance — no pretrained network can be downloaded here —
   so every diversity number is labelled "fallback"; it is not LPIPS).
4. Writes ``<out>/comparison.png`` (labelled rows: training images, source, fine-tuned,
   DomainStudio samples), ``<out>/loss_curves.png``, ``<out>/metrics.json``, the samples as
   PNGs under ``<out>/samples/<model>/`` and prints a table.

Reproduce a row with ``dsfast eval --samples <out>/samples/domainstudio --train <out>/target``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dsfast import demo_data

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT / "assets" / "source_model"
MODELS = ("source", "finetune", "domainstudio")
LABELS = {"target": "training images\n(10, target)", "source": "source model\n(no adaptation)",
          "finetune": "fine-tuned", "domainstudio": "DomainStudio"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dsfast.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_run"), help="run folder to write")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="pretrained source pipeline folder")
    p.add_argument("--steps", type=int, default=400, help="adaptation steps of each method")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="training seed (both methods) and sampling seed")
    p.add_argument("--lambda-image", type=float, default=4.0, help="DomainStudio: weight of the image pairwise KL")
    p.add_argument("--lambda-hf", type=float, default=4.0, help="DomainStudio: weight of the high-frequency pairwise KL")
    p.add_argument("--lambda-hfmse", type=float, default=0.05,
                   help="DomainStudio: weight of the hf-MSE (the official unconditional code multiplies its "
                        "hf_mse_weight=1 by 0.05)")
    p.add_argument("--data-seed", type=int, default=1234, help="seed of the target-domain generator")
    p.add_argument("--num-train", type=int, default=10, help="number of target training images")
    p.add_argument("--num-samples", type=int, default=100, help="samples per model for the metrics")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0,
                   help="DDIM eta (1: stochastic; 0: deterministic DDIM, which greys this small model's colours)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--methods", default="finetune,domainstudio", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_model(pipeline_dir: Path, num: int, steps: int, seed: int, desc: str, batch: int = 50,
                 eta: float = 1.0) -> torch.Tensor:
    """DDIM samples ``(num, 3, H, W)`` in [0, 1], quantised to 8 bits (what the PNGs hold).

    The initial noise and the per-step noise (eta > 0) depend only on ``seed`` and the sample
    batch, so every model gets the same noise and the rows of the comparison are paired.
    """
    from diffusers import DDIMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    unet = UNet2DModel.from_pretrained(pipeline_dir, subfolder="unet").eval()
    sched = DDIMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler")
    sched.set_timesteps(steps)
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, unet.config.in_channels, size, size, generator=gen)
    step_gen = torch.Generator().manual_seed(seed + 1)
    out = []
    bar = tqdm(total=steps * ((num + batch - 1) // batch), desc=f"sample {desc}", dynamic_ncols=True)
    for start in range(0, num, batch):
        x = noise[start: start + batch]
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=eta, generator=step_gen).prev_sample
            bar.update(1)
        out.append(((x.clamp(-1, 1) + 1) / 2))
    bar.close()
    images = torch.cat(out)
    return torch.round(images * 255) / 255


def write_pngs(images: torch.Tensor, directory: Path, prefix: str) -> None:
    demo_data.write_images(images.permute(0, 2, 3, 1).numpy(), directory, prefix=prefix)


# ----------------------------------------------------------------------------- figures

def _grid(images: torch.Tensor, cols: int, pad: int = 1) -> np.ndarray:
    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    g = np.ones((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), np.float32)
    arr = images.permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, c = divmod(k, cols)
        g[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = arr[k]
    return g


def comparison_figure(rows: dict[str, torch.Tensor], path: Path, title: str, cols: int = 10,
                      sample_rows: int = 2) -> None:
    """One labelled row group per entry of ``rows``: the training images, then ``sample_rows`` x ``cols`` samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids, heights = [], []
    for name, imgs in rows.items():
        n = len(imgs) if name == "target" else min(len(imgs), cols * sample_rows)
        g = _grid(imgs[:n], cols)
        grids.append((name, g))
        heights.append(g.shape[0])
    fig, axes = plt.subplots(len(grids), 1, figsize=(cols * 0.75 + 1.6, sum(heights) / 32 * 0.78 + 0.6),
                             gridspec_kw={"height_ratios": heights})
    for ax, (name, g) in zip(np.atleast_1d(axes), grids):
        ax.imshow(g, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        ax.set_ylabel(LABELS.get(name, name), rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(y: np.ndarray, k: int = 10) -> np.ndarray:
    if len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:k] / np.arange(1, k)
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


def loss_figure(metrics: dict[str, list[dict]], path: Path) -> None:
    """Left: L_simple of both runs; right: every DomainStudio loss term as logged (before the λ weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"finetune": "tab:blue", "domainstudio": "tab:red"}
    for name, rows in metrics.items():
        steps = np.array([r["step"] for r in rows])
        y = np.array([r.get("simple", r["loss"]) for r in rows], dtype=float)
        ax1.plot(steps, y, color=colors.get(name), alpha=0.25, lw=0.8)
        ax1.plot(steps, _smooth(y), color=colors.get(name), label=f"{LABELS.get(name, name)} (L_simple)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("L_simple (ε-MSE)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("denoising loss on the 10 target images")
    if "domainstudio" in metrics:
        rows = metrics["domainstudio"]
        steps = np.array([r["step"] for r in rows])
        for key in ("loss", "simple", "image", "hf", "hfmse"):
            if key in rows[0]:
                y = np.array([max(r[key], 1e-6) for r in rows], dtype=float)  # step 1: the KLs are 0
                ax2.plot(steps, _smooth(y), label=key)
        ax2.set_yscale("log")
        ax2.set_xlabel("step")
        ax2.set_title("DomainStudio terms, unweighted as logged (moving average of 10)")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- table

def format_table(results: dict, times: dict) -> str:
    head = ("model", "intra-div [fallback]", "clusters", "memorised", "NN dist [fallback]", "HF ratio", "train s")
    lines = []
    for name in MODELS:
        if name not in results:
            continue
        r = results[name]
        intra, mem = r["intra_cluster"], r["memorisation"]
        lines.append((
            LABELS[name].split("\n")[0],
            f"{intra['mean']:.4f} ± {intra['std']:.4f}",
            f"{intra['clusters_used']}/{r['num_train']}",
            f"{mem['rate']:.2f}" if mem.get("rate") is not None else "n/a",
            f"{r['nn_dist']:.4f}",
            f"{r['hf_ratio']:.2f}",
            f"{times[name]:.0f}" if name in times else "-",
        ))
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(f"{c:<{w}}" for c, w in zip(row, widths))  # noqa: E731
    out = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not (args.source / "model_index.json").is_file():
        raise SystemExit(f"source model not found at {args.source} (expected a diffusers pipeline folder; "
                         "make one with `dsfast pretrain --out assets/source_model`)")
    methods = [m for m in args.methods.split(",") if m]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    from dsfast.eval import HaarDistance, evaluate

    target_dir = out / "target"
    demo_data.write_target_dir(target_dir, n=args.num_train, seed=args.data_seed)
    from dsfast.eval import load_folder

    target, _ = load_folder(target_dir)  # as written (8-bit), the same input `dsfast eval` sees
    print(f"wrote {len(target)} target images to {target_dir}", flush=True)

    from dsfast.train import train

    run_dirs, times = {}, {}
    for method in methods:
        config = {
            "method": method,
            "model": {"pretrained": str(args.source.resolve())},
            "data": {"instance_dir": str(target_dir), "resolution": int(target.shape[-1])},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size,
                      "micro_batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "ema": 0},
            "output_dir": str(out / "runs" / method),
            "sample_every": 0,
            "checkpoint_every": 0,
        }
        if method == "domainstudio":
            config["loss"] = {"image": args.lambda_image, "hf": args.lambda_hf, "hfmse": args.lambda_hfmse}
        print(f"\n== {method}: {args.steps} steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}", flush=True)
        t = time.time()
        run_dirs[method] = Path(train(config, resume="none"))
        times[method] = time.time() - t
        # the trainer always checkpoints the last step (optimizer state included); the demo keeps final/ only
        shutil.rmtree(run_dirs[method] / "checkpoints", ignore_errors=True)

    print("", flush=True)
    samples = {}
    pipelines = {"source": args.source, **{m: run_dirs[m] / "final" for m in methods}}
    for name, pipe_dir in pipelines.items():
        samples[name] = sample_model(pipe_dir, args.num_samples, args.sample_steps, args.seed, name, eta=args.eta)
        write_pngs(samples[name], out / "samples" / name, prefix=name)

    distance = HaarDistance()
    results = {name: evaluate(imgs, target, distance) for name, imgs in samples.items()}

    comparison_figure({"target": target, **samples}, out / "comparison.png",
                      f"{args.steps} adaptation steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}; "
                      f"DDIM {args.sample_steps} steps (eta {args.eta:g}), same noise in every row")
    loss_figure({m: read_metrics(run_dirs[m]) for m in methods}, out / "loss_curves.png")

    summary = {}
    if "finetune" in results and "domainstudio" in results:
        ft, ds = results["finetune"]["intra_cluster"]["mean"], results["domainstudio"]["intra_cluster"]["mean"]
        summary["diversity_ratio_domainstudio_over_finetune"] = ds / ft if ft > 0 else float("inf")
        summary["goal"] = "DomainStudio >= 1.2x the intra-cluster diversity of fine-tuning (fallback distance)"
        summary["goal_met"] = bool(ds >= 1.2 * ft)
    total = time.time() - t0
    report = {
        "metric": distance.label,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.machine(), "python": platform.python_version()},
        "train_seconds": times,
        "total_seconds": total,
        **summary,
        "results": results,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))

    print("\n" + format_table(results, times))
    print("intra-div: intra-cluster diversity (CDC Intra-LPIPS protocol) with the FALLBACK multi-scale Haar "
          "distance, not LPIPS;\nmemorised: share of samples closer to a training image than any two training "
          "images are; NN dist: mean distance\nto the nearest training image; HF ratio: high-frequency energy "
          "of the samples / of the training images (1 = matched).")
    if "diversity_ratio_domainstudio_over_finetune" in summary:
        r = summary["diversity_ratio_domainstudio_over_finetune"]
        print(f"DomainStudio / fine-tuned intra-cluster diversity: {r:.2f}x "
              f"(goal >= 1.2x: {'met' if summary['goal_met'] else 'NOT met'})")
    print(f"\nwrote {out}/comparison.png, loss_curves.png, metrics.json, samples/ in {total / 60:.1f} min")
    return 0


def _reexec_with_passive_openmp() -> None:
    """Re-run this command once with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set.

    OpenMP's default busy-waiting makes torch's CPU ops several times slower when the cores are
    shared with other processes (measured 2-3x on a loaded 2-core machine); the policy must be
    set before torch starts, which ``import dsfast`` already did. It changes no numbers.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        os.execve(sys.executable, [sys.executable, "-m", "dsfast.demo", *sys.argv[1:]], env)


if __name__ == "__main__":
    _reexec_with_passive_openmp()
    sys.exit(main())
