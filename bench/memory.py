"""Peak memory of ONE text-to-image DomainStudio training step on CPU: the official form vs dsfast's options,
and ``dsfast plan``'s prediction of each point.

    python -m bench.memory                      # the sweep (~10 min on 2 cores): rows + plots
    python -m bench.memory --report-only        # plots and the markdown table from the rows
    python -m bench.memory --preset sd3-small   # the same for a reduced-width SD3 (or flux-small: FLUX.1)
    python -m bench.memory --preset sdxl-small  # SDXL: the frozen-weight options (quantize, adamw8bit, no text; pip install dsfast[quant])

Model (``--preset``, a ``dsfast.plan.PRESETS`` entry, random weights saved with ``save_pretrained``; 6
instance images, 4 class images): ``sd-small`` (default), a Stable-Diffusion-architecture pipeline with
reduced width (the SD-1.5 UNet2DConditionModel / AutoencoderKL / CLIP text-encoder layer structure — 4 UNet
levels, 2 layers per block, cross-attention at 3 levels, an 8x VAE with 4 levels — at 1/10 of SD-1.5's UNet
width); ``sd3-small`` / ``flux-small``, the SD3 / FLUX.1 structures (joint blocks on 2x2 patches; double and
single blocks on 2x2-packed tokens; a 16-channel 8x VAE; CLIP + CLIP + T5 / CLIP + T5) at small width, trained
through their families with ``model.max_sequence_length`` set to the preset's T5 tokens; ``sdxl-small``, the
SDXL structure (3 UNet levels, linear-projection transformers, two CLIP encoders, text_time conditioning) at
widths 32/64/128. The official form
is written for the SD UNet only (the flow-matching families have no released DomainStudio step).

Forms (every one trains the whole UNet in float32 with AdamW on one process unless said otherwise):

``official``   written here, as the official text-to-image DomainStudio code computes a step: instance and
               class latents through the adapted UNet in one batch, both with gradients; the class-prompt
               half is the source side and stays in the graph; both x̃0 halves VAE-decoded with gradients
               (no checkpointing); L_simple + prior + λ_img·KL + λ_hf·KL_hf + λ_hfmse·hfMSE (dsfast's ops, so
               the two forms differ only in what is kept for backward); batch 4;
``dsfast*``    ``dsfast.train.train(config, overrides)`` with ``train.max_steps=1`` and the config keys (docs/config.md):
               ``dsfast`` (defaults: source = class-prompt half detached, adapted decode checkpointed,
               source decode without grad), ``+latent`` (``loss.space=latent``), ``+lora`` (``model.lora_rank=8``,
               ``loss.source=lora_off``), ``+ckpt`` (``train.gradient_checkpointing=true``), micro-batches
               (``train.micro_batch_size``: the two-pass scheme), and ``zero2-offload`` / ``zero3-offload`` on
               2 ranks (torchrun, gloo; per-rank peak, global batch split over the ranks);
``dsfast+lora+int8`` / ``+float8`` / ``+notext``   the LoRA run with ``model.quantize=int8`` / ``float8``
               (torchao weight-only, its CPU kernels) / ``model.drop_text_encoders=true``, and ``dsfast+adam8``
               (``train.optimizer=adamw8bit``, a full fine-tune), at 64 px and batch 4 (sdxl-small,
               flux-small) beside ``dsfast+lora`` and ``dsfast`` there: weights and optimizer states are most of
               that peak (nf4 needs a GPU).

Measured: ``peak_bytes`` = bytes of torch tensors alive when the step starts (parameters, gradients,
optimizer state, frozen models, cached latents: every tensor the garbage collector can reach, each storage
once) + the peak of torch's CPU allocations minus frees during the step (``torch.profiler``,
``profile_memory=True``). That is what ``torch.cuda.max_memory_allocated`` counts on a GPU, without the
allocator's cache; RSS would add the libraries (~1 GiB here) and glibc's retained heap, which say nothing about
a GPU. ``peak_rss_bytes`` (the step's VmHWM after resetting it through /proc/self/clear_refs) is in the rows
too, for reference. The step is ``run_step`` of the trainer, wrapped here; its first call also allocates the
AdamW state, as a first step on a GPU does.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTANCE_IMAGES, CLASS_IMAGES = 6, 4  # the images of every measured run
RESULTS = ROOT / "bench" / "results"


# ----------------------------------------------------------------------------------------- measuring
def live_tensor_bytes() -> int:
    """Bytes of every torch storage reachable from a Python tensor object (each storage once)."""
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            try:  # a wrapper tensor subclass (torchao's quantized weights) has no storage: its inner tensors count
                storage = obj.untyped_storage()
                key = storage.data_ptr()
            except (RuntimeError, NotImplementedError):
                continue
            if key and key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def _rss_peak_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _rss_peak() -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def measure(fn):
    """``(fn(), info)``: live bytes before, peak extra torch allocations during ``fn``, and the two summed."""
    from bench.kernels import cpu_peak_extra_bytes

    gc.collect()
    before = live_tensor_bytes()
    _rss_peak_reset()
    box = {}

    def call():
        box["out"] = fn()

    extra = cpu_peak_extra_bytes(call)
    return box["out"], {"live_before_bytes": before, "step_extra_bytes": extra, "peak_bytes": before + extra,
                        "peak_rss_bytes": _rss_peak()}


# ----------------------------------------------------------------------------------------- assets
def make_assets(root: Path, preset: str = "sd-small") -> dict:
    """The preset's pipeline (reduced width), 6 instance and 4 class images, under ``root``."""
    from dsfast.plan import build_pipeline
    from dsfast.train.testing import write_images

    model = root / ("model" if preset == "sd-small" else f"model-{preset}")
    if not (model / "model_index.json").is_file():
        build_pipeline(preset, model)
    write_images(root / "instance", INSTANCE_IMAGES, size=256, seed=1)
    write_images(root / "class", CLASS_IMAGES, size=256, seed=2)
    return {"model": str(model), "instance": str(root / "instance"), "class": str(root / "class"), "preset": preset}


