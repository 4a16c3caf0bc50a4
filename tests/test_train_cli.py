"""Fast checks of the trainer's entry points (no training): stock DeepSpeed JSON, `dsfast dreambooth` flags,
`--help` texts, missing pretrained models, output folders and resume folders that cannot be used."""
import argparse
import json
import re

import pytest

from dsfast.train import cli as train_cli
from dsfast.train import dreambooth_cli, sample
from dsfast.train.config import ConfigError, load_config, resolve
from dsfast.train.ds_config import REDUCE_BUCKET, build_ds_config, size_zero_buffers
from dsfast.train.errors import ModelError
from dsfast.train.models import describe
from dsfast.train.testing import HF_ZERO2_JSON

BASE = {"model": {"pretrained": "m"}, "data": {"instance_dir": "imgs"}, "output_dir": "out"}


def _stock(tmp_path, **changes):
    ds = json.loads(json.dumps(HF_ZERO2_JSON))
    for dotted, value in changes.items():
        node = ds
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    return str(f)


def _ds(cfg, world=1):
    r = resolve(cfg, "unet2d", world=world)
    return r, build_ds_config(r.train, r.deepspeed, world)


def test_stock_json_auto_is_filled(tmp_path):
    cfg = load_config({**BASE, "deepspeed": {"config": _stock(tmp_path)}},
                      ["train.batch_size=8", "train.micro_batch_size=2", "train.lr=3e-4", "train.weight_decay=0.01",
                       "train.adam_beta2=0.99", "train.warmup_steps=5", "train.max_grad_norm=0.5"])
    # the JSON's concrete ZeRO set-up becomes the run's (the dsfast config did not set it)
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer) == (2, "cpu")
    r, ds = _ds(cfg, world=2)
    batches = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batches == (8, 2, 2)
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["betas"] == [0.9, 0.99]
    assert ds["optimizer"]["params"]["eps"] == 1e-8 and ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert ds["gradient_clipping"] == 0.5 and ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False
    assert ds["fp16"]["loss_scale_window"] == 1000 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["steps_per_print"] == 2000
    assert "scheduler" not in ds and r.train.warmup_steps == 5  # WarmupLR = dsfast's linear warm-up
    assert "auto" not in json.dumps(ds)


def test_stock_json_concrete_values_are_adopted(tmp_path):
    f = _stock(tmp_path, train_batch_size=12, optimizer__params__lr=2e-5, scheduler__params__warmup_num_steps=7,
               bf16__enabled=True)
    r, ds = _ds(load_config({**BASE, "deepspeed": {"config": f}}))
    assert (r.train.batch_size, r.train.lr, r.train.warmup_steps, r.train.mixed_precision) == (12, 2e-5, 7, "bf16")
    assert ds["train_batch_size"] == 12 and ds["bf16"]["enabled"] is True


@pytest.mark.parametrize("changes, over, keys", [
    (dict(train_batch_size=16), ["train.batch_size=4"], ("train_batch_size=16", "train.batch_size=4")),
    (dict(optimizer__params__lr=1e-3), ["train.lr=1e-4"], ("optimizer.params.lr=0.001", "train.lr=")),
    (dict(gradient_clipping=2.0), ["train.max_grad_norm=1.0"], ("gradient_clipping=2.0", "train.max_grad_norm=1.0")),
    (dict(), ["deepspeed.zero_stage=0"], ("zero_optimization.stage=2", "deepspeed.zero_stage=0")),
    (dict(bf16__enabled=True), ["train.mixed_precision=fp16"], ("bf16.enabled=true", "train.mixed_precision='fp16'")),
])
def test_stock_json_contradiction_is_one_error_naming_both(tmp_path, changes, over, keys):
    with pytest.raises(ConfigError) as exc:
        load_config({**BASE, "deepspeed": {"config": _stock(tmp_path, **changes)}}, over)
    msg = str(exc.value)
    assert "\n" not in msg and all(k in msg for k in keys), msg


