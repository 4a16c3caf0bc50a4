"""``dsfast plan``: predicted peak GPU memory of a training run, per memory option, and what fits.

    dsfast plan --preset sd15 --gpu 24,48,80
    dsfast plan --config run.yaml --gpu 24 [key=value ...]

A prediction, not a measurement. Per rank and per step, in bytes:

* **model states**, from parameter counts (the architecture instantiated on the ``meta`` device: no
  weights): the trained parameters (the UNet, or only its LoRA adapters) cost 4 B weights + 4 B gradients
  + 8 B AdamW moments in float32; with bf16 mixed precision 2 B weights + 2 B gradients + 4 B fp32 master +
  8 B moments. ZeRO stage 1 divides the optimizer part (moments, master) by the world size, stage 2 also the
  gradients, stage 3 also the weights; ``offload_optimizer=cpu`` moves the optimizer part (and, stage ≥ 2,
  the gradient partition) to host memory, ``offload_param=cpu`` the stage-3 weight partition;
* **frozen copies**: VAE, text encoder(s), the frozen source UNet (``loss.source=frozen``), the LoRA base
  weights, in the run's precision;
* **activations** of one micro-batch: a short probe of the actual architecture at two small resolutions —
  the run's forward (the UNet on instance + class latents, the x̃0 decode the option keeps for backward)
  traced on the ``meta`` device while counting the bytes autograd saves for backward (each storage once,
  parameters excluded), attention counted as the fused kernels store it (PyTorch uses them on CUDA and on
  CPU; no score matrix) — fitted as ``a·pixels + b·pixels²`` per sample and extrapolated to the run's
  resolution and micro-batch size. Gradient checkpointing (diffusers recomputes each resnet and each
  transformer block) keeps what is saved outside them and their inputs, plus one of them recomputed.
* the **inputs** of the rank's share of the global batch, built before the step: images, latents, noise;
* the two-pass micro-batch scheme adds the gathered adapted x̃0 and its gradient (2 × global batch × image,
  or × latent with ``loss.space=latent``), and holds the gradients from the first micro-batch on (one
  micro-batch allocates them during backward, as its activations are freed).

DeepSpeed's own buffers (0.19, read from its ZeRO optimizers): the gradient reduce bucket
(``reduce_bucket_size``; the trainer sets it to the trainable parameter count, at most DeepSpeed's 5e8
elements, unless the config sets it) is allocated whole — at stage 2 at the first trained gradient of each
backward (after the frozen decoder's backward freed its activations), at stage 3 at set-up; stage 3 keeps
gathered the weights whose backward use comes within ``stage3_max_reuse_distance`` (1e9 elements: the last
5e8 of the forward; all of a smaller model); with
``offload_optimizer=cpu`` the host also holds the gradient partition, at stage 2 a staging copy of the
weight partition (and an accumulation buffer under gradient accumulation), at stage 3 the fp32 master's
own gradient; reducing a ZeRO-3 bucket concatenates its gradients (one bucket more). The AdamW moments,
on the device or offloaded, come with the first ``optimizer.step()``. A CPU run (``total``, what
``bench/memory.py`` measures) also has torch AdamW's two temporaries of DeepSpeed's flat fp32 partition
(ZeRO ≥ 1) and gloo's copy of a reduced ZeRO-3 bucket.
Not modelled: the CUDA context (~0.5 GiB), the caching allocator's fragmentation (typically 5–15 % above
``max_memory_allocated``), cuDNN workspaces. The table leaves 10 % head-room for them.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from dsfast.argtypes import ArgumentParser, positive_int

GIB = 2 ** 30
CHECKPOINT_UNITS = ("ResnetBlock2D", "BasicTransformerBlock")  # diffusers' checkpointed modules
STAGE3_REUSE = 1_000_000_000  # DeepSpeed's stage3_max_reuse_distance (elements; = stage3_max_live_parameters)

# Architectures, written from their published configurations (no downloads).
_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, sample_size=512)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77)
PRESETS = {
    # Stable Diffusion 1.5: UNet2DConditionModel's defaults are SD-1.5's UNet (its levels written out: the
    # resolution rule reads them); the SD VAE; CLIP ViT-L/14 text.
    "sd15": dict(family="text2image", resolution=512, text_len=77,
                 unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768),
                 vae=_SD_VAE, text=[_CLIP_L]),
    # SDXL base: 3 levels, 10 transformer layers at the lowest, two text encoders (CLIP-L + OpenCLIP bigG).
    "sdxl": dict(family="text2image", resolution=1024, text_len=77, sdxl=True,
                 unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                           cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
                 vae=dict(_SD_VAE, sample_size=1024),
                 text=[_CLIP_L, dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                     num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77)]),
    # ADM / guided-diffusion 256x256 unconditional: channels 256·(1,1,2,2,4,4), 2 res blocks, attention at
    # 32/16/8, 64-channel heads, scale-shift norm; pixel space.
    "adm256": dict(family="unconditional", resolution=256,
                   unet=dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                             block_out_channels=(256, 256, 512, 512, 1024, 1024),
                             down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,
                             up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 3,
                             attention_head_dim=64, resnet_time_scale_shift="scale_shift")),
    # The SD-1.5 layer structure at 1/10 of its UNet width: what bench/memory.py measures on a CPU.
    "sd-small": dict(family="text2image", resolution=128, text_len=16,
                     unet=dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, attention_head_dim=8,
                               sample_size=16),
                     vae=dict(_SD_VAE, block_out_channels=(32, 64, 64, 64), sample_size=128),
                     # vocab_size: the tokenizer of dsfast.train.testing (byte-level, 518 tokens)
                     text=[dict(vocab_size=518, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=16)]),
}


def build_pipeline(preset: str, path) -> None:
    """Save a text-to-image preset with random weights as a local StableDiffusionPipeline folder (bench, tests)."""
    import tempfile
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dsfast.train.testing import _tiny_clip_tokenizer

    spec = PRESETS[preset]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tok, vocab = _tiny_clip_tokenizer(Path(d))
        te = CLIPTextModel(CLIPTextConfig(**dict(spec["text"][0], vocab_size=vocab, bos_token_id=vocab - 2,
                                                 eos_token_id=vocab - 1, pad_token_id=vocab - 1)))
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**spec["vae"]), text_encoder=te, tokenizer=tok, unet=UNet2DConditionModel(**spec["unet"]),
            scheduler=DDPMScheduler(num_train_timesteps=1000), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.save_pretrained(str(path))


# ----------------------------------------------------------------------------------------- options
@dataclass
class Option:
    """The memory-relevant settings of a run (README config keys in the comments)."""

    name: str
    official: bool = False  # the official form: source half in the graph, both halves decoded with grad
    space: str = "pixel"  # loss.space
    lora_rank: int = 0  # model.lora_rank (with loss.source=lora_off)
    checkpointing: bool = False  # train.gradient_checkpointing
    zero_stage: int = 0  # deepspeed.zero_stage
    offload_optimizer: bool = False  # deepspeed.offload_optimizer=cpu
    offload_param: bool = False  # deepspeed.offload_param=cpu
    world: int = 1  # ranks
    precision: str = "no"  # train.mixed_precision
    micro_batch: int | None = None  # train.micro_batch_size (None: global batch / world)
    reduce_bucket: int | None = None  # zero_optimization.reduce_bucket_size of deepspeed.config (None: dsfast's)


OPTIONS = {
    "official": Option("official", official=True),
    "dsfast": Option("dsfast"),
    "dsfast+latent": Option("dsfast+latent", space="latent"),
    "dsfast+lora": Option("dsfast+lora", lora_rank=8),
    "dsfast+ckpt": Option("dsfast+ckpt", checkpointing=True),
    "dsfast+latent+lora+ckpt": Option("dsfast+latent+lora+ckpt", space="latent", lora_rank=8, checkpointing=True),
    "dsfast+latent+lora+ckpt+bf16": Option("dsfast+latent+lora+ckpt+bf16", space="latent", lora_rank=8,
                                           checkpointing=True, precision="bf16"),
    "zero2-offload": Option("zero2-offload", zero_stage=2, offload_optimizer=True, world=2),
    "zero3-offload": Option("zero3-offload", zero_stage=3, offload_optimizer=True, offload_param=True, world=2),
}


# ----------------------------------------------------------------------------------------- model
def _meta_models(spec: dict, lora_rank: int):
    import diffusers
    import torch

    with torch.device("meta"):
        if spec["family"] == "unconditional":
            unet, vae, text = diffusers.UNet2DModel(**spec["unet"]), None, []
        else:
            from transformers import CLIPTextConfig, CLIPTextModel

            unet = diffusers.UNet2DConditionModel(**spec["unet"])
            vae = diffusers.AutoencoderKL(**spec["vae"])
            text = [CLIPTextModel(CLIPTextConfig(**t)) for t in spec["text"]]
    if lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=["to_k", "to_q", "to_v",
                                                                                         "to_out.0"]))
    for m in [vae, *text]:
        if m is not None:
            m.requires_grad_(False)
    return unet, vae, text


def _count(module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    ps = list(module.parameters()) if module is not None else []
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


class _SavedBytes:
    """Counts the bytes autograd saves for backward: each storage once, parameters and their views excluded;
    and the storages gradient checkpointing would keep (``kept``): those saved outside its units (while
    ``in_unit`` is 0) and the units' inputs."""

    def __init__(self, params):
        self.params = {p.untyped_storage()._cdata for p in params}
        self.size: dict = {}  # storage -> bytes, of every storage saved or kept
        self.saved, self.kept = set(), set()
        self.total, self.in_unit = 0, 0

    def _storage(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.params:
            return None
        self.size[key] = storage.nbytes()
        return key

    def pack(self, t):
        key = self._storage(t)
        if key is not None:
            if key not in self.saved:
                self.saved.add(key)
                self.total += self.size[key]
            if not self.in_unit:
                self.kept.add(key)
        return t

    def keep(self, t):
        key = self._storage(t)
        if key is not None:
            self.kept.add(key)

    def kept_bytes(self) -> int:
        return sum(self.size[k] for k in self.kept)

    def __enter__(self):
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """Stands in for scaled_dot_product_attention in the probe: saves what the fused kernels keep for
    backward (q, k, v, the output and one log-sum-exp per query), never the score matrix. PyTorch picks a
    fused kernel on CUDA (memory-efficient / flash) and on CPU (its flash kernel); the meta device would
    trace the math path, which stores the scores."""
    import torch

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
            ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))
            return out

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("probe only")

    return Fused.apply(q, k, v)


