"""``python -m dsfast.demo`` (``make demo``): 10-shot adaptation of a digit DDPM, fine-tuning vs DomainStudio.

1. Renders the 10 target images (bold white digits on grey paper, :mod:`dsfast.demo_data`) to
   ``<out>/target/``, and fresh target images that calibrate the metrics.
2. Adapts the committed source model (``assets/source_model``: a DDPM trained by ``dsfast pretrain``
   on scikit-learn's digits, white on black) to the 10 images with :func:`dsfast.train.train`, for
   every seed: plain ``finetune`` (L_simple) and ``domainstudio`` (L_simple + λ_img·KL_img + λ_hf·KL_hf
   + λ_hfmse·hf-MSE, :data:`DOMAINSTUDIO_LOSS`), same steps, lr, EMA, batch and seed. Each run stops at
   every checkpoint step, is sampled, and resumes (the trainer's own resume).
3. Samples every model from the same noise (diffusers ``DDIMPipeline``, eta 0: sample i of every
   model starts from the noise of seed i) and scores it (:mod:`dsfast.eval.fewshot`): copy rate,
   digit-class coverage / entropy, correspondence with the source model's digit for the same noise,
   target-style rate and MMD² to fresh target images.
4. Repeats DomainStudio at the final step for each λ_img of ``--sweep`` (first seed only)
   (the diversity-vs-fidelity trade-off, ``sweep.png``).
5. Writes ``comparison.png`` (the training images, then the samples of the source, fine-tuned and DomainStudio
   models of the first seed at the final step and, when the sweep goes above ``--lambda-image``, of DomainStudio at
   the sweep's largest λ_img: every row from the same noise), ``curves.png``, ``loss_curves.png``,
   ``metrics.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from dsfast import demo_data
from dsfast.pretrain import ddim_samples

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT / "assets" / "source_model"
# The DomainStudio terms of the demo (config section ``loss``): the official weights, every term, with
# dsfast's hf-MSE weighting (``loss.hfmse_weighting: min_snr``, the default): unweighted, the hf-MSE of x̃0
# is a 1/SNR-weighted high-frequency ε loss whose gradient is ~800x L_simple's (median over a run of
# this demo; 1.5x with min_snr: docs/official.md, "hf-MSE weighting, measured").
DOMAINSTUDIO_LOSS = {"image": 4.0, "hf": 4.0, "hfmse": 1.0}
NUM_CLASSES = 10
METHODS = ("finetune", "domainstudio")
LABELS = {"target": "training images (10)", "source": "source model", "finetune": "fine-tuned",
          "domainstudio": "DomainStudio"}
COLORS = {"finetune": "tab:blue", "domainstudio": "tab:red"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dsfast.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_run"), help="run folder to write")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="pretrained source pipeline folder")
    p.add_argument("--steps", type=int, default=300, help="adaptation steps of each run")
    p.add_argument("--checkpoints", type=int, default=3, help="evaluated checkpoints per run, evenly spaced")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (comma-separated)")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the trainer (0: off)")
    p.add_argument("--lambda-image", type=float, default=DOMAINSTUDIO_LOSS["image"])
    p.add_argument("--lambda-hf", type=float, default=DOMAINSTUDIO_LOSS["hf"])
    p.add_argument("--lambda-hfmse", type=float, default=DOMAINSTUDIO_LOSS["hfmse"])
    p.add_argument("--sweep", default="0,1,4,16", help="λ_img values of a DomainStudio sweep at the final step "
                                                       "(seed: the first of --seeds; '' for none)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the target-domain renders")
    p.add_argument("--num-samples", type=int, default=100, help="samples per model and checkpoint")
    p.add_argument("--num-fresh", type=int, default=500, help="fresh target images calibrating the metrics")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="training runs at once, each in its own process with one torch thread (a model this small "
                        "keeps one core busy per run; 1: in this process with --threads)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads with --jobs 1 (0: torch's default)")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.sweep = [float(s) for s in args.sweep.split(",") if s.strip()]
    if args.steps < 1 or args.checkpoints < 1 or args.jobs < 1 or not args.seeds or args.num_samples < 2:
        p.error("--steps, --checkpoints and --jobs must be >= 1, --seeds non-empty, --num-samples >= 2")
    if args.num_fresh < 40:
        p.error("--num-fresh must be >= 40 (the copy threshold is a 5% quantile)")
    return args


def checkpoint_steps(steps: int, n: int) -> list[int]:
    return sorted({max(1, round(steps * (k + 1) / n)) for k in range(n)})


# ----------------------------------------------------------------------------- models and samples

def run_config(args, method: str, seed: int, target_dir: Path, run_dir: Path, lambda_image: float | None = None) -> dict:
    """The trainer config of one demo run (the keys of docs/config.md)."""
    config = {
        "method": method,
        "model": {"pretrained": str(args.source.resolve())},
        "data": {"instance_dir": str(target_dir), "random_flip": False},  # digits are not mirror-symmetric
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
                  "seed": seed},
        # one process: ZeRO has nothing to shard, and stage 0 skips its per-gradient hooks (~8% of a step here)
        "deepspeed": {"zero_stage": 0},
        "output_dir": str(run_dir),
        "checkpoint_every": 0,
        "keep_last": 1,
        "sample_every": 0,
    }
    if method == "domainstudio":
        config["loss"] = {"image": args.lambda_image if lambda_image is None else lambda_image,
                          "hf": args.lambda_hf, "hfmse": args.lambda_hfmse}
    return config


def train_and_sample(args, config: dict, stops: list[int], log: Path | None = None) -> tuple[dict[int, torch.Tensor], float]:
    """Train ``config`` to each step of ``stops`` in turn (resuming), sampling ``final/`` at each; (samples,
    seconds). ``log``: the trainer's progress bar and messages go to that file instead of the terminal."""
    from dsfast.train import train

    samples, seconds = {}, 0.0
    with contextlib.ExitStack() as stack:
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(output_to(stack.enter_context(open(log, "w"))))
        for k, stop in enumerate(stops):
            t = time.time()
            run_dir = Path(train(config, [f"train.max_steps={stop}"], resume="none" if k == 0 else "latest"))
            seconds += time.time() - t
            samples[stop] = ddim_samples(run_dir / "final", args.num_samples, args.sample_steps)
    shutil.rmtree(Path(config["output_dir"]) / "checkpoints", ignore_errors=True)
    return samples, seconds


