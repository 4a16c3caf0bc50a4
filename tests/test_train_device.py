"""Every tensor and frozen module of training lives on the training device, checked without a GPU on the
``meta`` device, for every model family (unet2d, sd, sdxl, sd3 with and without T5, flux): the trainable
denoiser, the frozen source copy, the VAE and text encoders, the noise process's tables, the cached latents and
embeddings and every micro-batch are put there, so a tensor left on the CPU raises "Tensor on device meta is
not on the expected device cpu" (dsfast's custom ops have fake kernels: the losses run on meta). Class-image
generation, the engine's sample grids and ``dsfast sample`` (final/ and checkpoints) must hand the generating
code a pipeline already on the device.
"""
import pytest
import torch
import yaml

from dsfast.train import methods
from dsfast.train import sample as sample_module
from dsfast.train.config import family_options, load_config, resolve
from dsfast.train.data import Draws, load_images
from dsfast.train.diffusion import DDPM
from dsfast.train.engine import _sample_grid
from dsfast.train.models import describe, load, lora_config
from dsfast.train.testing import (
    make_flux_pipeline,
    make_sd3_pipeline,
    make_sdxl_pipeline,
    sd_run_inputs,
    tiny_config,
    unconditional_run_inputs,
    write_images,
)

pytestmark = pytest.mark.slow  # make test-fast leaves it to make test

META = torch.device("meta")
BATCH = 4
PROMPTS = dict(data__instance_prompt="a sks dog", data__class_prompt="a dog", data__num_class_images=4)
# the pipelines beside sd's run inputs, each with its model folder (sd3-no-t5: the pipeline without T5)
BUILDERS = {"sdxl": make_sdxl_pipeline, "sd3": make_sd3_pipeline, "sd3-no-t5": lambda p: make_sd3_pipeline(p, t5=False),
            "flux": make_flux_pipeline}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    unconditional_run_inputs(root / "u")
    sd_run_inputs(root / "sd")
    write_images(root / "sd" / "class", 4, size=16, seed=1)  # class images given: none generated on meta
    write_images(root / "wide", 4, sizes=[(16, 24), (20, 16), (16, 16), (16, 18)])  # for random crops
    for name, build in BUILDERS.items():
        build(root / name / "model")
    return root


def _config(root, name, images=None, **over):
    """The tiny config of pipeline ``name`` (unet2d, sd or a :data:`BUILDERS` key); the text-to-image ones train on
    sd's images (or the folder ``images`` of ``root``), with sd's class images."""
    folder = root / ("u" if name == "unet2d" else name)
    images = root / images if images else root / ("u" if name == "unet2d" else "sd") / "imgs"
    if name != "unet2d":
        over = {**PROMPTS, "data__class_dir": str(root / "sd" / "class"), **over}
    info = describe(str(folder / "model"))
    raw = load_config(tiny_config(root / "out", folder / "model", images, train__batch_size=BATCH, **over))
    return resolve(raw, info.family, down_factor=info.down_factor)


def _on(args, device):
    assert all(x.device == device for x in args if isinstance(x, torch.Tensor)), [x.device for x in args]


def _method(cfg, device):
    """The method of ``cfg`` built on ``device``, and the training-mode denoiser there (as DeepSpeed places it)."""
    info = describe(cfg.model.pretrained)
    cls = methods.get(cfg.method, info.family, cfg.loss.mode)
    lora = lora_config(info, cfg.model.lora_rank, cfg.model.lora_alpha)
    bundle = load(info, cfg.model.pretrained, dtype=torch.float32, lora=lora,
                  frozen_source=cls.needs(cfg.loss).frozen_source, device=device, options=family_options(cfg))
    process = bundle.family.process
    tables = ([getattr(process.scheduler, t) for t in ("betas", "alphas", "alphas_cumprod")]
              if isinstance(process, DDPM) else [process.sigmas, process.timesteps])
    assert {x.device for x in tables} == {device}
    encoders = [part for name, part in bundle.family.parts.items() if name.startswith("text_encoder") and part is not None]
    for part in encoders:  # an embedding takes CPU token ids on meta: check them where they enter
        part.register_forward_pre_hook(lambda _, args, kwargs: _on([*args, *kwargs.values()], device), with_kwargs=True)
    images = load_images(cfg.data.instance_dir, cfg.data.resolution, channels=info.channels)
    method = cls(bundle=bundle, images=images, draws=Draws(seed=0, batch_size=BATCH, num_timesteps=1000,
                                                           random_flip=cfg.data.random_flip),
                 loss=cfg.loss, data=cfg.data, sample=cfg.sample, dtype=torch.float32, device=device)
    for part in encoders:  # the engine moves them off the device here: no step needs them
        part.register_forward_pre_hook(_no_text_encoder)
    return bundle, bundle.unet.train().to(device), method


def _no_text_encoder(module, args):
    raise AssertionError("a training step ran a text encoder (the prompts are encoded once, before training)")