def run_config(assets: dict, out: Path, resolution: int, batch: int) -> dict:
    from dsfast.plan import PRESETS

    model = {"pretrained": assets["model"]}
    t5_len = PRESETS[assets.get("preset", "sd-small")].get("t5_len")
    if t5_len:
        model["max_sequence_length"] = t5_len
    return {
        "method": "domainstudio",
        "model": model,
        "data": {"instance_dir": assets["instance"], "class_dir": assets["class"], "num_class_images": CLASS_IMAGES,
                 "instance_prompt": "a sks dog", "class_prompt": "a dog", "resolution": resolution},
        "train": {"max_steps": 1, "batch_size": batch, "seed": 0},
        "deepspeed": {"zero_stage": 0},
        "output_dir": str(out),
        "checkpoint_every": 0,
        "sample_every": 0,
    }


# The options, as config overrides (docs/config.md) (``None``: the official form written here).
OPTIONS = {
    "official": None,
    "dsfast": [],
    "dsfast+latent": ["loss.space=latent"],
    "dsfast+pixel": ["loss.space=pixel"],
    "dsfast+lora": ["model.lora_rank=8", "loss.source=lora_off"],
    "dsfast+ckpt": ["train.gradient_checkpointing=true"],
    "dsfast+lora+ckpt": ["model.lora_rank=8", "loss.source=lora_off", "train.gradient_checkpointing=true"],
    "dsfast+latent+lora+ckpt": ["loss.space=latent", "model.lora_rank=8", "loss.source=lora_off",
                                "train.gradient_checkpointing=true"],
    "dsfast+lora+int8": ["model.lora_rank=8", "loss.source=lora_off", "model.quantize=int8"],
    "dsfast+lora+float8": ["model.lora_rank=8", "loss.source=lora_off", "model.quantize=float8"],
    "dsfast+adam8": ["train.optimizer=adamw8bit"],
    "dsfast+lora+notext": ["model.lora_rank=8", "loss.source=lora_off", "model.drop_text_encoders=true"],
    "zero2-offload": ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"],
    "zero3-offload": ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu", "deepspeed.offload_param=cpu"],
}
RANKS = {"zero2-offload": 2, "zero3-offload": 2}
# the frozen-weight options and the run each changes, measured at 64 px and batch 4 where the weights are most of
# the peak (nf4: bitsandbytes' 4-bit layers need a GPU); 8-bit AdamW on a full fine-tune (a small model's LoRA
# tensors are under torchao's 4096 elements: float32 states)
FROZEN_TERMS = {"dsfast+lora+int8": "dsfast+lora", "dsfast+lora+float8": "dsfast+lora", "dsfast+adam8": "dsfast",
                "dsfast+lora+notext": "dsfast+lora"}