@contextlib.contextmanager
def output_to(file):
    """This process's stdout and stderr go to ``file``, at the file-descriptor level: what subprocesses write goes
    there too. ``sys.stdout`` / ``sys.stderr`` stay on descriptors 1 and 2, so a library that silences a child by
    pointing ``sys.stderr.fileno()`` elsewhere (DeepSpeed's op checks, whose probe for libaio starts a linker that
    fails) still silences it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        with (open(1, "w", buffering=1, closefd=False) as out, open(2, "w", buffering=1, closefd=False) as err,
              contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        file.flush()
        for fd, saved_fd in zip((1, 2), saved):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)


def _one_thread() -> None:
    torch.set_num_threads(1)
    # each worker is its own one-process run: a rendezvous inherited from the parent (an in-process train()
    # sets MASTER_PORT) would give every worker the same port
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)


def run_all(args, runs: dict[str, tuple[dict, list[int]]]):
    """Yield ``(name, samples, seconds)`` for every ``name: (config, stops)`` as it finishes, ``args.jobs`` at a time.

    With several jobs each run trains in a worker process with one torch thread, its progress bar in
    ``<output_dir>.log``; the DeepSpeed CPU op every run needs is built here first, once.
    """
    if args.jobs == 1:
        for name, (config, stops) in runs.items():
            print(f"\n== {name}", flush=True)
            yield (name, *train_and_sample(args, config, stops))
        return
    from dsfast.train.distributed import build_cpu_comm_op

    build_cpu_comm_op()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        futures = {}
        for name, (config, stops) in runs.items():
            log = Path(config["output_dir"] + ".log")
            futures[pool.submit(train_and_sample, args, config, stops, log)] = name
            print(f"queued {name} (progress: {log})", flush=True)
        for future in as_completed(futures):
            yield (futures[future], *future.result())


# ----------------------------------------------------------------------------- metrics

class Scorer:
    """The demo's metrics, calibrated once on fresh target images and the source digits."""

    def __init__(self, train01: torch.Tensor, data_seed: int, num_fresh: int):
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import SVC

        from dsfast.eval import HaarDistance
        from dsfast.eval.fewshot import copy_threshold

        self.train, self.data_seed = train01, data_seed
        self.distance = HaarDistance()
        n_train = len(train01)
        fresh, _ = demo_data.target_images(num_fresh, data_seed, start=n_train)
        self.fresh = (fresh + 1) / 2
        self.threshold = copy_threshold(self.fresh, train01, self.distance)
        # classifiers: source digits and target renders (another seed), split 80/20
        src, src_y = demo_data.source_digits()
        tgt, tgt_y = demo_data.target_images(len(src), data_seed + 1)
        x = torch.cat([src, tgt]).add(1).div(2).flatten(1).numpy()
        y = torch.cat([src_y, tgt_y]).numpy()
        dom = np.r_[np.zeros(len(src)), np.ones(len(tgt))]
        test = np.random.default_rng(0).uniform(size=len(x)) < 0.2
        self.content = SVC(gamma="scale").fit(x[~test], y[~test])
        self.style = LogisticRegression(max_iter=2000).fit(x[~test], dom[~test])
        pred = self.content.predict(x[test])
        self.calibration = {
            "copy_threshold": self.threshold, "copy_threshold_quantile": 0.05, "num_fresh": num_fresh,
            "content_classifier": "sklearn SVC (RBF) on 16x16 pixels, source digits + target renders",
            "content_accuracy_source": float((pred == y[test])[dom[test] == 0].mean()),
            "content_accuracy_target": float((pred == y[test])[dom[test] == 1].mean()),
            "style_classifier": "sklearn LogisticRegression on 16x16 pixels, source (0) vs target (1)",
            "style_accuracy": float((self.style.predict(x[test]) == dom[test]).mean()),
        }

    def labels(self, images01: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.content.predict(images01.flatten(1).numpy())).long()

    def score(self, images01: torch.Tensor, source_labels: torch.Tensor | None) -> dict:
        from dsfast.eval.fewshot import copy_rate, correspondence, label_diversity, mmd2

        labels = self.labels(images01)
        div = label_diversity(labels, NUM_CLASSES)
        out = {
            "copy_rate": copy_rate(images01, self.train, self.threshold, self.distance)["rate"],
            "class_coverage": div["coverage"],
            "class_entropy_bits": div["entropy_bits"],
            "class_histogram": div["histogram"],
            "target_style_rate": float(self.style.predict(images01.flatten(1).numpy()).mean()),
            "mmd2_to_target": mmd2(images01, self.fresh)["mmd2"],
        }
        if source_labels is not None:
            out["correspondence"] = correspondence(labels, source_labels)
        return out

    def baselines(self, num: int, source_labels: torch.Tensor) -> dict:
        """What the figures read for new fresh target images, for copies of the training set and for noise.

        Their "same digit as source" pairs unrelated images with the source samples: the chance level.
        """
        fresh, _ = demo_data.target_images(num, self.data_seed, start=len(self.train) + len(self.fresh))
        fresh = (fresh + 1) / 2
        copies = self.train[torch.arange(num) % len(self.train)]
        noise = torch.rand(num, *self.train.shape[1:], generator=torch.Generator().manual_seed(0))
        return {
            "fresh_target": self.score(fresh, source_labels),
            "training_set_copies": self.score(copies, source_labels),
            "uniform_noise": self.score(noise, source_labels),
        }


