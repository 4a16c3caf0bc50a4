"""`dsfast plan` arithmetic on a tiny SD-structured architecture (meta device: no weights, seconds)."""
import importlib

import pytest

from dsfast.plan import OPTIONS, Option, Planner, _count, largest_micro_batch, main

TINY = dict(
    family="text2image", resolution=32, text_len=8,
    unet=dict(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=4,
              norm_num_groups=4, layers_per_block=1, sample_size=8),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8),
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             layers_per_block=1, norm_num_groups=4),
    text=[dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
               max_position_embeddings=8)])


@pytest.fixture(scope="module")
def planner():
    return Planner(TINY)


def test_model_states_by_zero_stage_and_offload(planner):
    from dsfast.plan import _buffer_bytes

    p = _count(planner.models(0)[0])[1]
    # the text encoder: on the CPU once the prompts are encoded
    text = sum(_count(t)[0] * 4 + _buffer_bytes(t, 4) for t in planner.models(0)[2])
    base = planner.predict(OPTIONS["dsfast"], 4, 32)
    assert (base["weights"], base["grads"], base["optimizer"], base["host"]) == (4 * p, 4 * p, 8 * p, text)
    z2 = planner.predict(Option("z2", zero_stage=2, world=2, space="latent"), 4, 32)
    assert (z2["weights"], z2["grads"], z2["optimizer"]) == (4 * p, 2 * p, 6 * p)  # fp32 partition copy included
    states = 4 * p + 2 * p + 6 * p + z2["frozen"] + z2["inputs"] + z2["cached"]
    # the reduce bucket (the trainer's default holds every gradient: 4p) with the UNet's held activations
    assert z2["device"] == states + max(z2["activations"], z2["activations_held"] + 4 * p) + z2["features"]
    assert z2["activations_held"] + 4 * p > z2["activations"]
    z2b = planner.predict(Option("z2b", zero_stage=2, world=2, space="latent", reduce_bucket=5 * 10**8), 4, 32)
    assert z2b["device"] - z2["device"] == 4 * (5 * 10**8 - p)  # a config's value is counted as set
    # pixel space: the bucket comes after the decoder's backward freed more than it
    z2p = planner.predict(Option("z2p", zero_stage=2, world=2), 4, 32)
    assert z2p["device"] == states + z2p["activations"] + z2p["features"]
    # offload: fp32 master, its gradient, a staging copy of the weights (+ the accumulation buffer), moments
    z2o = planner.predict(Option("z2o", zero_stage=2, world=2, offload_optimizer=True), 4, 32)
    assert (z2o["grads"], z2o["optimizer"], z2o["host"]) == (0, 0, text + 2 * p + 2 * p + 2 * p + 4 * p)
    z2a = planner.predict(Option("z2a", zero_stage=2, world=2, offload_optimizer=True, micro_batch=1), 4, 32)
    assert z2a["host"] == z2o["host"] + 2 * p
    # ZeRO-3: weight partition, gradient partition, master and its gradient, moments on the host; the bucket
    # and the gathered weights on the device
    z3o = planner.predict(OPTIONS["zero3-offload"], 4, 32)
    assert z3o["weights"] == 0 and z3o["host"] == text + 2 * p + 2 * p + 2 * p + 2 * p + 4 * p
    assert z3o["device"] == (z3o["frozen"] + z3o["inputs"] + z3o["cached"] + 4 * p + 4 * p + z3o["activations"]
                             + z3o["features"])
    assert z3o["total"] == z3o["device"] + z3o["host"]
    bf16 = planner.predict(Option("bf16", precision="bf16"), 4, 32)
    assert (bf16["weights"], bf16["grads"], bf16["optimizer"]) == (2 * p, 2 * p, 12 * p)


def test_option_from_config_keeps_a_stock_json_bucket(tmp_path):
    import json

    from dsfast.plan import option_from_config
    from dsfast.train.config import load_config
    from dsfast.train.testing import HF_ZERO2_JSON

    f = tmp_path / "ds.json"
    f.write_text(json.dumps(HF_ZERO2_JSON))
    base = {"model": {"pretrained": "m"}, "data": {"instance_dir": "d"}, "output_dir": "o"}
    assert option_from_config(load_config({**base, "deepspeed": {"config": str(f)}}), 2).reduce_bucket == 2 * 10**8
    assert option_from_config(load_config(base), 2).reduce_bucket is None
    low = option_from_config(load_config({**base, "model": {"pretrained": "m", "lora_rank": 4, "quantize": "nf4",
                                                            "drop_text_encoders": True},
                                          "train": {"optimizer": "adamw8bit"}}), 1)
    assert (low.quantize, low.optimizer, low.drop_text) == ("nf4", "adamw8bit", True)


