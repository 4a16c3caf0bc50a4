"""The model families of ``dsfast.train.families`` against diffusers itself, on the tiny pipelines of
``dsfast.train.testing``: the registry recognises each folder; the flow-matching process is
``FlowMatchEulerDiscreteScheduler``'s forward process, x0 and σ table, with the density and loss weighting
of diffusers' ``training_utils``; each text-to-image family conditions and calls its denoiser exactly as its
diffusers pipeline does (the kwargs are caught with forward hooks on the pipeline's denoiser and on the
family's); the SD3 / FLUX latents carry the VAE's shift and scale; the LoRA targets exist in the transformers.

Everything is float32 on the CPU except where float64 checks an identity; the pipelines are built once per
module (about a second) and each test runs in well under a second.
"""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from dsfast import ops
from dsfast.train import families
from dsfast.train.errors import ConfigError, ModelError
from dsfast.train.families import FamilyOptions
from dsfast.train.families.base import flow_matching
from dsfast.train.testing import (
    make_flux_pipeline,
    make_sd3_pipeline,
    make_sd_pipeline,
    make_sdxl_pipeline,
    make_unconditional_pipeline,
)

CPU = torch.device("cpu")
PROMPT, OTHER = "a photo of sks dog", "a painting of a cat"
# folder key -> (family name, kind, pixel channels, down factor, default resolution): the tiny pipelines have
# 2x VAEs (sd3: patch 1; flux: 2x2 packing, FluxPipeline's default 128 latent cells)
FOLDERS = {
    "unet2d": ("unet2d", families.UNCONDITIONAL, 3, 2, 16),
    "sd": ("sd", families.TEXT2IMAGE, 3, 4, 16),
    "sdxl": ("sdxl", families.TEXT2IMAGE, 3, 4, 16),
    "sd3": ("sd3", families.TEXT2IMAGE, 3, 2, 16),
    "sd3_no_t5": ("sd3", families.TEXT2IMAGE, 3, 2, 16),
    "flux": ("flux", families.TEXT2IMAGE, 3, 4, 256),
    "flux_no_guidance": ("flux", families.TEXT2IMAGE, 3, 4, 256),
}
FLOW = ["sd3", "flux"]  # the flow-matching families (sd3: static shift 3; flux: dynamic shift, unshifted table)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        "unet2d": make_unconditional_pipeline(root / "unet2d"),
        "sd": make_sd_pipeline(root / "sd"),
        "sdxl": make_sdxl_pipeline(root / "sdxl"),
        "sd3": make_sd3_pipeline(root / "sd3"),
        "sd3_no_t5": make_sd3_pipeline(root / "sd3_no_t5", t5=False),
        "flux": make_flux_pipeline(root / "flux"),
        "flux_no_guidance": make_flux_pipeline(root / "flux_no_guidance", guidance_embeds=False),
    }


@pytest.fixture(scope="module")
def family(folders):
    """``family(key, **options)``: the family instance of a tiny folder (float32, CPU), loaded once per options."""
    cache = {}

    def load(key, **options):
        k = (key, tuple(sorted(options.items())))
        if k not in cache:
            cls = families.get(FOLDERS[key][0])
            cache[k] = cls(str(folders[key]), dtype=torch.float32, device=CPU, trained_dtype=torch.float32,
                           options=FamilyOptions(**options))
        return cache[k]

    return load


@pytest.fixture(scope="module")
def pipeline(folders):
    """``pipeline(key)``: the folder's diffusers pipeline, loaded once (a T5-less SD3 needs both parts as None)."""
    cache = {}

    def load(key):
        if key not in cache:
            extra = dict(text_encoder_3=None, tokenizer_3=None) if key == "sd3_no_t5" else {}
            pipe = DiffusionPipeline.from_pretrained(str(folders[key]), **extra)
            pipe.set_progress_bar_config(disable=True)
            cache[key] = pipe
        return cache[key]

    return load


def scheduler_of(folders, key) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(folders[key]), subfolder="scheduler")


