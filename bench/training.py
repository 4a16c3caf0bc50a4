"""Training-step benchmark: one DomainStudio step on a diffusers UNet, official form vs dsfast.

A step: draw t and noise, ``x_t`` from the batch; the frozen source UNet and the adapted UNet see the
same ``x_t``; ``x̃0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t`` for each; loss = ``L_simple`` + DomainStudio regularisers
(λ_img = λ_hf = 4, λ_hfmse = 1) on the x̃0 predictions; backward; AdamW step.

Variants
--------
``official``     the official code's form: the source UNet's parameters keep ``requires_grad`` and its
                 forward runs with autograd on (its activations stay alive until the step ends), the
                 losses are the official eager forms (``reference.official_*``: stride-2 convolutions, the
                 Python double loop, ``KLDivLoss``);
``dsfast``       source forward under ``torch.no_grad`` with frozen parameters, ``dsfast.losses.DomainStudioLoss``
                 (``backend="auto"``: fused kernels);
``dsfast+ckpt``  (GPU) as ``dsfast`` with gradient checkpointing on the adapted UNet.

Models (random weights; weights cannot be downloaded here and do not change the cost)
------
``tiny``   ``UNet2DModel`` 0.6M parameters, 3×32×32 pixels (CPU suite);
``adm256`` ``UNet2DModel`` shaped like ADM/guided-diffusion 256×256 unconditional (channels 256·(1,1,2,2,4,4),
           2 res blocks, attention at 32/16/8, 64-channel heads), 3×256×256 pixels;
``sd15``   ``UNet2DConditionModel`` with the Stable Diffusion 1.5 configuration, 4×64×64 latents, 77×768 text;
``sdxl``   ``UNet2DConditionModel`` with the SDXL base configuration, 4×128×128 latents, 77×2048 text plus
           pooled text embeddings and time ids. For sd15/sdxl the losses run on the latent x̃0 (no VAE);
``demo``   the ``UNet2DModel`` of ``make demo`` (``assets/source_model/unet``'s configuration), 1×16×16, batch 10;
``sd-small`` bench/memory.py's reduced-width SD-1.5 UNet (``dsfast.plan.PRESETS``), its 4×16×16 latents of
           128 px, 16×64 text, batch 4; losses on the latents.

The split (``step(batch, parts)``, :func:`time_split`, ``python -m bench.run --suite cpu --split-only``): one step
timed in the parts of :data:`PARTS`: source forward, adapted forward, the DomainStudio loss's forward and its
backward (to the x̃0 predictions), the models' backward, AdamW, and the rest (draws, x_t, x̃0, L_simple), with
unsplit steps timed beside it; :func:`estimate_h100` (``python -m bench.training --h100-estimate``) estimates
the same parts for SD-1.5 on an H100 from counted FLOPs, launches and bytes.

On GPU: adapted UNet in float32 with bf16 autocast, source UNet in bf16, fused AdamW. Measured: seconds
per step (median of timed steps after warm-up), peak memory (GPU: ``max_memory_allocated`` over the timed
steps, everything included; CPU: peak extra bytes of torch's CPU allocator during one step, via
``torch.profiler``), and on GPU the largest micro-batch that fits (doubling, then bisection).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bench import peers
from dsfast.plan import PRESETS

MODELS = {
    "tiny": dict(
        cls="UNet2DModel", latent=(3, 32, 32), batch=8,
        config=dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)),
    # architectures shared with `dsfast plan` (dsfast/plan.py: written from the published configurations)
    "adm256": dict(cls="UNet2DModel", latent=(3, 256, 256), batch=8, config=PRESETS["adm256"]["unet"]),
    "sd15": dict(cls="UNet2DConditionModel", latent=(4, 64, 64), batch=4, text=(77, 768),
                 config=PRESETS["sd15"]["unet"]),
    "sdxl": dict(cls="UNet2DConditionModel", latent=(4, 128, 128), batch=4, text=(77, 2048), sdxl=True,
                 config=PRESETS["sdxl"]["unet"]),
    # the source model of `make demo` (its committed config; 1x16x16 digits, the demo's batch of 10)
    "demo": dict(cls="UNet2DModel", latent=(1, 16, 16), batch=10, config_dir="assets/source_model/unet"),
    # the reduced-width SD-1.5 UNet of bench/memory.py at its resolution's latents (128 px / 8), batch 4
    "sd-small": dict(cls="UNet2DConditionModel", latent=(4, PRESETS["sd-small"]["resolution"] // 8,
                                                         PRESETS["sd-small"]["resolution"] // 8), batch=4,
                     text=(PRESETS["sd-small"]["text_len"], PRESETS["sd-small"]["unet"]["cross_attention_dim"]),
                     config=PRESETS["sd-small"]["unet"]),
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("official", "dsfast", "dsfast+ckpt")
# The parts of a split step (DomainStudioStep.step with ``parts``), in the order they run; "rest": the draws of
# t and the noise, x_t, the x̃0 formulas and L_simple's forward.
PARTS = ("source_fwd", "adapted_fwd", "loss_fwd", "loss_bwd", "model_bwd", "optimizer", "rest")
PART_LABELS = {"source_fwd": "source fwd", "adapted_fwd": "adapted fwd", "loss_fwd": "loss fwd",
               "loss_bwd": "loss bwd", "model_bwd": "model bwd", "optimizer": "AdamW", "rest": "rest"}
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


class _Laps:
    """``lap(part)`` adds the clock's advance since the previous lap (or since it was made) to ``parts[part]``,
    after synchronising the device; does nothing when ``parts`` is None (an unsplit step)."""

    def __init__(self, parts: dict | None, sync, clock):
        self.parts, self.sync, self.clock = parts, sync, clock
        if parts is not None:
            sync()
            self.last = clock()

    def __call__(self, part: str):
        if self.parts is None:
            return
        self.sync()
        now = self.clock()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now


def _alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class DomainStudioStep:
    """Models, optimiser and a ``step(batch)`` for one (model, variant, device)."""

    def __init__(self, model: str, variant: str, device: torch.device, seed: int = 0, latent=None,
                 clock="wall"):
        import diffusers

        spec = dict(MODELS[model])
        if latent is not None:
            spec["latent"] = latent
        self.spec, self.variant, self.device = spec, variant, device
        # what the timings and the split read: a name of CLOCKS, or any counter (e.g. FLOPs counted so far)
        self.clock = CLOCKS[clock] if isinstance(clock, str) else clock
        self.cuda = device.type == "cuda"
        torch.manual_seed(seed)
        cls = getattr(diffusers, spec["cls"])
        config = spec["config"] if "config" in spec else cls.load_config(os.path.join(ROOT, spec["config_dir"]))
        with torch.device(device):
            self.adapted = cls.from_config(config)
        self.adapted.train()
        if variant.endswith("+ckpt"):
            self.adapted.enable_gradient_checkpointing()
        self.source = copy.deepcopy(self.adapted).eval()
        if self.cuda:
            self.source.to(torch.bfloat16)
        self.source.requires_grad_(variant == "official")  # official: source params stay trainable-looking
        if hasattr(self.source, "disable_gradient_checkpointing"):
            self.source.disable_gradient_checkpointing()
        self.opt = torch.optim.AdamW(self.adapted.parameters(), lr=1e-4, **({"fused": True} if self.cuda else {}))
        self.ab = _alphas_cumprod().to(device)
        if variant != "official":
            from dsfast.losses import DomainStudioLoss

            li, lh, lm = peers.LAMBDAS
            self.loss = DomainStudioLoss(lambda_img=li, lambda_hf=lh, lambda_hfmse=lm)
        self.params = sum(p.numel() for p in self.adapted.parameters())

    def make_batch(self, n: int, seed: int = 0) -> dict:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        c, h, w = self.spec["latent"]
        batch = {"x0": torch.randn(n, c, h, w, generator=gen).to(self.device)}
        if "text" in self.spec:
            batch["text"] = torch.randn(n, *self.spec["text"], generator=gen).to(self.device)
        if self.spec.get("sdxl"):
            batch["added"] = {"text_embeds": torch.randn(n, 1280, generator=gen).to(self.device),
                              "time_ids": torch.randn(n, 6, generator=gen).to(self.device)}
        return batch

    def _forward(self, model, x_t, t, batch, dtype):
        kwargs = {}
        if "text" in batch:
            kwargs["encoder_hidden_states"] = batch["text"].to(dtype)
        if "added" in batch:
            kwargs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in batch["added"].items()}
        return model(x_t.to(dtype), t, **kwargs).sample.float()

    def _domainstudio(self, x0_src, x0_ada, x0):
        if self.variant == "official":
            return peers._official_domainstudio(x0_src, x0_ada, x0)
        return self.loss(x0_src, x0_ada, x0).total

    def step(self, batch: dict, parts: dict | None = None) -> torch.Tensor:
        """One training step; the loss (detached). With ``parts`` (a dict) the step is split: the clock's advance
        over each part of :data:`PARTS` (seconds, or what a counter clock counts) is added to ``parts[part]``,
        the device synchronised at each boundary, and the backward runs as two calls with the same gradients
        as the one ``loss.backward()``: the DomainStudio loss's backward down to leaves holding the x̃0
        predictions, then the models' backward from those gradients (with ``L_simple``'s)."""
        lap = _Laps(parts, self.sync, self.clock)
        x0 = batch["x0"]
        n = x0.shape[0]
        t = torch.randint(0, len(self.ab), (n,), device=self.device)
        noise = torch.randn_like(x0)
        ab = self.ab[t].view(n, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)
        src_dtype = torch.bfloat16 if self.cuda else torch.float32
        lap("rest")
        with autocast:
            if self.variant == "official":
                eps_src = self._forward(self.source, x_t, t, batch, src_dtype)
            else:
                with torch.no_grad():
                    eps_src = self._forward(self.source, x_t, t, batch, src_dtype)
            lap("source_fwd")
            eps_ada = self._forward(self.adapted, x_t, t, batch, torch.float32)
            lap("adapted_fwd")
        x0_src = (x_t - (1 - ab).sqrt() * eps_src) / ab.sqrt()
        x0_ada = (x_t - (1 - ab).sqrt() * eps_ada) / ab.sqrt()
        simple = F.mse_loss(eps_ada, noise)
        lap("rest")
        if parts is None:
            loss = simple + self._domainstudio(x0_src, x0_ada, x0)
            loss.backward()
        else:
            leaves = [x.detach().requires_grad_(x.requires_grad) for x in (x0_src, x0_ada)]
            regulariser = self._domainstudio(*leaves, x0)
            lap("loss_fwd")
            regulariser.backward()
            lap("loss_bwd")
            differentiated = [(x, leaf.grad) for x, leaf in zip((x0_src, x0_ada), leaves) if leaf.grad is not None]
            torch.autograd.backward([simple] + [x for x, _ in differentiated], [None] + [g for _, g in differentiated])
            lap("model_bwd")
            loss = simple.detach() + regulariser.detach()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        lap("optimizer")
        return loss.detach()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_steps(self, n: int, warmup: int, steps: int) -> dict:
        batch = self.make_batch(n)
        for _ in range(warmup):
            self.step(batch)
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(steps):
            t0 = self.clock()
            self.step(batch)
            self.sync()
            times.append(self.clock() - t0)
        out = {"s_per_step": statistics.median(times), "s_per_step_min": min(times), "steps": steps}
        if self.cuda:
            out["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["memory_method"] = "cuda max_memory_allocated over the timed steps (everything)"
        else:
            from bench.kernels import cpu_peak_extra_bytes

            out["peak_bytes"] = cpu_peak_extra_bytes(lambda: self.step(batch))
            out["memory_method"] = "torch.profiler CPU allocator, extra during one step"
        return out

    def fits(self, n: int) -> bool:
        try:
            self.step(self.make_batch(n))
            self.sync()
            return True
        except torch.cuda.OutOfMemoryError:
            pass
        # outside the except block, so the traceback's frames (and their tensors) are gone
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return False

    def largest_batch(self, start: int, cap: int, deadline: float) -> tuple[int | None, str]:
        """Largest micro-batch that runs a step (doubling from ``start``, then bisection)."""
        ok, bad = None, None
        n = start
        while n <= cap:
            if time.monotonic() > deadline:
                return ok, "stopped by the time budget"
            if self.fits(n):
                ok, n = n, n * 2
            else:
                bad = n
                break
        if bad is None:
            return ok, f"no OOM up to the cap {cap}"
        if ok is None:
            if start > 3 and self.fits(3):  # the pairwise losses need N >= 3
                return 3, f"first OOM at {start}"
            return None, f"OOM at {start}"
        for _ in range(4):
            if bad - ok <= max(1, ok // 8) or time.monotonic() > deadline:
                break
            mid = (ok + bad) // 2
            if self.fits(mid):
                ok = mid
            else:
                bad = mid
        return ok, f"first OOM at {bad}"


def run(models, variants, device, *, base_row: dict, emit, deadline: float, warmup: int = 2, steps: int = 5,
        batch: int | None = None, latent=None, search: bool = False, log=print):
    for model in models:
        for variant in variants:
            if variant.endswith("+ckpt") and device.type != "cuda":
                continue
            n = batch or MODELS[model]["batch"]
            row = dict(base_row, model=model, variant=variant, batch=n,
                       latent="x".join(map(str, latent or MODELS[model]["latent"])))
            if time.monotonic() > deadline:
                emit(dict(row, status="skipped", reason="time budget of the suite exhausted"))
                continue
            bench = None
            try:
                t0 = time.perf_counter()
                bench = DomainStudioStep(model, variant, device, latent=latent)
                row["params"] = bench.params
                row["build_s"] = time.perf_counter() - t0
                row.update(bench.time_steps(n, warmup, steps), status="ok")
                if search and device.type == "cuda":
                    best, note = bench.largest_batch(4, 256, deadline)
                    row["max_micro_batch"], row["max_micro_batch_note"] = best, note
                log(f"  train {model:7s} {variant:12s} batch {n:3d}: {row['s_per_step'] * 1e3:9.1f} ms/step, "
                    f"peak {row['peak_bytes'] / 2**20:9.1f} MiB"
                    + (f", max micro-batch {row.get('max_micro_batch')} ({row.get('max_micro_batch_note')})" if search else ""))
            except torch.cuda.OutOfMemoryError as err:
                row.update(status="skipped", reason=f"out of memory: {str(err).splitlines()[0][:120]}")
                log(f"  train {model} {variant}: OOM")
            except Exception as err:
                row.update(status="error", reason=f"{type(err).__name__}: {str(err)[:200]}")
                log(f"  train {model} {variant}: {row['reason']}")
            emit(row)
            del bench
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def time_split(benches: dict, n: int, warmup: int, steps: int) -> dict:
    """Each variant's step split into :data:`PARTS`: per part the median over ``steps`` split steps after
    ``warmup``, ``parts_sum_s`` their sum, and ``s_per_step`` the median over as many unsplit steps (one
    ``loss.backward()``, no synchronisation inside). ``benches``: {variant: DomainStudioStep} of one model; their
    steps are interleaved (split, unsplit, next variant), so the machine's other load falls on all of them alike."""
    batches = {v: b.make_batch(n) for v, b in benches.items()}
    for _ in range(warmup):
        for v, b in benches.items():
            b.step(batches[v])
            b.step(batches[v], {})
    splits = {v: [] for v in benches}
    whole = {v: [] for v in benches}
    for _ in range(steps):
        for v, b in benches.items():
            parts = {}
            b.step(batches[v], parts)
            splits[v].append(parts)
            b.sync()
            t0 = b.clock()
            b.step(batches[v])
            b.sync()
            whole[v].append(b.clock() - t0)
    out = {}
    for v in benches:
        row = {f"{p}_s": statistics.median(s[p] for s in splits[v]) for p in PARTS}
        row["parts_sum_s"] = sum(row[f"{p}_s"] for p in PARTS)
        row["s_per_step"] = statistics.median(whole[v])
        out[v] = row
    return out