def test_stock_json_gradient_accumulation_contradiction(tmp_path):
    cfg = load_config({**BASE, "deepspeed": {"config": _stock(tmp_path, gradient_accumulation_steps=4)}},
                      ["train.batch_size=4", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4 contradicts train.batch_size"):
        _ds(cfg)


@pytest.mark.parametrize("changes, match", [
    (dict(optimizer={"type": "Lamb", "params": {}}), "optimizer type 'Lamb' is not supported.*train.lr"),
    (dict(scheduler={"type": "WarmupDecayLR", "params": {}}), "scheduler type 'WarmupDecayLR'.*train.warmup_steps"),
    (dict(scheduler__params__warmup_type="log"), "warmup_type='log'.*linear"),
])
def test_stock_json_other_optimizer_or_scheduler_is_refused(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        load_config({**BASE, "deepspeed": {"config": _stock(tmp_path, **changes)}})


def test_stock_json_missing_or_broken(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config({**BASE, "deepspeed": {"config": str(tmp_path / "nope.json")}})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config({**BASE, "deepspeed": {"config": str(tmp_path / "bad.json")}})


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_buffers_sized_by_the_model_unless_set(tmp_path, stage):
    _, ds = _ds(load_config(BASE, [f"deepspeed.zero_stage={stage}"]))
    zero = size_zero_buffers(ds, 8_600_000)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 8_600_000  # not DeepSpeed's 5e8 (2 GiB in float32)
    assert zero.get("stage3_param_persistence_threshold") == (0 if stage == 3 else None)
    big = size_zero_buffers(_ds(load_config(BASE, [f"deepspeed.zero_stage={stage}"]))[1], 10**9)["zero_optimization"]
    assert big["reduce_bucket_size"] == REDUCE_BUCKET and "stage3_param_persistence_threshold" not in big
    # a stock JSON's value is kept; its "auto" is the dsfast value
    for value, want in ((2e8, 2e8), ("auto", 8_600_000)):
        f = _stock(tmp_path, zero_optimization__stage=stage, zero_optimization__reduce_bucket_size=value)
        _, ds = _ds(load_config({**BASE, "deepspeed": {"config": f}}))
        assert size_zero_buffers(ds, 8_600_000)["zero_optimization"]["reduce_bucket_size"] == want


# ----------------------------------------------------------------------------- dsfast dreambooth

def _flags(*argv, world=1):
    args, extra = dreambooth_cli.parser().parse_known_args(list(argv))
    assert not extra
    return dreambooth_cli.flags_to_config(args, world=world)


COMMON = ["--pretrained_model_name_or_path", "sd", "--instance_data_dir", "dog", "--instance_prompt", "a sks dog"]


@pytest.mark.quant  # --use_8bit_adam: resolve checks that bitsandbytes is installed
def test_dreambooth_flags_map_onto_the_config():
    cfg = _flags(*COMMON, "--class_data_dir", "cls", "--class_prompt", "a dog", "--with_prior_preservation",
                 "--prior_loss_weight", "0.5", "--num_class_images", "50", "--resolution", "64",
                 "--train_batch_size", "2", "--gradient_accumulation_steps", "3", "--learning_rate", "2e-6",
                 "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10", "--max_train_steps", "40",
                 "--checkpointing_steps", "20", "--resume_from_checkpoint", "latest", "--gradient_checkpointing",
                 "--mixed_precision", "bf16", "--output_dir", "out", "--seed", "7", "--rank", "8", "--use_8bit_adam",
                 world=2)
    assert cfg == {
        "method": "dreambooth",
        "model": {"pretrained": "sd", "lora_rank": 8},
        "data": {"instance_dir": "dog", "instance_prompt": "a sks dog", "class_prompt": "a dog", "class_dir": "cls",
                 "num_class_images": 50, "resolution": 64},
        "loss": {"prior": 0.5},
        # per-device batch 2 x 3 accumulation steps x 2 ranks = a global batch of 12
        "train": {"max_steps": 40, "lr": 2e-6, "warmup_steps": 10, "seed": 7, "mixed_precision": "bf16",
                  "gradient_checkpointing": True, "optimizer": "adamw8bit", "micro_batch_size": 2, "batch_size": 12,
                  "resume": "latest"},
        "output_dir": "out",
        "checkpoint_every": 20,
    }
    r = resolve(load_config(cfg), "sd", world=2)
    assert (r.train.batch_size, r.train.micro_batch_size) == (12, 2)  # 3 micro-batches per rank


def test_dreambooth_domainstudio_flags():
    cfg = _flags(*COMMON, "--method", "domainstudio", "--class_prompt", "a dog", "--lambda_img", "50",
                 "--lambda_hf", "20", "--lambda_hfmse", "0", "--train_batch_size", "4")
    assert cfg["method"] == "domainstudio" and cfg["loss"] == {"prior": 0.0, "image": 50.0, "hf": 20.0, "hfmse": 0.0}
    assert cfg["train"]["batch_size"] == 4 and cfg["train"]["warmup_steps"] == 0


def test_dreambooth_flags_of_the_sdxl_sd3_flux_scripts():
    cfg = _flags(*COMMON, "--pretrained_vae_model_name_or_path", "vae-fix", "--weighting_scheme", "logit_normal",
                 "--logit_mean", "0.5", "--logit_std", "2", "--mode_scale", "1.1", "--precondition_outputs", "1",
                 "--guidance_scale", "1.0", "--max_sequence_length", "77", "--cache_latents")
    assert cfg["model"] == {"pretrained": "sd", "vae": "vae-fix", "guidance": 1.0, "max_sequence_length": 77}
    assert {k: cfg["train"][k] for k in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale",
                                         "precondition_outputs")} == {
        "weighting_scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 2.0, "mode_scale": 1.1,
        "precondition_outputs": True}
    r = resolve(load_config(cfg), "flux")
    assert (r.train.weighting_scheme, r.model.guidance, r.model.vae) == ("logit_normal", 1.0, "vae-fix")
    # a flag the model family cannot honour is one error naming it
    with pytest.raises(ConfigError, match="model.guidance applies to flux models only; the model is sd3"):
        resolve(load_config(cfg), "sd3")
    with pytest.raises(ConfigError, match="train.weighting_scheme applies to sd3, flux models only; the model is sdxl"):
        resolve(load_config(_flags(*COMMON, "--weighting_scheme", "cosmap")), "sdxl")


def test_family_defaults_resolve_per_family():
    base = _flags(*COMMON, "--method", "domainstudio", "--class_prompt", "a dog", "--train_batch_size", "4")
    got = {f: (r.loss.space, r.loss.hfmse_weighting, r.train.weighting_scheme)
           for f in ("sd", "sdxl", "sd3", "flux") for r in [resolve(load_config(base), f)]}
    assert got == {"sd": ("pixel", "min_snr", "none"), "sdxl": ("latent", "min_snr", "none"),
                   "sd3": ("latent", "none", "logit_normal"), "flux": ("latent", "none", "none")}


@pytest.mark.parametrize("argv, match", [
    (["--scale_lr"], "unsupported flag --scale_lr: dsfast does not scale"),
    (["--caption_column", "text"], "--caption_column text: dsfast reads captions from the metadata.jsonl of a local "
                                   "--instance_data_dir .* dog has none"),
    (["--num_train_epochs=3"], "unsupported flag --num_train_epochs: use --max_train_steps"),
    (["--frobnicate", "1"], "unsupported flag --frobnicate: not a train_dreambooth.py flag"),
    (["--lambda_img", "3"], "add --method domainstudio"),
    (["--lr_warmup_steps", "100"], "constant_with_warmup"),
    (["--prior_loss_weight", "1"], "needs --with_prior_preservation"),
])
def test_dreambooth_bad_flags_are_one_clear_error(argv, match, capsys):
    assert dreambooth_cli.main(COMMON + argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dsfast dreambooth: error:" in err
    assert re.search(match, err), err


# ----------------------------------------------------------------------------- --help texts

def _help(main, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_every_config_key(capsys):
    out = _help(train_cli.main, capsys)
    for key, default in [("train.lr", "(method / model default)"), ("train.max_steps", "800"),
                         ("deepspeed.zero_stage", "2"), ("model.pretrained", "required"), ("sample_every", "500"),
                         ("loss.tau", "1.0")]:
        line = next(x for x in out.splitlines() if x.split() and x.split()[0] == key)
        assert default in line and len(line.split()) > 2, line  # key, default and a help text
    assert "``" not in out
    loss = {x.split()[0]: x for x in out.splitlines() if x.split() and x.split()[0].startswith("loss.")}
    assert loss["loss.image"].endswith("[domainstudio]") and loss["loss.backend"].endswith("[domainstudio]")
    assert not loss["loss.prior"].endswith("]") and not loss["loss.mode"].endswith("]")  # every method has them


def test_sample_and_dreambooth_help_have_text_for_every_option(capsys):
    for mod in (sample, dreambooth_cli):
        actions = [a for a in mod.parser()._actions if a.help != argparse.SUPPRESS]
        assert len(actions) > 5 and all(a.help for a in actions), [a.dest for a in actions if not a.help]
        assert "``" not in _help(mod.main, capsys)


# ----------------------------------------------------------------------------- missing models

def test_missing_local_model_folder_is_one_line(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as exc:
        describe(str(tmp_path / "models" / "mymodel"))
    assert "\n" not in str(exc.value)


def test_uncached_hub_id_offline_fails_at_once(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="a local pipeline folder or a cached hub id is needed") as exc:
        describe("models/mymodel")
    assert time.perf_counter() - t0 < 5 and "\n" not in str(exc.value)  # no hub retries


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_output_dir_that_cannot_be_a_folder_is_refused_before_loading(tmp_path, capsys, where):
    """Checked before the model is looked at (the model path here does not even exist): one line, exit 1."""
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    out = blocker if where == "file" else blocker / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"method": "domainstudio", "model": {"pretrained": str(tmp_path / "no_model")},
                               "data": {"instance_dir": str(tmp_path / "no_images")}, "output_dir": str(out)}))
    assert train_cli.main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"output_dir {out}" in err[0] and "no_model" not in err[0], err
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("resume", ["missing", "empty"])
def test_resume_from_a_folder_that_is_no_checkpoint_writes_nothing(tmp_path, capsys, resume):
    """Checked before anything is written or loaded: the run folder's config.yaml stays as it was."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("an earlier run's config")
    (tmp_path / "empty").mkdir()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"method": "domainstudio", "model": {"pretrained": str(tmp_path / "no_model")},
                               "data": {"instance_dir": str(tmp_path / "no_images")}, "output_dir": str(run)}))
    assert train_cli.main(["--config", str(cfg), "--resume", str(tmp_path / resume)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.resume=" in err[0], err
    assert (run / "config.yaml").read_text() == "an earlier run's config"


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_official_mode_is_refused_where_no_released_code_exists(family):
    cfg = _flags(*COMMON, "--method", "domainstudio", "--class_prompt", "a dog", "--train_batch_size", "4",
                 "--with_prior_preservation")
    cfg["loss"]["mode"] = "official"
    with pytest.raises(ConfigError, match=f"exists for unet2d and sd models only; the model is {family}"):
        resolve(load_config(cfg), family)
    assert resolve(load_config(cfg), "sd").loss.mode == "official"
