"""`dsfast plan` arithmetic on a tiny SD-structured architecture (meta device: no weights, seconds)."""
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
    p = _count(planner.models(0)[0])[1]
    base = planner.predict(OPTIONS["dsfast"], 4, 32)
    assert (base["weights"], base["grads"], base["optimizer"], base["host"]) == (4 * p, 4 * p, 8 * p, 0)
    z2 = planner.predict(Option("z2", zero_stage=2, world=2, space="latent"), 4, 32)
    assert (z2["weights"], z2["grads"], z2["optimizer"]) == (4 * p, 2 * p, 6 * p)  # fp32 partition copy included
    states = 4 * p + 2 * p + 6 * p + z2["frozen"] + z2["inputs"]
    # the reduce bucket (the trainer's default holds every gradient: 4p) with the UNet's activations
    assert z2["device"] == states + z2["activations"] + 4 * p
    z2b = planner.predict(Option("z2b", zero_stage=2, world=2, space="latent", reduce_bucket=5 * 10**8), 4, 32)
    assert z2b["device"] - z2["device"] == 4 * (5 * 10**8 - p)  # a config's value is counted as set
    # pixel space: the bucket comes after the decoder's backward freed more than it
    z2p = planner.predict(Option("z2p", zero_stage=2, world=2), 4, 32)
    assert z2p["device"] == states + z2p["activations"]
    # offload: fp32 master, its gradient, a staging copy of the weights (+ the accumulation buffer), moments
    z2o = planner.predict(Option("z2o", zero_stage=2, world=2, offload_optimizer=True), 4, 32)
    assert (z2o["grads"], z2o["optimizer"], z2o["host"]) == (0, 0, 2 * p + 2 * p + 2 * p + 4 * p)
    z2a = planner.predict(Option("z2a", zero_stage=2, world=2, offload_optimizer=True, micro_batch=1), 4, 32)
    assert z2a["host"] == z2o["host"] + 2 * p
    # ZeRO-3: weight partition, gradient partition, master and its gradient, moments on the host; the bucket
    # and the gathered weights on the device
    z3o = planner.predict(OPTIONS["zero3-offload"], 4, 32)
    assert z3o["weights"] == 0 and z3o["host"] == 2 * p + 2 * p + 2 * p + 2 * p + 4 * p
    assert z3o["device"] == z3o["frozen"] + z3o["inputs"] + 4 * p + 4 * p + z3o["activations"]
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
    held = steady["weights"] + steady["frozen"] + steady["inputs"]
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