def close(a, b, rtol=1e-5, atol=1e-6, msg=""):
    assert a is not None and b is not None, msg
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def calls(module: torch.nn.Module, fn):
    """``[(args, kwargs, output)]`` of every forward of ``module`` while ``fn()`` runs."""
    seen = []
    pre = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append([args, kwargs]), with_kwargs=True)
    post = module.register_forward_hook(lambda m, args, kwargs, out: seen[-1].append(out), with_kwargs=True)
    try:
        fn()
    finally:
        pre.remove()
        post.remove()
    return seen


def one_call(module, fn):
    seen = calls(module, fn)
    assert len(seen) == 1, f"{len(seen)} denoiser calls, expected 1"
    return seen[0]


def run_pipeline(pipe, guidance_scale: float):
    """One denoising step at 16 px for PROMPT, latent noise from seed 0; the denoiser's (args, kwargs, output)."""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return one_call(denoiser, lambda: pipe(PROMPT, num_inference_steps=1, height=16, width=16,
                                           guidance_scale=guidance_scale, output_type="latent",
                                           generator=torch.Generator().manual_seed(0)))


def pack(x):
    """FLUX.1's token layout, written out: 2x2 patches in row-major order, each channel-major (c, dy, dx)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, h, w):
    b, n, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("key", list(FOLDERS))
def test_describe_recognises_each_tiny_pipeline(folders, key):
    info = families.describe(str(folders[key]))
    assert (info.family, info.kind, info.channels, info.down_factor, info.default_resolution) == FOLDERS[key]
    assert families.family_of(str(folders[key])).name == FOLDERS[key][0]


def test_unknown_pipeline_is_a_model_error_naming_the_families(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "WuerstchenPipeline", "_diffusers_version": "0.30.0",
        "decoder": ["diffusers", "WuerstchenDiffNeXt"], "scheduler": ["diffusers", "DDPMWuerstchenScheduler"]}))
    with pytest.raises(ModelError, match="WuerstchenPipeline") as err:
        families.describe(str(tmp_path))
    for name in ("unet2d", "sd", "sdxl", "sd3", "flux"):
        assert name in str(err.value)
    with pytest.raises(ModelError, match="does not exist"):
        families.describe(str(tmp_path / "nothing_here"))  # a missing folder that is not a hub id either
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        families.describe(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="flux"):
        families.get("kandinsky")


# ----------------------------------------------------------------------------- flow matching vs diffusers


@pytest.mark.parametrize("key", FLOW)
def test_flow_sigma_table(family, folders, key):
    """The process's σ and timestep tables are the scheduler's training tables: SD3's shifted by 3, FLUX's not
    (its shift is dynamic, at sampling only)."""
    process, sched = family(key).process, scheduler_of(folders, key)
    assert process.num_timesteps == 1000
    assert torch.equal(process.sigmas, sched.sigmas.float()) and torch.equal(process.timesteps, sched.timesteps.float())
    s = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000  # index 0 is σ = 1 (pure noise)
    want = 3 * s / (1 + 2 * s) if key == "sd3" else s
    close(process.sigmas, want, rtol=1e-6, atol=1e-7)
    t = torch.tensor([0, 1, 500, 999])
    close(process.model_time(t), 1000 * want[t], rtol=1e-6, atol=1e-4)
    close(process.sigma(t), want[t].view(-1, 1, 1, 1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("key", FLOW)
def test_flow_noisy_is_scale_noise(family, folders, key, gen):
    process, sched = family(key).process, scheduler_of(folders, key)
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (6,), generator=gen)])
    x0, noise = torch.randn(2, 8, 16, 8, 8, generator=gen)
    want = sched.scale_noise(x0, process.model_time(t), noise)
    close(process.noisy(x0, noise, t), want, rtol=1e-6, atol=1e-6)
    for i in range(len(t)):  # and per sample, one timestep at a time
        close(process.noisy(x0[i:i + 1], noise[i:i + 1], t[i:i + 1]),
              sched.scale_noise(x0[i:i + 1], process.model_time(t[i:i + 1]), noise[i:i + 1]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("key", FLOW)
def test_flow_noisy_in_float64(family, folders, key, gen):
    """In float64, ``noisy`` is ``scale_noise`` to float64 precision (diffusers casts σ to the sample dtype; with
    σ rounded in float32 the float64 x_t were off by ~6e-8, and x̂0 - x0 = -σ·(v̂ - v) held to ~6e-8/σ only)."""
    process, sched = family(key).process, scheduler_of(folders, key)
    t = torch.randint(0, 1000, (8,), generator=gen)
    x0, noise = torch.randn(2, 8, 16, 8, 8, generator=gen, dtype=torch.float64)
    got = process.noisy(x0, noise, t)
    assert got.dtype == torch.float64
    close(got, sched.scale_noise(x0, process.model_time(t), noise), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", FLOW)
def test_flow_x0_is_the_stochastic_step_x0(family, folders, key, gen):
    """``process.x0`` is the x0 of ``FlowMatchEulerDiscreteScheduler.step`` with stochastic sampling, which
    returns prev = (1-σ_next)·x0 + σ_next·ε: x0 is recovered from prev with the step generator's ε. The training
    table gets the terminal σ = 0 that ``set_timesteps`` appends, so the last index steps too (there prev = x0).
    x_t float32, v̂ float64: the step then computes x0 in float64 and the recovery is exact to ~1e-13."""
    process = family(key).process
    config = scheduler_of(folders, key).config
    for i in [0, 1, 250, 500, 750, 998, 999, int(torch.randint(0, 1000, (), generator=gen))]:
        x_t = torch.randn(2, 16, 8, 8, generator=gen)
        v_hat = torch.randn(2, 16, 8, 8, generator=gen, dtype=torch.float64)
        sched = FlowMatchEulerDiscreteScheduler.from_config(config, stochastic_sampling=True)
        sched.sigmas = torch.cat([sched.sigmas, sched.sigmas.new_zeros(1)])
        prev = sched.step(v_hat, sched.timesteps[i], x_t, generator=torch.Generator().manual_seed(i)).prev_sample
        eps = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(i), dtype=x_t.dtype)
        s_next = sched.sigmas[i + 1]
        # the step's 1 - σ_next and σ_next·ε are float32 (float32 operands): undo those same values
        x0 = (prev - (s_next * eps).double()) / (1.0 - s_next).double()
        got = process.x0(v_hat, x_t, torch.full((2,), i))
        close(got, x0, rtol=1e-9, atol=1e-9, msg=f"index {i}")
        close(got, x_t.double() - sched.sigmas[i].double() * v_hat, rtol=1e-12, atol=1e-12, msg=f"index {i}")


@pytest.mark.parametrize("key", FLOW)
def test_flow_target_and_preconditioning(family, key, gen):
    fam = family(key)
    t = torch.randint(0, 1000, (4,), generator=gen)
    x0, noise, out = torch.randn(3, 4, 16, 8, 8, generator=gen, dtype=torch.float64)
    sigma = fam.process.sigmas[t].double().view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * noise  # in float64 (see test_flow_noisy_in_float64)
    assert not fam.process.precondition
    close(fam.process.target(x0, noise, t), noise - x0, rtol=0, atol=1e-15)
    assert fam.process.regressed(out, x_t, t) is out
    # model.precondition_outputs (SD3's --precondition_outputs): regress x̂0 = x_t - σ·v̂ on x0
    pre = copy.copy(fam)
    pre.options = FamilyOptions(precondition_outputs=True)
    process = flow_matching(pre)
    assert process.precondition
    close(process.target(x0, noise, t), x0, rtol=0, atol=0)
    close(process.regressed(out, x_t, t), x_t - sigma * out, rtol=1e-14, atol=1e-14)
    # and the regression error is σ·(v-space error): x̂0 - x0 = -σ·(v̂ - (ε - x0))
    close(process.regressed(out, x_t, t) - x0, -sigma * (out - (noise - x0)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
@pytest.mark.parametrize("key", FLOW)
def test_flow_draw_is_the_sd3_script_density(family, key, scheme):
    """``draw`` takes the index of diffusers' SD3/FLUX scripts, int(u·T) with u from
    ``compute_density_for_timestep_sampling`` (the options' logit mean/std and mode scale)."""
    opts = dict(weighting_scheme=scheme, logit_mean=0.4, logit_std=1.3, mode_scale=0.8)
    fam = copy.copy(family(key))
    fam.options = FamilyOptions(**opts)
    process = flow_matching(fam)
    assert process.weighting == scheme
    drawn = []
    for s in range(300):
        u = compute_density_for_timestep_sampling(scheme, 1, logit_mean=0.4, logit_std=1.3, mode_scale=0.8,
                                                  generator=torch.Generator().manual_seed(s))
        t = process.draw(torch.Generator().manual_seed(s))
        assert isinstance(t, int) and 0 <= t < 1000
        assert t == int(u.item() * 1000), f"seed {s}: {t} != int({u.item()} * 1000)"
        drawn.append(t)
    assert len(set(drawn)) > 100  # a real spread, not one constant index


def test_flow_default_weighting_per_family(family):
    """diffusers' DreamBooth LoRA scripts: SD3 draws logit-normal, FLUX uniform ("none")."""
    assert family("sd3").process.weighting == "logit_normal"
    assert family("flux").process.weighting == "none"
    assert family("sd3", weighting_scheme="cosmap").process.weighting == "cosmap"


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("key", FLOW)
def test_flow_loss_weight(family, key, scheme, gen):
    fam = copy.copy(family(key))
    fam.options = FamilyOptions(weighting_scheme=scheme)
    process = flow_matching(fam)
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (6,), generator=gen)])
    w = process.weight(t)
    if scheme in ("none", "logit_normal", "mode"):
        assert w is None
        return
    sigma = process.sigmas[t]
    close(w, compute_loss_weighting_for_sd3(scheme, sigma), rtol=1e-6, atol=0)
    s = sigma.double()
    close(w, s ** -2 if scheme == "sigma_sqrt" else 2 / (torch.pi * (1 - 2 * s + 2 * s ** 2)), rtol=1e-5, atol=0)
    assert w.shape == (8,) and w.dtype == torch.float32