def test_lora_trains_only_adapters(planner):
    full, lora = planner.predict(OPTIONS["dsfast"], 4, 32), planner.predict(OPTIONS["dsfast+lora"], 4, 32)
    assert lora["weights"] < full["weights"] / 5
    assert lora["frozen"] > full["frozen"]  # the base UNet is frozen weight now


def test_activations_scale_with_micro_batch_and_options(planner):
    one = planner.predict(Option("m1", micro_batch=1), 16, 32)
    two = planner.predict(Option("m2", micro_batch=2), 16, 32)
    assert abs(two["activations"] - 2 * one["activations"]) <= 2
    # the two-pass scheme's gathered x0 and its gradient: 2 x global batch x 3x32x32 float32
    assert two["features"] == one["features"] == 2 * 16 * 3 * 32 * 32 * 4
    # the micro-batches of the rank's share of the batch: image + instance/class latents and noise (4x16x16 each)
    assert one["inputs"] == 16 * (3 * 32 * 32 + 4 * 4 * 16 * 16) * 4
    assert planner.predict(Option("w2", world=2, zero_stage=1), 16, 32)["inputs"] == one["inputs"] // 2
    a = {k: planner.predict(OPTIONS[k], 4, 64)["activations"] for k in ("official", "dsfast", "dsfast+latent",
                                                                         "dsfast+ckpt")}
    assert a["official"] > a["dsfast"] > a["dsfast+ckpt"] and a["dsfast"] > a["dsfast+latent"]


def test_first_step_holds_optimizer_or_activations(planner):
    steady = planner.predict(OPTIONS["dsfast"], 4, 32)
    first = planner.predict(OPTIONS["dsfast"], 4, 32, first_step=True)
    held = steady["weights"] + steady["frozen"] + steady["inputs"] + steady["cached"]
    g, act, opt = steady["grads"], steady["activations"], steady["optimizer"]
    assert first["device"] == held + max(act, g + opt)  # no ZeRO: gradients appear as activations go
    assert steady["device"] == held + opt + max(act, g)
    # offloaded moments, too, come with the first step, when the activations are gone
    p = _count(planner.models(0)[0])[1]
    z3 = [planner.predict(OPTIONS["zero3-offload"], 4, 32, first_step=f) for f in (False, True)]
    assert z3[1]["total"] == z3[0]["total"] - 4 * p and z3[1]["device"] == z3[0]["device"]
    z1 = planner.predict(Option("z1", zero_stage=1), 4, 32)  # ZeRO holds gradient buffers throughout
    assert z1["device"] == held + z1["grads"] + z1["optimizer"] + act


def test_largest_micro_batch(planner):
    opt = OPTIONS["dsfast"]
    peak = {m: planner.predict(Option("m", micro_batch=m), 16, 32)["device"] for m in (1, 2, 4, 8, 16)}
    assert largest_micro_batch(planner, opt, 16, 32, peak[4] + 1) == 4
    assert largest_micro_batch(planner, opt, 16, 32, peak[1] - 1) == 0
    assert largest_micro_batch(planner, opt, 16, 32, 1e18) == 16


def test_cli_bad_config(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("method: nope\n")
    assert main(["--config", str(f)]) == 1
    assert "dsfast plan: error" in capsys.readouterr().err


def test_cli_from_run_config(tmp_path, capsys):
    import yaml

    from dsfast.train.testing import make_sd_pipeline, tiny_config

    make_sd_pipeline(tmp_path / "model")
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(tiny_config(tmp_path, tmp_path / "model", tmp_path / "imgs",
                                            model__lora_rank=4, loss__space="latent")))
    assert main(["--config", str(f), "--gpu", "8,16"]) == 0
    out = capsys.readouterr().out
    assert "| config | 16 |" in out and "8 GB: largest micro-batch" in out


def _config_only_sd_pipeline(path):
    """A text-to-image pipeline folder with its config files only (what both the trainer and plan read first):
    a 2-level UNet under a 2-level VAE, so the resolution must be a multiple of 4."""
    import json

    for sub, cfg in (("unet", dict(TINY["unet"], _class_name="UNet2DConditionModel")),
                     ("vae", dict(TINY["vae"], _class_name="AutoencoderKL")), ("text_encoder", TINY["text"][0])):
        (path / sub).mkdir(parents=True)
        (path / sub / "config.json").write_text(json.dumps(cfg))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": [],
                                                       "vae": [], "text_encoder": [], "tokenizer": []}))