def worker(spec: dict) -> None:
    """One measured step in this process (``spec``: option, resolution, batch, micro, assets, out)."""
    import torch

    torch.manual_seed(0)
    option, res, batch = spec["option"], spec["resolution"], spec["batch"]
    rank = int(os.environ.get("RANK", "0"))
    if OPTIONS[option] is None:
        info = official_step(spec["assets"], res, batch)
    else:
        import dsfast.train.engine as trainer
        from dsfast.train import train

        inner = trainer.run_step
        found = {}

        def wrapped(*args, **kwargs):
            out, found["info"] = measure(lambda: inner(*args, **kwargs))
            return out

        trainer.run_step = wrapped
        over = list(OPTIONS[option])
        if spec.get("micro"):
            over.append(f"train.micro_batch_size={spec['micro']}")
        with tempfile.TemporaryDirectory() as out:
            train(run_config(spec["assets"], Path(out) / "run", res, batch), over)
        info = found["info"]
    Path(spec["result"] + f".rank{rank}").write_text(json.dumps(info))


def official_step(assets: dict, resolution: int, batch: int) -> dict:
    """The official text-to-image DomainStudio step (see the module docstring), measured."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from dsfast import ops
    from dsfast.train.data import load_images
    from dsfast.train.diffusion import predicted_x0

    path = assets["model"]
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").train()
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    sch = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-6)
    scale = vae.config.scaling_factor

    def embed(prompt):
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids)[0].expand(batch, -1, -1)

    with torch.no_grad():
        x_i = load_images(assets["instance"], resolution)[torch.arange(batch) % INSTANCE_IMAGES]
        x_c = load_images(assets["class"], resolution, what="data.class_dir")[torch.arange(batch) % CLASS_IMAGES]
        z_i = vae.encode(x_i).latent_dist.mean * scale
        z_c = vae.encode(x_c).latent_dist.mean * scale
        emb_i, emb_c = embed("a sks dog"), embed("a dog")

    def step():
        t = torch.randint(0, sch.config.num_train_timesteps, (batch,))
        n_i, n_c = torch.randn_like(z_i), torch.randn_like(z_c)
        zt_i, zt_c = sch.add_noise(z_i, n_i, t), sch.add_noise(z_c, n_c, t)
        pred = unet(torch.cat([zt_i, zt_c]), torch.cat([t, t]), encoder_hidden_states=torch.cat([emb_i, emb_c])).sample
        pred_i, pred_c = pred.chunk(2)
        img_ada = vae.decode(predicted_x0(sch, pred_i, zt_i, t) / scale).sample  # with gradients
        img_src = vae.decode(predicted_x0(sch, pred_c, zt_c, t) / scale).sample  # source side, with gradients
        loss = (F.mse_loss(pred_i, n_i) + F.mse_loss(pred_c, n_c)
                + 100.0 * ops.pairwise_similarity_kl(img_src, img_ada)
                + 100.0 * ops.hf_pairwise_similarity_kl(img_src, img_ada)
                + 0.1 * ops.hf_mse(img_ada, x_i))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _, info = measure(step)
    return info


# ----------------------------------------------------------------------------------------- sweep
def cases(quick: bool, preset: str = "sd-small") -> list[dict]:
    """(option, resolution, global batch, micro-batch) points, most important first."""
    if preset == "sdxl-small":  # the frozen-weight terms against the LoRA run they change
        return [dict(option=o, resolution=64, batch=4) for o in ("dsfast", "dsfast+lora", *FROZEN_TERMS)][:2 if quick else None]
    if preset != "sd-small":  # the transformer families: loss.space=latent by default, no official form
        out = [dict(option=o, resolution=128, batch=4) for o in ("dsfast", "dsfast+lora")]
        out += [dict(option="dsfast", resolution=128, batch=16, micro=2), dict(option="dsfast+ckpt", resolution=128,
                                                                             batch=4),
                dict(option="dsfast+pixel", resolution=128, batch=4),
                dict(option="dsfast+lora+ckpt", resolution=128, batch=16, micro=2)]
        out += [dict(option=o, resolution=256, batch=4) for o in ("dsfast", "dsfast+lora")]
        out += [dict(option="dsfast", resolution=256, batch=16, micro=1)]
        out += [dict(option=o, resolution=128, batch=16, micro=2) for o in RANKS]
        out += [dict(option=o, resolution=64, batch=4) for o in ("dsfast", "dsfast+lora", *FROZEN_TERMS)]
        return out[:2] if quick else out
    combined = "dsfast+latent+lora+ckpt"
    out = [dict(option="official", resolution=128, batch=4), dict(option="dsfast", resolution=128, batch=16, micro=2),
           dict(option="dsfast", resolution=128, batch=4), dict(option="dsfast", resolution=128, batch=32, micro=2)]
    for res in (64, 192):
        out += [dict(option="official", resolution=res, batch=4), dict(option="dsfast", resolution=res, batch=16, micro=2)]
    out += [dict(option=o, resolution=128, batch=4) for o in ("dsfast+latent", "dsfast+lora", "dsfast+ckpt")]
    out += [dict(option=combined, resolution=128, batch=16, micro=2)]
    out += [dict(option=o, resolution=res, batch=16, micro=2) for res in (128, 64) for o in RANKS]
    out += [dict(option="dsfast", resolution=128, batch=16, micro=1), dict(option="official", resolution=128, batch=8)]
    for res in (64, 192):
        out += [dict(option="dsfast", resolution=res, batch=4), dict(option=combined, resolution=res, batch=16, micro=2)]
    out += [dict(option="official", resolution=256, batch=4), dict(option="dsfast", resolution=256, batch=16, micro=2)]
    return out[:2] if quick else out


def _key(case: dict) -> tuple:
    return case["option"], case["resolution"], case["batch"], case.get("micro")


def run_case(case: dict, assets: dict, tmp: Path) -> dict:
    spec = dict(case, assets=assets, result=str(tmp / "result.json"))
    ranks = RANKS.get(case["option"], 1)
    from dsfast._extension import cache_dir

    # DeepSpeed's CPU ops compile on first use; a folder of this environment's own, so that no other
    # environment's rebuild (and its lock) stalls a measurement
    ds_ops = cache_dir(False).with_name(cache_dir(False).name + "-deepspeed-ops")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=str(ds_ops), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ["-m", "bench.memory", "--worker", json.dumps(spec)]
    if ranks == 1:
        cmd = [sys.executable, *code]
    else:
        from dsfast.train.distributed import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), *code]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    from bench.run import cpu_model

    row = dict(case, ranks=ranks, cpu=cpu_model(), wall_s=round(time.perf_counter() - t0, 1))
    files = sorted(tmp.glob("result.json.rank*"))
    if p.returncode != 0 or not files:
        return dict(row, status="error", reason=p.stderr.strip().splitlines()[-1][:300] if p.stderr else "")
    infos = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    best = max(infos, key=lambda i: i["peak_bytes"])  # per rank: the largest
    return dict(row, status="ok", **best)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Peak memory of one training step on CPU, per memory option.")
    ap.add_argument("--quick", action="store_true", help="two rows (smoke)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated options to run")
    ap.add_argument("--redo", action="store_true", help="also run the points that already have a row")
    ap.add_argument("--results", default=None,
                    help="folder of the rows, table and plot (default: bench/results/<this CPU>); the bytes counted "
                         "do not depend on the CPU model, so rows measured elsewhere may join a folder (each row "
                         "names its CPU)")
    ap.add_argument("--preset", default="sd-small", choices=PRESETS,
                    help="the reduced-width model (dsfast.plan.PRESETS; default sd-small)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one point, in this process
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    from bench.run import cpu_model, slugify

    out_dir = Path(args.results) if args.results else RESULTS / slugify(cpu_model())
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / f"memory-train-cpu{_suffix(args.preset, '-')}.jsonl"
    if not args.report_only:
        work = Path(tempfile.mkdtemp(prefix="dsfast-mem-"))
        assets = make_assets(work, args.preset)
        todo = cases(args.quick, args.preset)
        if args.only:
            todo = [c for c in todo if c["option"] in args.only.split(",")]
        if not args.redo and rows_path.is_file():
            done = {_key(r) for r in load_rows(rows_path)}
            todo = [c for c in todo if _key(c) not in done]
        with open(rows_path, "a") as f:
            for case in todo:
                row = run_case(case, assets, work)
                print(json.dumps({k: row.get(k) for k in ("option", "resolution", "batch", "micro", "status",
                                                           "peak_bytes", "wall_s", "reason")}), flush=True)
                f.write(json.dumps(row) + "\n")
                f.flush()
    report(rows_path, out_dir, args.preset)
    return 0


PRESETS = ("sd-small", "sd3-small", "flux-small", "sdxl-small")  # the reduced-width models measured here


def _suffix(preset: str, sep: str) -> str:
    """File-name suffix of a preset's rows, table and plot (none for sd-small, the first one measured)."""
    return "" if preset == "sd-small" else sep + preset