def mean_std(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "values": [float(v) for v in a]}


SCALARS = ("copy_rate", "class_coverage", "class_entropy_bits", "correspondence", "target_style_rate",
           "mmd2_to_target")


def summarise(per_seed: dict[int, dict[int, dict]]) -> dict[int, dict]:
    """``{seed: {step: scores}}`` -> ``{step: {metric: mean/std over seeds}}``."""
    steps = sorted(next(iter(per_seed.values())))
    return {s: {m: mean_std([per_seed[seed][s][m] for seed in per_seed]) for m in SCALARS} for s in steps}


# ----------------------------------------------------------------------------- figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def comparison_figure(rows: dict[str, torch.Tensor], path: Path, title: str, cols: int = 10, sample_rows: int = 2) -> None:
    """Rows labelled by their keys: the first (the training images) whole, then ``sample_rows`` x ``cols`` samples of
    each model (same noise per column)."""
    from dsfast.images import make_grid

    plt = _plt()
    grids = [(label, make_grid(imgs[: len(imgs) if k == 0 else cols * sample_rows], cols=cols, pad=1))
             for k, (label, imgs) in enumerate(rows.items())]
    heights = [g.shape[0] for _, g in grids]
    label_in, width = 1.7, cols * 0.62 + 1.9  # inches: room for the row labels on the left
    height = sum(heights) / 17 * 0.62 + 0.7
    fig, axes = plt.subplots(len(grids), 1, figsize=(width, height), gridspec_kw={"height_ratios": heights})
    fig.subplots_adjust(left=label_in / width, right=0.98, top=1 - 0.45 / height, bottom=0.1 / height, hspace=0.08)
    for ax, (name, g) in zip(np.atleast_1d(axes), grids):
        ax.imshow(g, interpolation="nearest")
        ax.set_axis_off()
        ax.text(-0.02, 0.5, name, transform=ax.transAxes, ha="right", va="center", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparison_rows(lambda_image: float, train01: torch.Tensor, source: torch.Tensor, final: dict[str, torch.Tensor],
                    sweep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows of ``comparison.png`` by label: training images, source, fine-tuned, DomainStudio at ``lambda_image``
    and, when the sweep (samples by λ_img, as ``f"{λ:g}"``) goes higher, DomainStudio at the sweep's largest λ_img:
    the far end of the trade-off the sweep measures, from the same noise."""
    rows = {LABELS["target"]: train01, LABELS["source"]: source, LABELS["finetune"]: final["finetune"],
            f"{LABELS['domainstudio']},\nλ_img {lambda_image:g}": final["domainstudio"]}
    strongest = max(sweep, key=float, default=None)
    if strongest is not None and float(strongest) > lambda_image:
        rows[f"{LABELS['domainstudio']},\nλ_img {strongest}"] = sweep[strongest]
    return rows


def curves_figure(summary: dict, baselines: dict, path: Path) -> None:
    """Each metric over the checkpoints, mean ± std over seeds, with the fresh-target and noise levels."""
    plt = _plt()
    panels = [("copy_rate", "copy rate"), ("class_entropy_bits", "digit-class entropy (bits)"),
              ("correspondence", "same digit as the source\nfor the same noise"),
              ("mmd2_to_target", "MMD² to fresh target images")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4), layout="constrained")
    for ax, (key, name) in zip(axes, panels):
        for method, by_step in summary.items():
            steps = np.array(sorted(by_step))
            m = np.array([by_step[s][key]["mean"] for s in steps])
            sd = np.array([by_step[s][key]["std"] for s in steps])
            ax.plot(steps, m, "o-", color=COLORS[method], label=LABELS[method])
            ax.fill_between(steps, m - sd, m + sd, color=COLORS[method], alpha=0.2, lw=0)
        for base, style in (("fresh_target", "--"), ("uniform_noise", ":")):
            if key != "correspondence" or base == "fresh_target":
                ax.axhline(baselines[base][key], color="0.4", ls=style, lw=1,
                           label={"fresh_target": "fresh target images (correspondence: chance)",
                                  "uniform_noise": "uniform noise"}[base])
        ax.set_xlabel("adaptation step")
        ax.set_title(name, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_figure(sweep: dict[str, dict], finetune: dict, baselines: dict, path: Path, title: str) -> None:
    """Diversity (copy rate, class entropy) against fidelity (MMD² to the target) for each λ_img."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    for ax, key, name in ((axes[0], "copy_rate", "copy rate"), (axes[1], "class_entropy_bits", "digit-class entropy (bits)")):
        x = [v["mmd2_to_target"] for v in sweep.values()]
        y = [v[key] for v in sweep.values()]
        ax.plot(x, y, "o-", color=COLORS["domainstudio"], label="DomainStudio")
        for lam, xi, yi in zip(sweep, x, y):
            ax.annotate(f"λ_img {lam}", (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.plot(finetune["mmd2_to_target"], finetune[key], "s", color=COLORS["finetune"], label="fine-tuned")
        ref = baselines["fresh_target"]
        ax.plot(ref["mmd2_to_target"], ref[key], "*", ms=11, color="0.3", label="fresh target images")
        ax.set_xlabel("MMD² to fresh target images (lower: closer to the target)")
        ax.set_ylabel(name)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def moving_average(y: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Full-window moving average (no partial first windows) and the index of its first point."""
    k = max(1, min(k, len(y)))
    c = np.cumsum(np.insert(np.asarray(y, dtype=float), 0, 0.0))
    return (c[k:] - c[:-k]) / k, k - 1


def loss_figure(metrics: dict[str, list[dict]], path: Path, window: int = 25) -> None:
    """Left: L_simple of both runs; right: every logged DomainStudio term (before the λ weights)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for name, rows in metrics.items():
        steps = np.array([r["step"] for r in rows])
        y = np.array([r["simple"] for r in rows], dtype=float)
        ma, first = moving_average(y, window)
        ax1.plot(steps, y, color=COLORS[name], alpha=0.2, lw=0.7)
        ax1.plot(steps[first:], ma, color=COLORS[name], label=f"{LABELS[name]}")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("L_simple (ε-MSE)")
    ax1.set_title(f"denoising loss (faint: per step; line: mean of {window})", fontsize=10)
    ax1.legend(loc="upper right", framealpha=0.9)
    rows = metrics.get("domainstudio", [])
    if rows:
        steps = np.array([r["step"] for r in rows])
        for key, label in (("simple", "L_simple"), ("image", "KL_img"), ("hf", "KL_hf"), ("hfmse", "hf-MSE")):
            if key in rows[0]:
                ma, first = moving_average(np.array([r[key] for r in rows], dtype=float), window)
                keep = ma > 0  # the KLs are exactly 0 while the adapted model equals the source
                ax2.plot(steps[first:][keep], ma[keep], label=label)
        ax2.set_yscale("log")
        ax2.set_xlabel("step")
        ax2.set_title(f"DomainStudio terms as logged, unweighted (mean of {window})", fontsize=10)
        ax2.legend(loc="center right", framealpha=0.9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- table

def format_table(final: dict[str, dict], source: dict, baselines: dict, n_seeds: int) -> str:
    head = ("model", "copy rate", "classes", "class entropy", "same digit as source", "target style", "MMD² to target")

    def cell(v, key, fmt):
        return f"{v[key]['mean']:{fmt}} ± {v[key]['std']:{fmt}}" if isinstance(v[key], dict) else f"{v[key]:{fmt}}"

    def row(name, v):
        return (name, cell(v, "copy_rate", ".2f"), cell(v, "class_coverage", ".1f"), cell(v, "class_entropy_bits", ".2f"),
                cell(v, "correspondence", ".2f") if "correspondence" in v else "-",
                cell(v, "target_style_rate", ".2f"), cell(v, "mmd2_to_target", ".3f"))

    lines = [row("source model", source)]
    lines += [row(f"{LABELS[m]} ({n_seeds} seeds)", final[m]) for m in final]
    lines += [row("ref: fresh target images", baselines["fresh_target"]),
              row("ref: copies of the 10", baselines["training_set_copies"]),
              row("ref: uniform noise", baselines["uniform_noise"])]
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(f"{c:<{w}}" for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines])


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not (args.source / "model_index.json").is_file():
        raise SystemExit(f"source model not found at {args.source} (expected a diffusers pipeline folder; "
                         "make one with `dsfast pretrain --out assets/source_model`)")
    from dsfast.images import load_folder, save_images

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    target_dir = out / "target"
    shutil.rmtree(target_dir, ignore_errors=True)
    demo_data.write_target_dir(target_dir, n=10, seed=args.data_seed)
    train01, _ = load_folder(target_dir, channels=1)  # as written (8-bit): what the trainer reads
    train_classes = demo_data.target_images(10, args.data_seed)[1]
    print(f"wrote 10 target images to {target_dir} (digits {train_classes.tolist()})", flush=True)

    scorer = Scorer(train01, args.data_seed, args.num_fresh)
    print("calibration: " + ", ".join(f"{k} {v:.3g}" for k, v in scorer.calibration.items() if isinstance(v, float)),
          flush=True)
    source_samples = ddim_samples(args.source, args.num_samples, args.sample_steps)
    source_labels = scorer.labels(source_samples)
    source_scores = scorer.score(source_samples, source_labels)
    baselines = scorer.baselines(args.num_samples, source_labels)
    save_images(source_samples, out / "samples" / "source")

    stops = checkpoint_steps(args.steps, args.checkpoints)
    print(f"every run: {args.steps} steps (evaluated at {stops}), batch {args.batch_size}, lr {args.lr:g}, "
          f"EMA {args.ema:g}; {args.jobs} at a time", flush=True)
    seed0 = args.seeds[0]
    runs = {f"{method}_seed{seed}": (run_config(args, method, seed, target_dir, out / "runs" / f"{method}_seed{seed}"),
                                     stops) for seed in args.seeds for method in METHODS}
    for lam in args.sweep:  # λ_img = args.lambda_image is the main DomainStudio run of the first seed
        if lam != args.lambda_image:
            runs[f"sweep_image{lam:g}"] = (run_config(args, "domainstudio", seed0, target_dir,
                                                      out / "runs" / f"sweep_image{lam:g}", lambda_image=lam), [args.steps])
    per_seed = {m: {} for m in METHODS}
    final_samples, seconds, sweep, sweep_samples = {}, {m: {} for m in METHODS}, {}, {}
    for name, samples, sec in run_all(args, runs):
        scores = {s: scorer.score(x, source_labels) for s, x in samples.items()}
        print(f"{name}: trained in {sec:.0f} s", flush=True)
        for s, v in scores.items():
            print(f"   step {s}: copy rate {v['copy_rate']:.2f}, classes {v['class_coverage']}, class entropy "
                  f"{v['class_entropy_bits']:.2f}, same digit as source {v['correspondence']:.2f}, "
                  f"MMD² to target {v['mmd2_to_target']:.3f}", flush=True)
        if name.startswith("sweep_image"):
            sweep[name.removeprefix("sweep_image")] = scores[args.steps]
            sweep_samples[name.removeprefix("sweep_image")] = samples[args.steps]
            save_images(samples[args.steps], out / "samples" / name)
            continue
        method, seed = name.rsplit("_seed", 1)
        per_seed[method][int(seed)] = scores
        seconds[method][int(seed)] = sec
        if int(seed) == seed0:
            final_samples[method] = samples[stops[-1]]
            save_images(samples[stops[-1]], out / "samples" / method)
    per_seed = {m: dict(sorted(d.items())) for m, d in per_seed.items()}
    seconds = {m: [d[seed] for seed in sorted(d)] for m, d in seconds.items()}
    if args.sweep:
        sweep[f"{args.lambda_image:g}"] = per_seed["domainstudio"][seed0][stops[-1]]
    sweep = dict(sorted(sweep.items(), key=lambda kv: float(kv[0])))

    summary = {m: summarise(per_seed[m]) for m in METHODS}
    final = {m: summary[m][stops[-1]] for m in METHODS}
    comparison_figure(comparison_rows(args.lambda_image, train01, source_samples, final_samples, sweep_samples),
                      out / "comparison.png",
                      f"{args.steps} steps, lr {args.lr:g}, batch {args.batch_size}, EMA {args.ema:g}, seed {seed0}; "
                      f"every column: one noise (DDIM {args.sample_steps} steps, eta 0)")
    curves_figure(summary, baselines, out / "curves.png")
    if sweep:
        sweep_figure(sweep, per_seed["finetune"][seed0][stops[-1]], baselines, out / "sweep.png",
                     f"{args.steps} steps, seed {seed0}, λ_hf {args.lambda_hf:g}, λ_hfmse {args.lambda_hfmse:g}")
    loss_figure({m: read_metrics(out / "runs" / f"{m}_seed{seed0}") for m in METHODS}, out / "loss_curves.png")

    total = time.time() - t0
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "domainstudio_loss": {"image": args.lambda_image, "hf": args.lambda_hf, "hfmse": args.lambda_hfmse},
        "checkpoint_steps": stops,
        "training_images_digits": train_classes.tolist(),
        "calibration": scorer.calibration,
        "baselines": baselines,
        "source": source_scores,
        "per_seed": {m: {str(seed): {str(s): v for s, v in d.items()} for seed, d in per_seed[m].items()}
                     for m in METHODS},
        "summary": {m: {str(s): v for s, v in summary[m].items()} for m in METHODS},
        "sweep_lambda_image": sweep,
        "train_seconds": seconds,
        "total_seconds": total,
        "environment": {"torch": torch.__version__, "threads": 1 if args.jobs > 1 else torch.get_num_threads(),
                        "jobs": args.jobs,
                        "machine": platform.machine(), "python": platform.python_version()},
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))

    print(f"\nafter {args.steps} steps (mean ± std over seeds {args.seeds}; {args.num_samples} samples each, "
          "the same noise for every model):")
    print(format_table(final, source_scores, baselines, len(args.seeds)))
    print("copy rate: share of samples closer to a training image than 95% of fresh target images are; "
          "classes / class entropy:\ndigit classes drawn (of 10) and the entropy of their histogram "
          f"(max {np.log2(NUM_CLASSES):.2f} bits); same digit as source: the\ndigit equals the source model's for the "
          "same noise; target style: share classified as target style; MMD²: to fresh target images.")
    for lam, v in sweep.items():
        print(f"sweep λ_img {lam}: copy rate {v['copy_rate']:.2f}, class entropy {v['class_entropy_bits']:.2f}, "
              f"same digit {v['correspondence']:.2f}, target style {v['target_style_rate']:.2f}, "
              f"MMD² {v['mmd2_to_target']:.3f}")
    print(f"\nwrote {out}/comparison.png, curves.png, {'sweep.png, ' if sweep else ''}loss_curves.png, metrics.json, samples/ "
          f"in {total / 60:.1f} min")
    return 0


def _reexec_with_passive_openmp() -> None:
    """Re-run this command once with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set.

    OpenMP's default busy-waiting makes torch's CPU ops several times slower when the cores are
    shared with other processes; the policy must be set before torch starts, which ``import dsfast``
    already did. It changes no numbers.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        os.execve(sys.executable, [sys.executable, "-m", "dsfast.demo", *sys.argv[1:]], env)


if __name__ == "__main__":
    _reexec_with_passive_openmp()
    sys.exit(main())