def _probe(spec: dict, models, option: Option, resolution: int, m: int) -> dict:
    """Saved-for-backward bytes of one micro-batch of ``m`` samples at ``resolution`` (meta device)."""
    import torch

    unet, vae, text = models
    # what diffusers' gradient checkpointing recomputes: each resnet and each transformer block
    units = [u for u in unet.modules() if type(u).__name__ in CHECKPOINT_UNITS]
    per_unit = []
    counter = _SavedBytes(list(unet.parameters()) + (list(vae.parameters()) if vae is not None else []))

    def pre(mod, args, kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                counter.keep(a)
        counter.in_unit += 1
        mod._dsfast_start = counter.total

    def post(mod, args, out):
        counter.in_unit -= 1
        per_unit.append(counter.total - mod._dsfast_start)

    hooks = [u.register_forward_pre_hook(pre, with_kwargs=True) for u in units]
    hooks += [u.register_forward_hook(post) for u in units]
    import torch.nn.functional as F

    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _fused_attention
    try:
        with torch.device("meta"), counter:
            if spec["family"] == "unconditional":
                x = torch.randn(m, unet.config.in_channels, resolution, resolution)
                unet(x, torch.zeros(m, dtype=torch.long))
                unet_bytes, kept, decode_bytes = counter.total, counter.kept_bytes(), 0
            else:
                f = 2 ** (len(vae.config.block_out_channels) - 1)
                n = 2 * m  # instance + class latents in one batch
                z = torch.randn(n, unet.config.in_channels, resolution // f, resolution // f)
                kw = {"encoder_hidden_states": torch.randn(n, spec["text_len"], unet.config.cross_attention_dim)}
                if spec.get("sdxl"):
                    kw["added_cond_kwargs"] = {"text_embeds": torch.randn(n, 1280), "time_ids": torch.randn(n, 6)}
                out = unet(z, torch.zeros(n, dtype=torch.long), **kw).sample
                unet_bytes, kept = counter.total, counter.kept_bytes()
                decode_bytes = 0
                if option.space == "pixel":
                    halves = 2 if option.official else 1  # dsfast decodes the source half without grad
                    vae.decode(out[: m * halves])
                    decode_bytes = counter.total - unet_bytes
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    return {"unet": unet_bytes, "decode": decode_bytes, "checkpoint_kept": kept, "max_unit": max(per_unit)}


def _fit(spec, models, option, r1: int, r2: int) -> dict:
    """Per-sample bytes = a·pixels + b·pixels² for each probed quantity, from two small resolutions."""
    p1, p2 = _probe(spec, models, option, r1, 1), _probe(spec, models, option, r2, 1)
    x1, x2 = r1 * r1, r2 * r2
    fit = {}
    for k in p1:
        # solve a·x + b·x² = y at two points
        b = (p2[k] / x2 - p1[k] / x1) / (x2 - x1)
        a = p1[k] / x1 - b * x1
        fit[k] = (a, max(b, 0.0))
    return fit


def _activations(fit: dict, resolution: int, m: int, option: Option) -> tuple[int, int]:
    """``(UNet, decode)`` saved-for-backward bytes of ``m`` samples."""
    px = resolution * resolution
    val = {k: m * (a * px + b * px * px) for k, (a, b) in fit.items()}
    unet = val["unet"]
    if option.checkpointing:  # what the units do not recompute, and one unit's recomputation
        unet = val["checkpoint_kept"] + val["max_unit"]
    return int(unet), int(val["decode"])


def _probe_sizes(models) -> tuple[int, int]:
    """Two small resolutions (pixels) the architecture accepts."""
    unet, vae, _ = models
    f = 2 ** (len(unet.config.block_out_channels) - 1)
    if vae is None:
        return 2 * f, 4 * f
    f *= 2 ** (len(vae.config.block_out_channels) - 1)
    return 2 * f, 3 * f


# ----------------------------------------------------------------------------------------- prediction
class Planner:
    """Predictions for one architecture; the probes run once per (LoRA, space, official) combination."""

    def __init__(self, spec: dict):
        self.spec = spec
        self._fits: dict = {}
        self._models: dict = {}

    def models(self, lora_rank: int):
        if lora_rank not in self._models:
            self._models[lora_rank] = _meta_models(self.spec, lora_rank)
        return self._models[lora_rank]

    def fit(self, option: Option) -> dict:
        key = (option.lora_rank, option.space, option.official)
        if key not in self._fits:
            self._fits[key] = _fit(self.spec, self.models(option.lora_rank), option,
                                   *_probe_sizes(self.models(option.lora_rank)))
        return self._fits[key]

    def predict(self, option: Option, batch: int, resolution: int, *, first_step: bool = False) -> dict:
        """Peak bytes per rank: ``device`` (what a GPU holds) and ``total`` (device + host: what a CPU run holds).

        ``first_step``: the first step allocates the AdamW moments in ``optimizer.step()``, after backward
        freed the activations (what a one-step measurement sees); later steps hold them throughout.
        """
        unet, vae, text = self.models(option.lora_rank)
        p_unet, p_train = _count(unet)
        frozen_params = p_unet - p_train + _count(vae)[0] + sum(_count(t)[0] for t in text)
        w = 2 if option.precision in ("bf16", "fp16") else 4
        world, z = option.world, option.zero_stage
        # trained parameters: weights, gradients, an fp32 master copy (mixed precision; DeepSpeed's fp32
        # partition at any ZeRO stage, also in float32 training), AdamW moments
        weights = p_train * w / (world if z >= 3 else 1)
        grads = p_train * w / (world if z >= 2 else 1)
        master = p_train * 4 / (world if z >= 1 else 1) if w == 2 or z >= 1 else 0.0
        moments = p_train * 8 / (world if z >= 1 else 1)
        micro = option.micro_batch or batch // world
        accumulating = micro * world < batch
        host, host_moments = 0.0, 0.0  # host memory: allocated at set-up / by the first optimizer.step()
        if option.offload_optimizer:
            host, host_moments = master, moments
            master = moments = 0.0
            if z >= 2:
                # the gradient partition and, ZeRO-2, a staging copy of the weight partition; ZeRO-3 a second
                # fp32 gradient buffer (the master's); ZeRO-2 accumulates micro-batches in a third buffer
                host += grads + p_train * (w if z == 2 else 4) / world
                if z == 2 and accumulating:
                    host += p_train * w / world
                grads = 0.0
        if option.offload_param:
            host += weights
            weights = 0.0
        frozen = frozen_params * w
        fit = self.fit(option)
        if option.official:
            micro = batch // world  # one pass over the whole batch
        act_unet, act_decode = (a * w // 4 for a in _activations(fit, resolution, micro, option))  # probed in fp32
        act = act_unet + act_decode
        pixels = resolution * resolution
        if vae is None:  # unconditional: x0 and its noise per sample
            image, latent = unet.config.in_channels * pixels, 0
            inputs = 2 * image
        else:  # the image (the hf-MSE target) and the instance and class latents and their noise per sample
            f = 2 ** (len(vae.config.block_out_channels) - 1)
            image, latent = vae.config.out_channels * pixels, vae.config.latent_channels * pixels // (f * f)
            inputs = image + 4 * latent
        # the rank's micro-batches, built before the step for its share of the global batch (float32)
        inputs *= 4 * (batch // world)
        features = 0
        if accumulating and not option.official:
            # the two-pass scheme: the gathered adapted x̃0 of the global batch (pass 1; the global loss's
            # graph keeps it until the step logs the loss) and its gradient G, float32; the source x̃0 is freed
            features = 2 * batch * (image if option.space == "pixel" else latent) * 4
        held, transient = weights + frozen + inputs + master, 0.0
        peak_act = reduce_dev = reduce_cpu = act
        if z >= 2:
            # DeepSpeed's gradient reduce bucket, allocated whole: reduce_bucket_size, which the trainer
            # sizes by the model unless the config sets it
            from dsfast.train.ds_config import reduce_bucket_elements

            bucket = (option.reduce_bucket or reduce_bucket_elements(p_train)) * w
            if z == 2:
                # allocated at the first trained gradient of each backward and freed after it: the loss
                # heads' and the (frozen) decoder's backward are done and their activations freed by then
                peak_act = max(act, act_unet + bucket)
            else:
                # ZeRO-3 allocates it at set-up; after forward it keeps gathered the weights used again
                # (in backward) within stage3_max_reuse_distance elements: the last half of that distance
                held += bucket + min(p_train, STAGE3_REUSE // 2) * w
                # reducing a bucket, DeepSpeed concatenates its gradients (gloo, a CPU run's backend, copies
                # them once more); the last one at the end of backward, the activations freed
                reduce_dev, reduce_cpu = bucket, 2 * bucket
        # Without ZeRO and with one micro-batch the gradients are allocated during backward as the
        # activations are freed (the step sets them to None); gradient accumulation keeps them from the
        # first micro-batch on, and ZeRO keeps its gradient partition for the whole step.
        if z == 0 and not accumulating:
            transient = grads
        else:
            held += grads
        # A CPU run (``total``) steps with torch's single-tensor AdamW (dsfast's optimizer without CUDA): on
        # DeepSpeed's flat fp32 partition (ZeRO ≥ 1) it makes two temporaries of its size, sqrt(v) and its
        # quotient; DeepSpeed's fused (GPU) and CPU Adam make none.
        step_temp = 8 * p_train / world if z >= 1 else 0.0
        peak_dev, peak_cpu = max(peak_act, reduce_dev) + features, max(peak_act, reduce_cpu) + features
        if first_step:
            device = held + max(peak_dev, transient + moments)
            total = held + host + max(peak_cpu, transient + moments + host_moments + step_temp)
        else:
            device = held + moments + max(peak_dev, transient)
            total = held + host + moments + host_moments + max(peak_cpu, transient + step_temp)
        return {"device": int(device), "total": int(total), "weights": int(weights), "grads": int(grads),
                "optimizer": int(master + moments), "frozen": int(frozen), "activations": int(act),
                "features": int(features), "inputs": int(inputs), "host": int(host + host_moments),
                "micro_batch": micro}


def spec_from_pretrained(path) -> dict:
    """An architecture spec from a local diffusers pipeline folder (its config.json files; no weights read)."""
    import json
    from pathlib import Path

    def cfg(sub):
        f = Path(path) / sub / "config.json"
        if not f.is_file():
            return None
        return {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith("_")}

    unet = cfg("unet")
    if unet is None:
        from dsfast.train.errors import ModelError

        raise ModelError(f"model.pretrained={path} has no unet/config.json (need a local diffusers pipeline folder)")
    vae, text = cfg("vae"), cfg("text_encoder")
    if vae is None or text is None:
        return dict(family="unconditional", resolution=unet.get("sample_size") or 256, unet=unet)
    text = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "max_position_embeddings", "bos_token_id", "eos_token_id",
                                 "pad_token_id") if k in text}
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    return dict(family="text2image", resolution=(unet.get("sample_size") or 64) * f,
                text_len=text.get("max_position_embeddings", 77), unet=unet, vae=vae, text=[text])


def option_from_config(cfg, world: int) -> Option:
    t, z = cfg.train, cfg.deepspeed
    bucket = None
    if z.config:
        from dsfast.train.ds_config import read_stock_json

        bucket = (read_stock_json(z.config).get("zero_optimization") or {}).get("reduce_bucket_size")
    return Option("config", space=cfg.loss.space, lora_rank=cfg.model.lora_rank,
                  checkpointing=t.gradient_checkpointing, zero_stage=z.zero_stage,
                  offload_optimizer=z.offload_optimizer == "cpu", offload_param=z.offload_param == "cpu",
                  world=world, precision=t.mixed_precision, micro_batch=t.micro_batch_size,
                  reduce_bucket=None if bucket in (None, "auto") else int(bucket))


def largest_micro_batch(planner: Planner, option: Option, batch: int, resolution: int, budget: float) -> int:
    """The largest micro-batch (powers of 2 up to batch/world) whose predicted device peak fits ``budget`` bytes
    (0 if none). The official form has no micro-batches: its "micro-batch" is its whole batch."""
    best = 0
    m = 1
    while m <= max(1, batch // option.world):
        o = Option(**{**vars(option), "micro_batch": m})
        if planner.predict(o, m if option.official else batch, resolution)["device"] > budget:
            break
        best, m = m, m * 2
    return best


def table(planner: Planner, options: dict, gpus, batch: int, resolutions) -> list[str]:
    """Markdown rows: per option and resolution, predicted GiB at micro-batch 1 and the largest micro-batch per GPU."""
    head = ["option", "resolution", "GiB at micro-batch 1"] + [f"{g:g} GB: largest micro-batch" for g in gpus]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for option in options.values():
        for res in resolutions:
            one = Option(**{**vars(option), "micro_batch": 1})
            gib = planner.predict(one, 1 if option.official else batch, res)["device"] / GIB
            fits = [largest_micro_batch(planner, option, batch, res, 0.9 * g * 1e9) for g in gpus]
            lines.append(f"| {option.name} | {res} | {gib:.3g} | " + " | ".join(str(f) if f else "does not fit"
                                                                                for f in fits) + " |")
    return lines


def _gpu_sizes(text: str) -> list[float]:
    """Comma-separated GPU memory sizes in GB, each a positive number."""
    try:
        sizes = [float(g) for g in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"GPU sizes in GB, comma-separated (e.g. 24,80), got {text!r}") from None
    if not all(0 < g < float("inf") for g in sizes):
        raise argparse.ArgumentTypeError(f"GPU sizes must be positive numbers of GB, got {text!r}")
    return sizes


def _resolutions(text: str) -> list[int]:
    return [positive_int(r) for r in text.split(",")]


def main(argv=None) -> int:
    ap = ArgumentParser(
        prog="dsfast plan",
        description="Predict the peak GPU memory of a DomainStudio / DreamBooth run per memory option, and the "
                    "largest micro-batch that fits (a global batch of any multiple of it trains with the two-pass "
                    "micro-batch scheme). Predictions, not measurements: the model is instantiated on the meta "
                    "device (no weights) and probed at small size.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a built-in architecture")
    src.add_argument("--config", help="a run config (YAML); its model.pretrained must be a local pipeline folder")
    ap.add_argument("--gpu", type=_gpu_sizes, default="24,48,80",
                    help="GPU memory sizes in GB, comma-separated (default 24,48,80)")
    ap.add_argument("--batch", type=positive_int, default=16, help="global batch (default 16)")
    ap.add_argument("--resolution", type=_resolutions, default=None,
                    help="resolutions in pixels, comma-separated (default: the model's)")
    ap.add_argument("--world", type=positive_int, default=None, help="ranks (--config only; default 1)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (--config only)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.preset and (args.world is not None or args.overrides):
        ap.error("--world and key=value overrides go with --config (a preset's options set their own ranks)")
    from dsfast.train.config import check_resolution, load_config
    from dsfast.train.errors import ConfigError, ModelError
    from dsfast.train.models import down_factor

    gpus = args.gpu
    try:
        if args.config:
            cfg = load_config(args.config, args.overrides)
            spec = spec_from_pretrained(cfg.model.pretrained)
            options = {"config": option_from_config(cfg, args.world or 1)}
            batch = cfg.train.batch_size or args.batch
            res = [cfg.data.resolution or spec["resolution"]]
        else:
            spec = PRESETS[args.preset]
            options = {k: v for k, v in OPTIONS.items() if spec["family"] == "text2image" or k in (
                "dsfast", "dsfast+ckpt", "zero2-offload", "zero3-offload")}
            batch = args.batch
            res = [spec["resolution"]]
        key = "data.resolution"
        if args.resolution:
            res, key = args.resolution, "--resolution"
        for r in res:  # the trainer's rule, before any work
            check_resolution(r, down_factor(spec["unet"], spec.get("vae")), key)
    except (ConfigError, ModelError) as exc:
        print(f"dsfast plan: error: {exc}", file=sys.stderr)
        return 1
    print(f"Predicted peak GPU memory per rank (global batch {batch}; 10 % of each GPU left as head-room):")
    print("\n".join(table(Planner(spec), options, gpus, batch, res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