@pytest.mark.parametrize("resolution", [18, 30, 6])
def test_cli_refuses_the_resolution_the_trainer_refuses(tmp_path, capsys, resolution):
    """One rule (dsfast.train.config.check_resolution) with the model's factor read the same way: the trainer's
    error is plan's, before any work (plan used to predict for any resolution)."""
    import yaml

    from dsfast.train.config import ConfigError, load_config, resolve
    from dsfast.train.models import describe

    _config_only_sd_pipeline(tmp_path / "model")
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"model": {"pretrained": str(tmp_path / "model")}, "output_dir": str(tmp_path / "o"),
                                 "data": {"instance_dir": "d", "resolution": resolution},
                                 "train": {"batch_size": 4}}))
    info = describe(str(tmp_path / "model"))
    with pytest.raises(ConfigError) as trainer:
        resolve(load_config(f), info.family, down_factor=info.down_factor)
    assert main(["--config", str(f)]) == 1
    assert capsys.readouterr().err == f"dsfast plan: error: {trainer.value}\n"
    assert main(["--config", str(f), "--resolution", f"16,{resolution}"]) == 1
    assert capsys.readouterr().err == f"dsfast plan: error: {trainer.value}\n".replace("data.resolution=", "--resolution=")


# ----------------------------------------------------------------------------------------- model families
# the preset of each family the trainer trains (dsfast.train.families)
FAMILY_PRESETS = {"adm256": "unet2d", "sd15": "sd", "sdxl": "sdxl", "sd3-medium": "sd3", "sd35-large": "sd3",
                  "flux-dev": "flux"}


def test_a_preset_for_every_family_the_trainer_trains_and_none_other():
    from dsfast.plan import PRESETS, family_name
    from dsfast.train.families import NAMES

    assert {k: family_name(PRESETS[k]) for k in FAMILY_PRESETS} == FAMILY_PRESETS
    assert set(FAMILY_PRESETS.values()) == set(NAMES)
    assert {family_name(spec) for spec in PRESETS.values()} <= set(NAMES)


@pytest.mark.parametrize("preset, denoiser, text", [
    ("sd3-medium", 2.028e9, [0.1237e9, 0.6947e9, 4.762e9]),  # MMDiT 2 B; CLIP-L, CLIP-G, T5-XXL encoder
    ("sd35-large", 8.057e9, [0.1237e9, 0.6947e9, 4.762e9]),
    ("flux-dev", 11.901e9, [0.1231e9, 4.762e9]),  # FLUX.1-dev 12 B; CLIP-L, T5-XXL encoder
    ("sdxl", 2.567e9, [0.1231e9, 0.6947e9]),
])
def test_published_parameter_counts(preset, denoiser, text):
    """The presets' architectures on the meta device have the published sizes (to 0.1 %)."""
    from dsfast.plan import PRESETS

    d, _, encoders = Planner(PRESETS[preset]).models(0)
    assert _count(d)[0] == pytest.approx(denoiser, rel=1e-3)
    assert [_count(t)[0] for t in encoders] == pytest.approx(text, rel=1e-3)


@pytest.mark.parametrize("preset", ["sd3-small", "flux-small"])
@pytest.mark.slow
def test_a_saved_pipeline_plans_as_its_preset_and_lora_sits_where_the_trainer_puts_it(tmp_path, preset):
    """spec_from_pretrained reads an SD3 / FLUX.1 folder (transformer, VAE, CLIP and T5 configs) into the preset's
    architecture; LoRA adapters cover the parameters the trainer's own loading makes trainable."""
    import torch

    from dsfast.plan import PRESETS, build_pipeline, spec_from_pretrained
    from dsfast.train.models import describe, load, lora_config

    build_pipeline(preset, tmp_path / "m")
    preset_spec = PRESETS[preset]
    spec = spec_from_pretrained(tmp_path / "m", preset_spec["t5_len"])
    info = describe(str(tmp_path / "m"))  # the trainer's reading of the folder: plan's default resolution is its
    assert spec["denoiser"] == preset_spec["denoiser"] and spec["resolution"] == info.default_resolution
    a, b = Planner(spec), Planner(preset_spec)
    for name in ("dsfast", "dsfast+lora+ckpt", "zero2-offload"):
        assert a.predict(OPTIONS[name], 8, 128) == b.predict(OPTIONS[name], 8, 128)
    bundle = load(info, str(tmp_path / "m"), dtype=torch.float32, lora=lora_config(info, 8, None), frozen_source=False,
                  device=torch.device("cpu"))
    trained = sum(p.numel() for p in bundle.unet.parameters() if p.requires_grad)
    assert trained == _count(a.models(8)[0])[1] > 0
    assert sum(p.numel() for p in bundle.unet.parameters()) == _count(a.models(8)[0])[0]