def run_split(models, device, *, base_row: dict, emit, deadline: float, warmup: int = 2, steps: int = 5,
              batch: int | None = None, latent=None, clock: str = "wall", log=print):
    """The split of one step (:func:`time_split`) of ``official`` and ``dsfast`` side by side, per model: one row
    per (model, variant) with the seconds of each part, and each part's share of their sum in percent; a model
    not started by ``deadline`` (``time.monotonic()``) gets rows marked skipped."""
    for model in models:
        n = batch or MODELS[model]["batch"]
        if time.monotonic() > deadline:
            for variant in ("official", "dsfast"):
                emit(dict(base_row, model=model, variant=variant, batch=n, status="skipped",
                          reason="time budget of the suite exhausted"))
            continue
        benches = {v: DomainStudioStep(model, v, device, latent=latent, clock=clock) for v in ("official", "dsfast")}
        found = time_split(benches, n, warmup, steps)
        for variant, parts in found.items():
            row = dict(base_row, model=model, variant=variant, batch=n, clock=clock,
                       latent="x".join(map(str, latent or MODELS[model]["latent"])),
                       params=benches[variant].params, warmup=warmup, steps=steps, status="ok", **parts)
            row.update({f"{p}_pct": 100 * parts[f"{p}_s"] / parts["parts_sum_s"] for p in PARTS})
            emit(row)
            log(f"  split {model:8s} {variant:8s} batch {n:3d}: {parts['s_per_step'] * 1e3:8.1f} ms/step, parts "
                + ", ".join(f"{p} {row[f'{p}_pct']:.1f}%" for p in PARTS))
        del benches
        gc.collect()


