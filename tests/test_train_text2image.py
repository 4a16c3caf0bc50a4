"""DreamBooth and text-to-image DomainStudio on a tiny Stable-Diffusion-family pipeline (CPU, DeepSpeed)."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from dsfast.train.testing import (
    sd_run_inputs,
    subprocess_env,
    tiny_config,
    write_images,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return sd_run_inputs(tmp_path_factory.mktemp("sd"))


def _train(assets, tmp_path, *over):
    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", train__max_steps=2, train__micro_batch_size=2,
                      data__instance_prompt="a sks dog", data__class_prompt="a dog", data__num_class_images=3,
                      data__class_dir=str(assets / "class_images"), sample__num=2)
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "dsfast.train", "--config", str(f), *over], env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    run = tmp_path / "run"
    return run, [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.drift
def test_dreambooth_prior_preservation(assets, tmp_path):
    run, m = _train(assets, tmp_path, "method=dreambooth")
    assert len(list((assets / "class_images").glob("*.png"))) == 3  # generated once, reused below
    assert {"instance", "prior", "loss"} <= set(m[-1]) and "image" not in m[-1]
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(run / "final"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    from dsfast.train.sample import sample_images

    imgs = sample_images(run, 2, num_inference_steps=2)  # prompt from the run's config
    assert imgs.shape == (2, 3, 16, 16)


@pytest.mark.drift
def test_finetune_random_crop(assets, tmp_path):
    """Also the engine's path of data.random_crop: images that are not square, cropped afresh at each step."""
    wide = write_images(tmp_path / "wide", 0, sizes=[(16, 24), (20, 16), (16, 19), (16, 16)])
    _, m = _train(assets, tmp_path, "method=finetune", "data.random_crop=true", f"data.instance_dir={wide}")
    assert "instance" in m[-1] and not {"prior", "image", "hf", "hfmse"} & set(m[-1])
    assert all(r["loss"] == r["loss"] for r in m)


@pytest.mark.drift
def test_domainstudio_pixel_class_prompt(assets, tmp_path):
    _, m = _train(assets, tmp_path)  # official: VAE-decoded x0, class-prompt source, cached two-pass step
    assert {"instance", "prior", "image", "hf", "hfmse"} <= set(m[-1])
    assert all(r["loss"] == r["loss"] for r in m)


@pytest.mark.drift
def test_domainstudio_lora_off_latent_zero3(assets, tmp_path):
    run, m = _train(assets, tmp_path, "model.lora_rank=4", "loss.source=lora_off", "loss.space=latent",
                    "deepspeed.zero_stage=3", "checkpoint_every=2")
    assert {"image", "hf", "hfmse"} <= set(m[-1])
    lora = run / "final" / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(str(assets / "model"))
    fused = DiffusionPipeline.from_pretrained(str(run / "final"))
    base.load_lora_weights(str(lora.parent))
    base.fuse_lora()
    base.unload_lora_weights()
    want, got = base.unet.state_dict(), fused.unet.state_dict()
    assert set(want) == set(got)
    changed = 0
    before = DiffusionPipeline.from_pretrained(str(assets / "model")).unet.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(got[k], before[k])
    assert changed > 0  # the adapters moved the attention projections