@pytest.mark.slow
def test_spec_from_the_trainers_tiny_family_pipelines(tmp_path):
    """The test pipelines of every text-to-image family (SD3 without T5 too) give specs whose meta models have
    the saved models' parameter counts."""
    from diffusers import DiffusionPipeline

    from dsfast.plan import family_name, spec_from_pretrained
    from dsfast.train.testing import make_flux_pipeline, make_sd3_pipeline, make_sd_pipeline, make_sdxl_pipeline

    for name, make, kw in (("sd", make_sd_pipeline, {}), ("sdxl", make_sdxl_pipeline, {}),
                           ("sd3", make_sd3_pipeline, {}), ("sd3", make_sd3_pipeline, {"t5": False}),
                           ("flux", make_flux_pipeline, {})):
        folder = make(tmp_path / f"{name}{len(kw)}", **kw)
        spec = spec_from_pretrained(folder)
        assert family_name(spec) == name
        pipe = DiffusionPipeline.from_pretrained(str(folder), **({"text_encoder_3": None, "tokenizer_3": None}
                                                                 if kw else {}))
        denoiser, vae, text = Planner(spec).models(0)
        real = getattr(pipe, "unet", None) or pipe.transformer
        assert _count(denoiser)[0] == sum(p.numel() for p in real.parameters())
        encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                    if getattr(pipe, n, None) is not None]
        assert sorted(_count(t)[0] for t in text) == sorted(sum(p.numel() for p in e.parameters()) for e in encoders)
        assert Planner(spec).predict(OPTIONS["dsfast+lora"], 4, spec["resolution"])["device"] > 0


@pytest.mark.parametrize("preset", ["sd3-small", "flux-small"])
def test_transformer_activations_are_linear_in_the_pixels(preset):
    """c + a·pixels from two probe sizes reproduces a third (the prompt tokens are the constant c)."""
    from dsfast.plan import PRESETS, _fit, _probe, spec_down_factor

    spec = PRESETS[preset]
    planner = Planner(spec)
    models, f = planner.models(0), spec_down_factor(spec)
    fit = _fit(spec, models, OPTIONS["dsfast"], "latent", 4 * f, 8 * f)
    third = _probe(spec, models, OPTIONS["dsfast"], 6 * f, 1, "latent")
    px = (6 * f) ** 2
    for key in ("unet", "held", "checkpoint_kept"):
        c, a, b = fit[key]
        assert b == 0 and c > 0
        assert c + a * px == pytest.approx(third[key], rel=0.01)