CASES = {
    "uncond_finetune": ("unet2d", dict(method="finetune")),
    "uncond_domainstudio_anchors_min_snr": ("unet2d", dict(method="domainstudio", loss__num_anchors=2,
                                                                  loss__hfmse_weighting="min_snr")),
    "uncond_domainstudio_official": ("unet2d", dict(method="domainstudio", loss__mode="official",
                                                    train__mixed_precision="no")),
    "t2i_dreambooth_prior": ("sd", dict(method="dreambooth", loss__prior=1.0)),
    "t2i_domainstudio_frozen_latent": ("sd", dict(loss__source="frozen", loss__space="latent")),
    "t2i_domainstudio_class_prompt_pixel": ("sd", dict(loss__source="class_prompt", loss__space="pixel")),
    "t2i_domainstudio_lora_off_pixel": ("sd", dict(loss__source="lora_off", loss__space="pixel",
                                                           model__lora_rank=4)),
    "t2i_domainstudio_official": ("sd", dict(loss__mode="official")),
    # random crops of images that are not square: windows cut and encoded on the device at each step
    "t2i_domainstudio_official_random_crop": ("sd", dict(loss__mode="official", images="wide")),
    "sdxl_dreambooth_prior_random_crop": ("sdxl", dict(method="dreambooth", loss__prior=1.0, images="wide",
                                                       data__random_crop=True)),
}
# every method on the other families, full and LoRA, with each source side of DomainStudio
for _name in BUILDERS:
    CASES.update({
        f"{_name}_finetune": (_name, dict(method="finetune")),
        f"{_name}_dreambooth_prior": (_name, dict(method="dreambooth", loss__prior=1.0)),
        f"{_name}_dreambooth_prior_lora": (_name, dict(method="dreambooth", loss__prior=1.0, model__lora_rank=4)),
        f"{_name}_domainstudio_frozen_pixel": (_name, dict(loss__source="frozen", loss__space="pixel")),
        f"{_name}_domainstudio_class_prompt_latent": (_name, dict(loss__source="class_prompt", loss__space="latent")),
        f"{_name}_domainstudio_lora_off_lora": (_name, dict(loss__source="lora_off", model__lora_rank=4)),
    })


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_runs_on_the_device(assets, case):
    """micro_batch, forward with and without the source, global_loss and backward, all on meta."""
    family, over = CASES[case]
    _, unet, method = _method(_config(assets, family, **over), META)
    mb = method.micro_batch(3, list(range(BATCH)))
    assert {k: v.device for k, v in mb.items()} == {k: META for k in mb}
    with torch.no_grad():
        assert method.forward(unet, mb, need_source=True).loss.device == META  # pass 1 of the two-pass step
    out = method.forward(unet, mb, need_source=True)
    loss = out.loss + method.forward(unet, mb, need_source=False).loss
    if method.has_global:
        assert out.source is not None and out.source.device == META
        total, terms = method.global_loss(out.source, out.adapted, out.real, out.hfmse_weights, 3)
        assert terms and total.device == META
        loss = loss + total
    loss.backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device == META for g in grads)


def _recorder(monkeypatch, module):
    """Replaces ``module.run_pipeline`` by one that records the device of the pipeline it is given."""
    seen = []

    def run_pipeline(pipe, num, **kw):
        seen.append(pipe.device)
        return torch.zeros(num, 3, 16, 16)

    monkeypatch.setattr(module, "run_pipeline", run_pipeline)
    return seen


def test_class_images_are_generated_on_the_device(assets, tmp_path, monkeypatch):
    seen = _recorder(monkeypatch, sample_module)
    cfg = _config(assets, "sd", method="dreambooth", data__class_dir=str(tmp_path / "class"),
                  data__num_class_images=3)
    _method(cfg, META)
    assert seen == [META] * 3 and len(list((tmp_path / "class").iterdir())) == 3


@pytest.mark.parametrize("family", ["unet2d", "sd"])
def test_sample_grid_runs_on_the_device(assets, tmp_path, monkeypatch, family):
    import dsfast.train.engine as engine

    seen = _recorder(monkeypatch, engine)
    cfg = _config(assets, family, method="finetune")
    bundle, _, _ = _method(cfg, torch.device("cpu"))
    _sample_grid(cfg, bundle, bundle.unet.state_dict(), tmp_path, 1, None, META)
    assert seen == [META] and (tmp_path / "samples" / "step_00000001.png").is_file()


def test_dsfast_sample_runs_on_the_device(assets, tmp_path, monkeypatch):
    """final/ (a pipeline folder) and a checkpoint of a run folder."""
    seen = _recorder(monkeypatch, sample_module)
    model = assets / "u" / "model"
    sample_module.sample_images(model, 2, device="meta")
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(model), "lora_rank": 0},
                                                     "deepspeed": {"zero_stage": 0}}))
    from diffusers import UNet2DModel

    weights = UNet2DModel.from_pretrained(str(model), subfolder="unet").state_dict()
    torch.save({"module": weights}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "COMPLETE").write_text("1")
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    sample_module.sample_images(run, 2, checkpoint="latest", device="meta")
    assert seen == [META, META]
