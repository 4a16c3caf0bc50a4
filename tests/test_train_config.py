"""Config loading: unknown keys, dotted overrides, type coercion, method defaults (no training)."""
import re

import pydantic
import pytest

from dsfast.train import methods
from dsfast.train.config import RUN_CONFIGS, ConfigError, RunConfig, dump_config, load_config, parse_overrides, resolve

BASE = {"model": {"pretrained": "some/model"}, "data": {"instance_dir": "imgs"}, "output_dir": "out"}


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'train.learning_rate'"):
        load_config({**BASE, "train": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config({**BASE, "bogus": 1})
    with pytest.raises(ConfigError, match="'loss.weight'"):
        load_config(BASE, ["loss.weight=3"])


def test_dotted_overrides_and_coercion(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("method: finetune\nmodel: {pretrained: m}\ndata: {instance_dir: d}\ntrain: {lr: 1e-4}\n")
    cfg = load_config(f, ["train.lr=3e-5", "deepspeed.zero_stage=3", "train.gradient_checkpointing=true",
                          "loss.prior=2", "deepspeed.offload_param=cpu"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.deepspeed.zero_stage == 3 and cfg.train.gradient_checkpointing is True
    assert cfg.loss.prior == 2.0 and isinstance(cfg.loss.prior, float)
    assert cfg.output_dir.endswith("run")  # runs/<config stem>
    assert parse_overrides(["a.b=[1, 2]"]) == [("a.b", [1, 2])]
    with pytest.raises(ConfigError, match="key=value"):
        load_config(f, ["train.lr"])
    with pytest.raises(ConfigError, match="'train.max_steps'"):
        load_config(f, ["train.max_steps=abc"])


def test_yaml_1_2_booleans_in_overrides_and_files(tmp_path):
    # YAML 1.1 would read no/yes/on/off as booleans: mixed_precision=no would arrive as False
    cfg = load_config(BASE, ["train.mixed_precision=no", "train.gradient_checkpointing=true"])
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is True
    assert parse_overrides(["a=yes", "b=off", "c=False", "d=TRUE"]) == [("a", "yes"), ("b", "off"), ("c", False),
                                                                        ("d", True)]
    f = tmp_path / "run.yaml"
    f.write_text("model: {pretrained: m}\ndata: {instance_dir: d, random_flip: false}\n"
                 "train: {mixed_precision: no, gradient_checkpointing: True}\n")
    cfg = load_config(f)
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is True
    assert cfg.data.random_flip is False


@pytest.mark.parametrize("override, match", [
    ("method=dreamfusion", "'method'"),
    ("train.mixed_precision=fp8", "mixed_precision"),
    ("deepspeed.zero_stage=4", "zero_stage"),
    ("deepspeed.offload_param=cpu", "zero_stage=3"),
    ("loss.space=voxel", "loss.space"),
    ("loss.source=lora_off", "lora_rank"),
])
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(BASE, [override])


def test_required_keys():
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config({"data": {"instance_dir": "x"}})
    with pytest.raises(ConfigError, match="data.instance_dir"):
        load_config({"model": {"pretrained": "x"}})


def test_official_defaults():
    cfg = resolve(load_config(BASE), "unet2d")
    assert (cfg.loss.image, cfg.loss.hf, cfg.loss.hfmse) == (4.0, 4.0, 1.0)
    assert cfg.train.lr == 1e-4 and cfg.train.ema == 0.9999 and cfg.loss.source == "frozen"
    t2i = {**BASE, "data": {"instance_dir": "i", "instance_prompt": "a sks dog", "class_prompt": "a dog"}}
    cfg = resolve(load_config(t2i), "sd")
    assert (cfg.loss.prior, cfg.loss.image, cfg.loss.hf, cfg.loss.hfmse) == (1.0, 100.0, 100.0, 0.1)
    assert cfg.train.lr == 5e-6 and cfg.loss.source == "class_prompt"
    cfg = resolve(load_config({**t2i, "method": "dreambooth"}), "sd")
    assert cfg.loss.prior == 1.0 and cfg.train.lr == 5e-6
    with pytest.raises(ConfigError, match="text-to-image"):
        resolve(load_config({**BASE, "method": "dreambooth"}), "unet2d")
    with pytest.raises(ConfigError, match="class_prompt"):
        resolve(load_config({**BASE, "data": {"instance_dir": "i", "instance_prompt": "a sks dog"}}),
                         "sd")
    # explicit values win over the defaults
    raw = load_config(BASE, ["loss.image=1", "train.lr=2e-4"])
    cfg = resolve(raw, "unet2d")
    assert cfg.loss.image == 1.0 and cfg.train.lr == 2e-4
    assert raw.loss.hf is None and raw.train.micro_batch_size is None  # resolve returns a new config


# ----------------------------------------------------------------------------- per-method loss sections

T2I = {**BASE, "data": {"instance_dir": "i", "instance_prompt": "a sks dog", "class_prompt": "a dog"}}


def test_each_method_has_its_own_loss_section():
    for name in methods.NAMES:
        cfg = load_config({**T2I, "method": name})
        assert type(cfg) is RUN_CONFIGS[name] and isinstance(cfg, RunConfig)
        assert set(type(cfg.loss).model_fields) == set(methods.LOSS_CONFIGS[name].model_fields)
    assert set(methods.LOSS_CONFIGS["dreambooth"].model_fields) == {"mode", "prior"}
    assert {"image", "hf", "hfmse", "source", "space", "backend"} <= set(methods.LOSS_CONFIGS["domainstudio"].model_fields)
    # a key another method has, set to a value that would change training, is one error naming its method
    for method, key, value in [("dreambooth", "image", 4), ("finetune", "hfmse", 0.1), ("dreambooth", "tau", 0.5),
                               ("dreambooth", "num_anchors", 3), ("finetune", "backend", "triton")]:
        with pytest.raises(ConfigError, match=rf"'loss.{key}' belongs to method domainstudio; .* method is {method}"):
            load_config({**T2I, "method": method, "loss": {key: value}})
    # a key no method has lists the method's own keys
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.bogus' \(known keys under 'loss': mode, prior\)"):
        load_config({**T2I, "method": "dreambooth"}, ["loss.bogus=1"])
    with pytest.raises(ConfigError, match="'method' must be one of domainstudio, dreambooth, finetune; got 'dream'"):
        load_config({**T2I, "method": "dream"})
    with pytest.raises(ConfigError, match="'method' must be one of"):
        load_config({**T2I, "method": ["finetune"]})


def test_resolve_fills_only_the_methods_own_keys():
    cfg = resolve(load_config({**T2I, "method": "dreambooth"}), "sd")
    assert cfg.loss.model_dump() == {"mode": "dsfast", "prior": 1.0}
    cfg = resolve(load_config({**T2I, "method": "finetune"}), "sdxl")
    assert cfg.loss.model_dump() == {"mode": "dsfast", "prior": 0.0} and cfg.train.batch_size == 4
    cfg = resolve(load_config({**T2I, "method": "finetune", "loss": {"mode": "official"}}), "sd")
    assert cfg.loss.mode == "official"


# what the resolve step wrote into a dreambooth run's config.yaml before each method had its own loss section
OLD_RESOLVED_LOSS = {"mode": "dsfast", "prior": 1.0, "image": 0.0, "hf": 0.0, "hfmse": 0.0, "hfmse_weighting": "min_snr",
                     "stencil": "domainstudio", "space": "latent", "source": "frozen", "tau": 1.0,
                     "direction": "source||adapted", "reduction": "mean", "num_anchors": None, "backend": "auto"}


@pytest.mark.parametrize("method", ["dreambooth", "finetune"])
def test_an_old_resolved_config_still_loads(tmp_path, method):
    old = {**T2I, "method": method, "loss": dict(OLD_RESOLVED_LOSS, prior=1.0 if method == "dreambooth" else 0.0)}
    cfg = load_config(old)
    assert cfg.loss.model_dump() == {"mode": "dsfast", "prior": old["loss"]["prior"]}
    # and the new resolved config.yaml round-trips
    resolved = resolve(cfg, "sd")
    dump_config(resolved, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == resolved


def test_resolve_world_and_resolution():
    cfg = resolve(load_config(BASE, ["train.batch_size=8"]), "unet2d", world=2, default_resolution=32,
                  down_factor=4)
    assert cfg.train.micro_batch_size == 4 and cfg.data.resolution == 32
    with pytest.raises(ConfigError, match="world size"):
        resolve(load_config(BASE, ["train.batch_size=5"]), "unet2d", world=2)
    with pytest.raises(ConfigError, match="downsampling factor"):
        resolve(load_config(BASE, ["data.resolution=18"]), "unet2d", down_factor=4)
    with pytest.raises(ConfigError, match="batch_size >= 3"):
        resolve(load_config(BASE, ["train.batch_size=2"]), "unet2d")
    with pytest.raises(pydantic.ValidationError):  # frozen: nothing changes a resolved config
        cfg.train.lr = 1.0


def test_yaml_syntax_errors_name_the_file_or_override(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("method: domainstudio\ntrain: {lr: 1e-4\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(bad))}: not valid YAML \(line 3, column \d+\)"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("method: domainstudio\n")
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1,': not valid YAML"):
        load_config(good, ["train.lr=[1,"])


@pytest.mark.parametrize("value, message", [("nan", "finite"), ("inf", "finite"), ("0", "greater than 0"),
                                            ("-1e-4", "greater than 0")])
def test_learning_rate_must_be_a_positive_finite_number(value, message):
    """Refused when the config is read, before any output folder exists (nan used to fail after it was made,
    inf at the second step)."""
    with pytest.raises(ConfigError, match=rf"'train.lr'.*{message}"):
        load_config(BASE, [f"train.lr={value}"])


def test_no_config_float_may_be_nan_or_inf():
    with pytest.raises(ConfigError, match="'loss.tau'.*finite"):
        load_config(BASE, ["loss.tau=nan"])