@pytest.mark.parametrize("preset", ["sd-small", "sd3-small", "flux-small"])
@pytest.mark.slow
def test_live_bytes_on_meta_are_torch_profilers_peak_on_cpu(preset):
    """The probe's allocator model: the peak of live tensor bytes of the forward traced on the meta device (the
    fused-attention stand-in) equals torch.profiler's peak of the same forward run on the CPU."""
    import torch

    from bench.kernels import cpu_peak_extra_bytes
    from dsfast.plan import PRESETS, _denoiser, _forward, _probe

    spec = PRESETS[preset]
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = _denoiser(spec)
    z = torch.randn(2, spec["vae"]["latent_channels"], 16, 16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    real = cpu_peak_extra_bytes(lambda: _forward(spec, model, z))
    probed = _probe(spec, Planner(spec).models(0), OPTIONS["dsfast"], 128, 1, "latent")["unet"]
    assert probed == pytest.approx(real, rel=0.02)


def test_cli_preset_transformer_resolution_rule(capsys):
    """SD3 and FLUX train at multiples of 16 (8x VAE, 2x2 patches / packing), checked before any work."""
    assert main(["--preset", "flux-dev", "--resolution", "1000"]) == 1
    assert "--resolution=1000 must be divisible by the model's downsampling factor 16" in capsys.readouterr().err
    assert main(["--preset", "sd3-medium", "--resolution", "1016"]) == 1
    assert "downsampling factor 16" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_preset_flux_small(capsys):
    assert main(["--preset", "flux-small", "--gpu", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "| dsfast+lora+ckpt+bf16 | 128 |" in out and "| dsfast+pixel | 128 |" in out and "official" not in out


# ----------------------------------------------------------------------------------------- against measurements
@pytest.fixture(scope="module")
def measured_assets(tmp_path_factory):
    from bench.memory import make_assets

    root = tmp_path_factory.mktemp("mem")
    return root, {p: make_assets(root, p) for p in ("sd3-small", "flux-small")}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd3-small", "flux-small"])
@pytest.mark.parametrize("option", ["dsfast", "dsfast+lora"])
def test_plan_predicts_the_measured_cpu_peak_of_a_reduced_width_model(measured_assets, preset, option):
    """One DomainStudio training step of the trainer on a CPU (``bench.memory``: live tensors + torch.profiler's
    peak; full fine-tune and LoRA, 128 px, batch 4): ``dsfast plan`` within 15 % (its probe never sees it)."""
    from bench.memory import predicted_bytes, run_case
    from dsfast.plan import PRESETS

    root, assets = measured_assets
    row = run_case(dict(option=option, resolution=128, batch=4), assets[preset], root)
    assert row["status"] == "ok", row.get("reason")
    predicted = predicted_bytes(Planner(PRESETS[preset]), row)
    assert abs(predicted / row["peak_bytes"] - 1) < 0.15, (predicted, row["peak_bytes"])


def test_cli_from_a_flux_run_config(tmp_path, capsys):
    """--config on a FLUX.1 folder: its transformer, VAE and encoders read, model.max_sequence_length's T5 tokens."""
    import yaml

    from dsfast.train.testing import make_flux_pipeline, tiny_config, write_images

    make_flux_pipeline(tmp_path / "model")
    write_images(tmp_path / "imgs", 4, size=16)
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(tiny_config(tmp_path, tmp_path / "model", tmp_path / "imgs", model__lora_rank=4,
                                            model__max_sequence_length=32)))
    assert main(["--config", str(f), "--gpu", "8"]) == 0
    assert "| config | 16 |" in capsys.readouterr().out


def test_build_pipeline_writes_an_sd_scheduler_diffusers_does_not_flag(tmp_path):
    """The SD folder build_pipeline writes (bench, tests) has the scheduler settings StableDiffusionPipeline wants:
    with steps_offset 0 or clip_sample on, diffusers warns (printing the whole scheduler config) and rewrites them."""
    import json
    import warnings

    from dsfast.plan import build_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_pipeline("sd-small", tmp_path / "m")
    assert [str(w.message)[:200] for w in caught if issubclass(w.category, FutureWarning)] == []
    config = json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())
    assert config["steps_offset"] == 1 and config["clip_sample"] is False


# ----------------------------------------------------------------------------------------- frozen-weight options
def _tensor_bytes(t) -> int:
    """Bytes of a tensor, a quantized tensor subclass's being those of its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(_tensor_bytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def _lora_denoiser(spec):
    """The trainer's LoRA layout of a preset's denoiser, on the CPU with random weights."""
    import torch

    from dsfast.plan import _denoiser, _family

    torch.manual_seed(0)
    model = _denoiser(spec).requires_grad_(False)
    model.add_adapter(_family(spec).lora_config(8, None))
    return model


@pytest.mark.quant
@pytest.mark.parametrize("fmt", ["int8", "float8", "nf4"])
def test_quantized_frozen_bytes_are_what_the_libraries_hold(fmt):
    """The plan's saving from model.quantize is the bytes torchao's weight-only int8 / float8 and bitsandbytes' nf4
    hold for the frozen Linear weights (the LoRA adapters' base layers of the flux-small transformer, quantized on
    the CPU as diffusers' TorchAoConfig / BitsAndBytesConfig do it, layer by layer)."""
    import torch

    from dsfast.plan import PRESETS

    spec = PRESETS["flux-small"]
    model = _lora_denoiser(spec)
    base = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    before = sum(_tensor_bytes(m.weight) for m in base)
    if fmt == "nf4":
        bnb = importlib.import_module("bitsandbytes")
        after = 0
        for m in base:
            q = bnb.nn.Params4bit(m.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=False).to("cpu")
            after += _tensor_bytes(q) + _tensor_bytes(q.quant_state.absmax)
    else:
        ao = importlib.import_module("torchao.quantization")
        ao.quantize_(model, {"int8": ao.Int8WeightOnlyConfig, "float8": ao.Float8WeightOnlyConfig}[fmt](),
                     filter_fn=lambda m, _: any(m is b for b in base))
        after = sum(_tensor_bytes(m.weight) for m in base)
    planner = Planner(spec)
    plain = planner.predict(OPTIONS["dsfast+lora"], 4, 64)
    quant = planner.predict(Option("q", lora_rank=8, quantize=fmt), 4, 64)
    assert after < before and abs((plain["frozen"] - quant["frozen"]) - (before - after)) <= 1
    # torchao's linear saves a float32 copy of each weight for backward (no checkpointing: all of them)
    copies = 0 if fmt == "nf4" else before
    assert quant["activations_held"] - plain["activations_held"] == copies
    changed = ("frozen", "device", "total", "activations", "activations_held")
    assert {k: v for k, v in quant.items() if k not in changed} == {k: v for k, v in plain.items() if k not in changed}


@pytest.mark.quant
def test_adamw8bit_moments_are_bitsandbytes():
    """train.optimizer=adamw8bit: the moments the plan counts per tensor are those bitsandbytes' AdamW8bit allocates
    in its first step (8-bit states with a float32 absmax per 256-block for tensors of >= 4096 elements, float32
    for the others); the plan sums them over the trained parameters."""
    import torch

    bnb = importlib.import_module("bitsandbytes")
    from bench.kernels import cpu_peak_extra_bytes
    from dsfast.plan import PRESETS, adam8bit_cpu_temporaries, adam8bit_state_bytes

    sizes = (100, 3000, 4096, 4096 + 100, 65536)
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    # the first step allocates the states, and on the CPU its update's temporaries
    peak = cpu_peak_extra_bytes(opt.step)
    for p in params:
        held = sum(_tensor_bytes(v) for k, v in opt.state[p].items() if k in ("state1", "state2", "absmax1", "absmax2"))
        assert adam8bit_state_bytes(p.numel()) == held
    states = sum(adam8bit_state_bytes(n) for n in sizes)
    assert peak == pytest.approx(states + adam8bit_cpu_temporaries(sizes), rel=0.01)
    # the plan: per trained parameter of a full fine-tune (no ZeRO)
    planner = Planner(PRESETS["flux-small"])
    trained = [p.numel() for p in planner.models(0)[0].parameters()]
    adam8 = planner.predict(OPTIONS["dsfast+adam8"], 4, 64)
    assert adam8["optimizer"] == sum(adam8bit_state_bytes(n) for n in trained) < 8 * sum(trained) * 0.3


def test_dropped_text_encoders_leave_the_cached_prompts():
    from dsfast.plan import PRESETS, _buffer_bytes

    planner = Planner(PRESETS["flux-small"])
    text = sum(_count(t)[0] * 4 + _buffer_bytes(t, 4) for t in planner.models(8)[2])
    kept, dropped = planner.predict(OPTIONS["dsfast+lora"], 4, 64), planner.predict(OPTIONS["dsfast+lora+notext"], 4, 64)
    # kept, the trainer moves them to the CPU after encoding: host memory, not the device's
    assert kept["host"] - dropped["host"] == kept["total"] - dropped["total"] == text > 0
    assert kept["device"] == dropped["device"] and kept["cached"] == dropped["cached"]


@pytest.mark.parametrize("preset", ["sdxl-small", "flux-small"])
@pytest.mark.slow
def test_plan_predicts_the_committed_cpu_rows_of_the_frozen_weight_options(preset):
    """The rows bench/memory.py measured of the trainer's step with model.quantize=int8 / float8,
    model.drop_text_encoders and train.optimizer=adamw8bit (and the runs they change), committed under
    bench/results: the plan within 15 %."""
    from bench.memory import FROZEN_TERMS, RESULTS, load_rows, predicted_bytes
    from dsfast.plan import PRESETS

    rows = {r["option"]: r for r in load_rows(RESULTS / "intel-r-xeon-r-processor" / f"memory-train-cpu-{preset}.jsonl")
            if r["resolution"] == 64}
    assert set(FROZEN_TERMS) <= set(rows)
    planner = Planner(PRESETS[preset])
    for option in {*FROZEN_TERMS, *FROZEN_TERMS.values()}:
        row = rows[option]
        assert abs(predicted_bytes(planner, row) / row["peak_bytes"] - 1) <= 0.15, option
