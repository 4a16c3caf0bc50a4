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
           pooled text embeddings and time ids. For sd15/sdxl the losses run on the latent x̃0 (no VAE).

On GPU: adapted UNet in float32 with bf16 autocast, source UNet in bf16, fused AdamW. Measured: seconds
per step (median of timed steps after warm-up), peak memory (GPU: ``max_memory_allocated`` over the timed
steps, everything included; CPU: peak extra bytes of torch's CPU allocator during one step, via
``torch.profiler``), and on GPU the largest micro-batch that fits (doubling, then bisection).
"""
from __future__ import annotations

import copy
import gc
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
}

VARIANTS = ("official", "dsfast", "dsfast+ckpt")


def _alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class DomainStudioStep:
    """Models, optimiser and a ``step(batch)`` for one (model, variant, device)."""

    def __init__(self, model: str, variant: str, device: torch.device, seed: int = 0, latent=None):
        import diffusers

        spec = dict(MODELS[model])
        if latent is not None:
            spec["latent"] = latent
        self.spec, self.variant, self.device = spec, variant, device
        self.cuda = device.type == "cuda"
        torch.manual_seed(seed)
        cls = getattr(diffusers, spec["cls"])
        with torch.device(device):
            self.adapted = cls(**spec["config"])
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

    def step(self, batch: dict) -> float:
        x0 = batch["x0"]
        n = x0.shape[0]
        t = torch.randint(0, len(self.ab), (n,), device=self.device)
        noise = torch.randn_like(x0)
        ab = self.ab[t].view(n, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)
        src_dtype = torch.bfloat16 if self.cuda else torch.float32
        with autocast:
            if self.variant == "official":
                eps_src = self._forward(self.source, x_t, t, batch, src_dtype)
            else:
                with torch.no_grad():
                    eps_src = self._forward(self.source, x_t, t, batch, src_dtype)
            eps_ada = self._forward(self.adapted, x_t, t, batch, torch.float32)
        x0_src = (x_t - (1 - ab).sqrt() * eps_src) / ab.sqrt()
        x0_ada = (x_t - (1 - ab).sqrt() * eps_ada) / ab.sqrt()
        loss = F.mse_loss(eps_ada, noise)
        if self.variant == "official":
            loss = loss + peers._official_domainstudio(x0_src, x0_ada, x0)
        else:
            loss = loss + self.loss(x0_src, x0_ada, x0).total
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

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
            t0 = time.perf_counter()
            self.step(batch)
            self.sync()
            times.append(time.perf_counter() - t0)
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