# -- the split estimated for an H100 (no GPU: counted on the meta device) --------------------------------------
H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100 SXM
UTILISATION = 0.4  # the share of that peak assumed for the UNet's forward and backward
ADAMW_BYTES_PER_PARAM = 28  # fused AdamW, float32: parameter, gradient and both moments read, three written


def _counted_split(bench: DomainStudioStep, n: int, counter, read) -> dict:
    """The split of one meta-device step of ``bench`` with ``read(counter)`` as its clock, ``counter`` active."""
    parts = {}
    batch = bench.make_batch(n)
    with counter:
        bench.clock = lambda: read(counter)
        bench.step(batch, parts)
    return parts


def estimate_h100(ns=(4, 8, 16), model: str = "sd15", launches_json: str | None = None) -> list[dict]:
    """The split of one step of ``model`` estimated for an H100 (an estimate, not a timing), per batch in ``ns``
    and variant, in seconds per part.

    The UNet's forward and backward: their FLOPs (``FlopCounterMode`` over the step on the meta device; the
    official and dsfast steps run the same model FLOPs) at ``UTILISATION`` of ``H100_BF16_FLOPS``. Every other
    part: its GPU launches at bench.static's ``LAUNCH_US`` each plus its bytes at its ``HBM_BYTES_PER_S``, added
    (host and device time in series; where the host runs ahead of the device, during the UNet's kernels, part
    of the launch time hides). Launches and bytes are counted on the official step (``LaunchCounter``:
    aten ops that are kernels on a GPU; ``static.Traffic``: bytes each op reads and writes), except dsfast's
    loss: the static report's launches per ``domainstudio_loss`` call (the most over its shapes; the Triton
    backend), moving 3 batches of x̃0 each way. The optimizer: fused AdamW, ``ADAMW_BYTES_PER_PARAM`` bytes
    per parameter."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench import static
    from dsfast.kernels._launch_count import LaunchCounter

    path = launches_json or os.path.join(ROOT, "bench", "results", "static-sm90", "launches.json")
    with open(path) as f:
        calls = json.load(f)
    fused = {p: max(len(call["loss_launches"][p]["triton"]) + len(call["loss_launches"][p]["torch"]) for call in calls)
             for p in ("forward", "backward")}
    rate = UTILISATION * H100_BF16_FLOPS
    bench = DomainStudioStep(model, "official", torch.device("meta"))
    c, h, w = bench.spec["latent"]
    rows = []
    for n in ns:
        flops = _counted_split(bench, n, FlopCounterMode(display=False), lambda k: k.get_total_flops())
        launches = _counted_split(bench, n, LaunchCounter(), lambda k: len(k.torch) + len(k.triton))
        nbytes = _counted_split(bench, n, static.Traffic(), lambda k: k.bytes)
        x0_bytes = n * c * h * w * 4  # one batch of float32 x̃0
        for variant in ("official", "dsfast"):
            part_s = {p: flops[p] / rate for p in ("source_fwd", "adapted_fwd", "model_bwd")}
            part_s["optimizer"] = ADAMW_BYTES_PER_PARAM * bench.params / static.HBM_BYTES_PER_S
            part_s["rest"] = launches["rest"] * static.LAUNCH_US * 1e-6 + nbytes["rest"] / static.HBM_BYTES_PER_S
            for part, pass_ in (("loss_fwd", "forward"), ("loss_bwd", "backward")):
                if variant == "official":
                    count, moved = launches[part], nbytes[part]
                else:
                    count, moved = fused[pass_], 3 * x0_bytes
                part_s[part] = count * static.LAUNCH_US * 1e-6 + moved / static.HBM_BYTES_PER_S
                part_s[f"{part}_launches"] = int(count)
            total = sum(part_s[p] for p in PARTS)
            row = dict(model=model, variant=variant, batch=n, latent=f"{c}x{h}x{w}", params=bench.params,
                       utilisation=UTILISATION, peak_flops=H100_BF16_FLOPS, launch_us=static.LAUNCH_US,
                       hbm_bytes_per_s=static.HBM_BYTES_PER_S, model_fwd_flops=flops["adapted_fwd"],
                       model_bwd_flops=flops["model_bwd"], s_per_step=total)
            row.update({f"{p}_s": part_s[p] for p in PARTS})
            row.update({f"{p}_pct": 100 * part_s[p] / total for p in PARTS})
            row.update({k: v for k, v in part_s.items() if k.endswith("_launches")})
            rows.append(row)
    return rows


def estimate_table(rows: list[dict]) -> str:
    """Markdown: one line per batch x variant, each part's estimated ms (share of the step)."""
    head = (["batch", "variant", "est. ms/step"] + [PART_LABELS[p] for p in PARTS] + ["loss launches fwd / bwd", "loss fwd+bwd share"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(
            [str(r["batch"]), r["variant"], f"{r['s_per_step'] * 1e3:.1f}"]
            + [f"{r[f'{p}_s'] * 1e3:.3g} ({r[f'{p}_pct']:.2g}%)" for p in PARTS]
            + [f"{r['loss_fwd_launches']} / {r['loss_bwd_launches']}",
               f"{r['loss_fwd_pct'] + r['loss_bwd_pct']:.2g}%"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.training",
                                 description="the split of one DomainStudio step estimated for an H100 (no GPU used)")
    ap.add_argument("--h100-estimate", action="store_true", required=True,
                    help="estimate SD-1.5's split at 512 px (4x64x64 latents) and write bench/results/estimate-h100/")
    ap.add_argument("--n", default="4,8,16", help="batch sizes (comma-separated)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "estimate-h100"))
    args = ap.parse_args(argv)
    ns = [int(v) for v in args.n.split(",")]
    if min(ns) < 3:
        ap.error("--n: the pairwise losses need a batch of at least 3")
    rows = estimate_h100(ns)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "step_split.json"), "w") as f:
        json.dump(rows, f, indent=1)
    r0 = rows[0]
    text = (f"# One DomainStudio step of SD-1.5 at 512 px on an H100: an estimate, not a timing\n\n"
            f"Written by `python -m bench.training --h100-estimate` (see `estimate_h100`). UNet forward "
            f"{r0['model_fwd_flops'] / r0['batch'] / 1e9:.0f} GFLOP and backward "
            f"{r0['model_bwd_flops'] / r0['batch'] / 1e9:.0f} GFLOP per sample (counted) at "
            f"{100 * r0['utilisation']:.0f}% of {r0['peak_flops'] / 1e12:.0f} TFLOP/s; other parts: launches x "
            f"{r0['launch_us']:g} µs + bytes / {r0['hbm_bytes_per_s'] / 1e12:.1f} TB/s; ms (share of the step).\n\n"
            + estimate_table(rows) + "\n")
    with open(os.path.join(args.out, "step_split.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