@pytest.mark.parametrize("key", FLOW)
def test_flow_snr(family, folders, key, gen):
    process = family(key).process
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (6,), generator=gen)])
    s = scheduler_of(folders, key).sigmas[t].double()
    close(process.snr(t), ((1 - s) / s) ** 2, rtol=1e-5, atol=1e-7)
    assert float(process.snr(torch.tensor([0]))) == 0.0  # σ = 1: pure noise


@pytest.mark.parametrize("key", FLOW)
def test_flow_hf_mse_is_sigma_squared_times_v_error(family, key, gen):
    """hf is linear and x̂0 - x0 = -σ·(v̂ - v): per sample, mean((hf(x̂0) - hf(x0))²) = σ²·mean(hf(v̂ - v)²)."""
    process = family(key).process
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (4,), generator=gen)])
    x0, noise, v_hat = torch.randn(3, 6, 16, 8, 8, generator=gen, dtype=torch.float64)
    sigma = process.sigmas[t].double()
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise  # float64 (see test_flow_noisy_in_float64)
    close(process.noisy(x0, noise, t), x_t, rtol=0, atol=1e-6)  # the process's own, up to its float32 (1 - σ)
    x0_hat = process.x0(v_hat, x_t, t)
    assert x0_hat.dtype == torch.float64

    def hf(x):
        return ops.high_frequency(x, stencil="domainstudio", backend="torch")

    lhs = (hf(x0_hat) - hf(x0)).pow(2).flatten(1).mean(1)
    rhs = sigma ** 2 * hf(v_hat - (noise - x0)).pow(2).flatten(1).mean(1)
    assert lhs.shape == (6,) and bool((rhs > 0).all())
    close(lhs, rhs, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- conditioning vs the pipelines


@pytest.mark.parametrize("key", ["sd", "sdxl", "sd3", "sd3_no_t5", "flux"])
def test_encode_prompts_is_per_prompt(family, key):
    """A batch of prompts is the prompts encoded one by one, row by row, on the device in float32."""
    fam = family(key, resolution=16)
    both, a, b = fam.encode_prompts([PROMPT, OTHER]), fam.encode_prompts([PROMPT]), fam.encode_prompts([OTHER])
    assert set(both) == set(a) == set(b)
    for name, v in both.items():
        assert v.dtype == torch.float32 and v.device == CPU and v.shape[0] == 2, name
        close(v[:1], a[name], msg=name)
        close(v[1:], b[name], msg=name)
    assert not torch.allclose(both["encoder_hidden_states"][0], both["encoder_hidden_states"][1])


def test_sdxl_conditioning_matches_pipeline(family, pipeline):
    pipe = pipeline("sdxl")
    (x_t, t), kwargs, out = run_pipeline(pipe, guidance_scale=1.0)
    fam = family("sdxl", resolution=16)
    cond = fam.encode_prompts([PROMPT])
    assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    close(cond["encoder_hidden_states"], kwargs["encoder_hidden_states"], msg="encoder_hidden_states")
    close(cond["text_embeds"], kwargs["added_cond_kwargs"]["text_embeds"], msg="text_embeds")
    close(cond["time_ids"], kwargs["added_cond_kwargs"]["time_ids"], msg="time_ids")
    assert cond["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]  # original, crop, target size
    # the default resolution is the pipeline's default size (8 latent cells of a 2x VAE)
    assert family("sdxl").encode_prompts([PROMPT])["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
    # a training image's own ids: its original size and crop, as the pipeline's helper lays them out
    geometry = torch.tensor([[[20, 36, 0, 6], [37, 16, 10, 0]], [[20, 36, 0, 7], [37, 16, 11, 0]]])
    ids = fam.image_conditioning(geometry)["time_ids"]
    assert ids.shape == (2, 2, 6) and ids.dtype == torch.float32
    for f in range(2):
        for i in range(2):
            h, w, top, left = geometry[f, i].tolist()
            want = pipe._get_add_time_ids((h, w), (top, left), (16, 16), dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            close(ids[f, i], want[0], msg=f"image_conditioning {f} {i}")
    assert family("sd").image_conditioning(geometry) == {}  # no family but SDXL conditions on image sizes
    # the family's call of its UNet at the pipeline's timestep: the same inputs, the same output
    assert float(t) == int(t)
    t_idx = torch.tensor([int(t)])
    (f_x, f_t), f_kwargs, _ = one_call(fam.model, lambda: fam.predict(fam.model, x_t, t_idx, cond))
    assert torch.equal(f_x, x_t) and int(f_t) == int(t)
    close(f_kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states"], msg="predict encoder_hidden_states")
    for k in ("text_embeds", "time_ids"):
        close(f_kwargs["added_cond_kwargs"][k], kwargs["added_cond_kwargs"][k], msg=f"predict {k}")
    pred = fam.predict(fam.model, x_t, t_idx, cond)
    assert pred.shape == (1, 4, 8, 8) and pred.dtype == torch.float32
    close(pred, out[0], msg="UNet output")


@pytest.mark.parametrize("key", ["sd3", "sd3_no_t5"])
def test_sd3_conditioning_matches_pipeline(family, pipeline, key):
    pipe = pipeline(key)
    _, kwargs, out = run_pipeline(pipe, guidance_scale=1.0)
    fam = family(key)
    cond = fam.encode_prompts([PROMPT])
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    n_clip = fam.parts["tokenizer"].model_max_length
    assert cond["encoder_hidden_states"].shape == kwargs["encoder_hidden_states"].shape == (1, n_clip + 256, 32)
    assert cond["pooled_projections"].shape == kwargs["pooled_projections"].shape == (1, 32)
    close(cond["encoder_hidden_states"], kwargs["encoder_hidden_states"], msg="encoder_hidden_states")
    close(cond["pooled_projections"], kwargs["pooled_projections"], msg="pooled_projections")
    # the T5 tokens: zeros without T5 (the pipeline's zero context); with T5, an encoding of the prompt
    t5 = fam.encode_prompts([PROMPT, OTHER])["encoder_hidden_states"][:, n_clip:]
    if key == "sd3_no_t5":
        assert fam.parts["text_encoder_3"] is None and bool((t5 == 0).all())
    else:
        assert bool((t5.abs().amax(-1) > 0).all()) and not torch.allclose(t5[0], t5[1])
    assert family(key, max_sequence_length=24).encode_prompts([PROMPT])["encoder_hidden_states"].shape == (1, n_clip + 24, 32)
    # one step from σ = 1: the pipeline's timestep is the training table's first (index 0)
    x_t, t_idx = kwargs["hidden_states"], torch.tensor([0])
    close(fam.process.model_time(t_idx), kwargs["timestep"], rtol=0, atol=0, msg="timestep")
    _, f_kwargs, _ = one_call(fam.model, lambda: fam.predict(fam.model, x_t, t_idx, cond))
    for k in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"):
        close(f_kwargs[k], kwargs[k], msg=f"predict {k}")
    pred = fam.predict(fam.model, x_t, t_idx, cond)
    assert pred.shape == (1, 16, 8, 8) and pred.dtype == torch.float32
    close(pred, out[0], msg="transformer output")


@pytest.mark.parametrize("key", ["flux", "flux_no_guidance"])
def test_flux_conditioning_matches_pipeline(family, pipeline, key):
    pipe = pipeline(key)
    _, kwargs, out = run_pipeline(pipe, guidance_scale=3.5)  # = FamilyOptions().guidance
    fam = family(key)
    assert fam.options.guidance == 3.5
    cond = fam.encode_prompts([PROMPT])
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert cond["encoder_hidden_states"].shape == (1, 512, 16) and cond["pooled_projections"].shape == (1, 16)
    close(cond["encoder_hidden_states"], kwargs["encoder_hidden_states"], msg="encoder_hidden_states")
    close(cond["pooled_projections"], kwargs["pooled_projections"], msg="pooled_projections")
    # the pipeline's initial latent (seed 0, (1, 16, 8, 8)) packs into its tokens as pack() writes it out
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kwargs["hidden_states"], pack(latent))
    t_idx = torch.tensor([0])  # one step from σ = 1: timestep 1000 / 1000
    _, f_kwargs, _ = one_call(fam.model, lambda: fam.predict(fam.model, latent, t_idx, cond))
    for k in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "txt_ids", "img_ids"):
        assert f_kwargs[k].shape == kwargs[k].shape, k
        close(f_kwargs[k], kwargs[k], rtol=0, atol=1e-6, msg=f"predict {k}")
    assert float(f_kwargs["timestep"]) == 1.0
    if key == "flux":
        assert kwargs["guidance"].tolist() == [3.5]
        close(f_kwargs["guidance"], kwargs["guidance"], rtol=0, atol=0, msg="guidance")
        g = one_call(fam.model, lambda: family(key, guidance=2.0).predict(fam.model, latent, t_idx, cond))[1]["guidance"]
        assert g.tolist() == [2.0]
    else:
        assert kwargs["guidance"] is None and f_kwargs["guidance"] is None
    pred = fam.predict(fam.model, latent, t_idx, cond)
    assert pred.shape == (1, 16, 8, 8) and pred.dtype == torch.float32
    close(pred, unpack(out[0], 8, 8), msg="transformer output, unpacked")


def test_flux_predict_packs_and_unpacks(family, gen):
    """With a denoiser that returns its tokens, ``predict`` gives back x_t: the unpacking inverts the packing,
    whose tokens are pack()'s, with image ids (0, row, col) of each 2x2 patch in that order (here non-square)."""
    fam = family("flux")
    seen = {}

    def echo(hidden_states, **kwargs):
        seen.update(kwargs, hidden_states=hidden_states)
        return SimpleNamespace(sample=hidden_states)

    x_t = torch.randn(3, 16, 8, 12, generator=gen)
    out = fam.predict(echo, x_t, torch.tensor([0, 10, 999]), fam.encode_prompts([PROMPT, OTHER, PROMPT]))
    assert out.shape == x_t.shape and torch.equal(out, x_t)
    assert torch.equal(seen["hidden_states"], pack(x_t))
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    assert torch.equal(seen["img_ids"], torch.stack([torch.zeros(24), rows.flatten(), cols.flatten()], 1).float())
    assert torch.equal(seen["txt_ids"], torch.zeros(512, 3))
    close(seen["timestep"], fam.process.timesteps[torch.tensor([0, 10, 999])] / 1000, rtol=0, atol=0)
    assert seen["guidance"].tolist() == [3.5] * 3
    # and the real transformer: (B, 16, 8, 8) back, each sample as if alone
    x_t = torch.randn(2, 16, 8, 8, generator=gen)
    t = torch.tensor([0, 500])
    cond = fam.encode_prompts([PROMPT, OTHER])
    pred = fam.predict(fam.model, x_t, t, cond)
    assert pred.shape == (2, 16, 8, 8) and pred.dtype == torch.float32 and bool(torch.isfinite(pred).all())
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in cond.items()}
        close(pred[i:i + 1], fam.predict(fam.model, x_t[i:i + 1], t[i:i + 1], one), msg=f"sample {i}")


# ----------------------------------------------------------------------------- latents


@pytest.mark.parametrize("key,scale,shift", [("sd3", 1.5305, 0.0609), ("flux", 0.3611, 0.1159)])
def test_encode_decode_use_vae_shift_and_scale(family, folders, key, scale, shift, gen):
    fam = family(key)
    vae = AutoencoderKL.from_pretrained(str(folders[key]), subfolder="vae").eval()
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (scale, shift)
    assert (fam.scaling, fam.shift) == pytest.approx((scale, shift))
    images = torch.rand(10, 3, 16, 16, generator=gen) * 2 - 1  # 10 images: two chunks of encode's batch of 8
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    z = fam.encode(images)
    assert z.shape == (10, 16, 8, 8) and z.dtype == torch.float32
    close(z, (dist.mean - shift) * scale, msg="encode")
    mean, std = fam.encode(images, std=True)
    close(mean, z, rtol=0, atol=0)
    close(std, dist.std * scale, msg="encode std")
    z = torch.randn(2, 16, 8, 8, generator=gen)
    with torch.no_grad():
        want = vae.decode(z / scale + shift).sample
    x = fam.decode(z, grad=False)
    assert x.shape == (2, 3, 16, 16)
    close(x, want, msg="decode")
    zg = z.clone().requires_grad_()
    xg = fam.decode(zg, grad=True)  # checkpointed: the same pixels, and a gradient to the latents
    close(xg.detach(), want, msg="decode grad")
    xg.sum().backward()
    assert zg.grad is not None and float(zg.grad.abs().sum()) > 0
    close(fam.decode(z, grad=False, unscale=False), vae.decode(z).sample.detach(), msg="decode unscale=False")


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("key", ["sd3", "flux"])
def test_lora_targets_exist_in_the_transformer(family, key):
    fam = family(key)
    cfg = fam.lora_config(4, None)
    assert cfg.r == 4 and cfg.lora_alpha == 4 and fam.lora_config(4, 8.0).lora_alpha == 8.0
    model = copy.deepcopy(fam.model)  # the module-scoped family's model stays without adapters
    names = [n for n, _ in model.named_modules()]
    targets = {n for n in names for tgt in fam.lora_targets if n == tgt or n.endswith("." + tgt)}
    for tgt in fam.lora_targets:
        found = [n for n in names if n.endswith("." + tgt)]
        # the tiny SD3 has one joint block, the last: context_pre_only, it has no to_add_out (SD3's last block neither)
        if not (key == "sd3" and tgt == "attn.to_add_out"):
            assert found, f"LoRA target {tgt} is in no module of the tiny {key} transformer"
    model.add_adapter(cfg)
    wrapped = {n[: -len(".lora_A")] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert len(wrapped) > 0 and wrapped == targets
    assert len(wrapped) == (7 if key == "sd3" else 15)
    if key == "flux":
        assert "transformer_blocks.0.ff.net.2" in wrapped and "transformer_blocks.0.ff_context.net.2" in wrapped