def predicted_bytes(planner, row: dict) -> int:
    """``dsfast plan``'s prediction for a measured point: a CPU run holds device and host memory in one place
    (``total``), and the measured step was the run's first (the AdamW moments come in its optimizer.step())."""
    from dsfast.plan import OPTIONS as PLAN_OPTIONS
    from dsfast.plan import Option

    micro = row.get("micro") or row["batch"] // row.get("ranks", RANKS.get(row["option"], 1))
    option = Option(**{**vars(PLAN_OPTIONS[row["option"]]), "micro_batch": micro})
    return planner.predict(option, row["batch"], row["resolution"], first_step=True, images=INSTANCE_IMAGES,
                           class_images=CLASS_IMAGES)["total"]


def load_rows(path: Path) -> list[dict]:
    """The latest ok row per (option, resolution, batch, micro)."""
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("status") == "ok":
            rows[_key(r)] = r
    return list(rows.values())


def _mib(n: int) -> str:
    mib = n / 2 ** 20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.1f}"


def report(rows_path: Path, out_dir: Path, preset: str = "sd-small") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(rows_path)
    mib = 2 ** 20
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for opt in OPTIONS:
        pts = sorted((r["batch"], r["peak_bytes"] / mib) for r in rows if r["option"] == opt and r["resolution"] == 128
                     and (r.get("micro") or 0) <= 2)
        if pts:
            ax1.plot(*zip(*pts), "o-", label=opt)
        by_res = {}
        for r in rows:
            if r["option"] == opt and r["batch"] == (4 if opt == "official" else 16) and r.get("micro") in (None, 2):
                by_res[r["resolution"]] = r["peak_bytes"] / mib
        if by_res:
            ax2.plot(*zip(*sorted(by_res.items())), "o-", label=f"{opt} (batch {4 if opt == 'official' else 16})")
    ax1.set(xlabel="global batch", ylabel="peak MiB (one step)", title=f"CPU: memory vs global batch, 128 px ({preset})")
    ax2.set(xlabel="resolution (px)", ylabel="peak MiB (one step)", title=f"CPU: memory vs resolution ({preset})")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"memory_train{_suffix(preset, '_')}.png", dpi=110)
    from dsfast.plan import PRESETS as PLAN_PRESETS
    from dsfast.plan import Planner

    planner = Planner(PLAN_PRESETS[preset])
    official = {r["resolution"]: r["peak_bytes"] for r in rows if r["option"] == "official" and r["batch"] == 4}
    ratio_col = " vs official batch 4 |" if official else ""
    lines = [f"| option | resolution | global batch | micro-batch | ranks | measured peak MiB |{ratio_col} "
             "`dsfast plan` MiB | plan error |", "|---|---|---|---|---|---|---|---|" + ("---|" if official else "")]
    errors = {1: [], 2: []}  # by ranks
    for r in sorted(rows, key=lambda r: (r["resolution"], list(OPTIONS).index(r["option"]), r["batch"],
                                         r.get("micro") or 0)):
        ref = official.get(r["resolution"])
        ratio = (f" {r['peak_bytes'] / ref:.2f}x |" if ref else " |") if official else ""
        micro = r.get("micro") or r["batch"] // r["ranks"]
        predicted = predicted_bytes(planner, r)
        err = predicted / r["peak_bytes"] - 1
        errors[min(r["ranks"], 2)].append(abs(err))
        lines.append(f"| {r['option']} | {r['resolution']} | {r['batch']} | {micro} | {r['ranks']} "
                     f"| {_mib(r['peak_bytes'])} |{ratio} {_mib(predicted)} | {err:+.1%} |")
    summary = [f"{what}: mean |error| {sum(e) / len(e):.1%}, max {max(e):.1%} over {len(e)} points"
               for what, e in (("one process", errors[1]), ("ZeRO on 2 ranks", errors[2])) if e]
    if summary:
        lines.append(f"\n`dsfast plan` vs measured ({preset}), {'; '.join(summary)} (none used to fit it: the "
                     "plan's probe runs on the meta device).")
    (out_dir / f"memory_train{_suffix(preset, '_')}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
