"""``final/`` from a run's weights (``models.save_final``) on a tiny FLUX.1 pipeline, in one process without
DeepSpeed: the frozen parts are copied from the pretrained folder, not loaded again; the pretrained denoiser is
read at most once (a 16-bit LoRA run's float32 base); what the folder holds loads with diffusers."""
import shutil
from pathlib import Path

import pytest
import torch

from dsfast.train.families import Family, load_pipeline
from dsfast.train.families.base import copy_part_files
from dsfast.train.models import LORA_DIR, describe, load, lora_config, save_final
from dsfast.train.testing import make_flux_pipeline

FROZEN = ("text_encoder", "text_encoder_2", "vae")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return make_flux_pipeline(tmp_path_factory.mktemp("export") / "flux")


def _export(model, out, *, rank: int, dtype: torch.dtype, monkeypatch) -> tuple[list[str], dict]:
    """save_final of a bundle whose trained weights moved; the parts it loaded from disk while writing."""
    info = describe(str(model))
    bundle = load(info, str(model), dtype=dtype, lora=lora_config(info, rank, None), frozen_source=False,
                  device=torch.device("cpu"))
    sd = {k: v.detach().float().clone() for k, v in bundle.unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if rank == 0 or "lora_" in k:
            v.add_(0.01 * torch.randn(v.shape, generator=g))
    loaded = []
    real = Family.load_part
    monkeypatch.setattr(Family, "load_part", lambda self, name: loaded.append(name) or real(self, name))
    save_final(bundle, sd, out)
    return loaded, sd


@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_final_copies_the_frozen_parts_and_loads_none(flux, tmp_path, monkeypatch, rank):
    loaded, sd = _export(flux, tmp_path / "final", rank=rank, dtype=torch.float32, monkeypatch=monkeypatch)
    assert loaded == []  # a float32 run holds every part exactly: nothing is read from disk again
    for part in FROZEN:
        for f in (flux / part).iterdir():
            assert (tmp_path / "final" / part / f.name).read_bytes() == f.read_bytes(), f
    final = load_pipeline(str(tmp_path / "final"))
    got = final.transformer.state_dict()
    if rank == 0:
        want = sd
    else:  # the adapters of final/lora/ fused by diffusers into the pretrained pipeline
        base = load_pipeline(str(flux))
        base.load_lora_weights(str(tmp_path / "final" / LORA_DIR))
        base.fuse_lora()
        base.unload_lora_weights()
        want = base.transformer.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in got.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(got.values(), load_pipeline(str(flux)).transformer.state_dict().values()))


def test_bf16_lora_final_reads_the_pretrained_denoiser_once(flux, tmp_path, monkeypatch):
    loaded, sd = _export(flux, tmp_path / "final", rank=4, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    assert loaded == ["transformer"]  # its float32 base weights, read once for the adapters and the fused copy
    base = load_pipeline(str(flux)).transformer.state_dict()
    got = load_pipeline(str(tmp_path / "final")).transformer.state_dict()
    # the weights LoRA leaves alone are the pretrained float32 ones, not their bf16 training copies
    assert torch.equal(got["proj_out.weight"], base["proj_out.weight"])
    assert not torch.equal(got["proj_out.weight"], base["proj_out.weight"].bfloat16().float())


def test_a_part_without_safetensors_weights_is_saved_from_memory(flux, tmp_path, monkeypatch):
    model = tmp_path / "flux-bin"
    shutil.copytree(flux, model)
    te = load_pipeline(str(flux)).text_encoder
    shutil.rmtree(model / "text_encoder")
    te.save_pretrained(model / "text_encoder", safe_serialization=False)  # pytorch_model.bin only
    loaded, _ = _export(model, tmp_path / "final", rank=0, dtype=torch.float32, monkeypatch=monkeypatch)
    assert loaded == []  # in float32 in memory: saved from there
    assert (tmp_path / "final" / "text_encoder" / "model.safetensors").is_file()
    got = load_pipeline(str(tmp_path / "final")).text_encoder.state_dict()
    for k, v in te.state_dict().items():
        assert torch.equal(got[k], v), k


def test_copy_part_files_takes_what_from_pretrained_reads(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = ["config.json", "model.safetensors", "model.fp16.safetensors", "pytorch_model.bin",
             "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json",
             "diffusion_pytorch_model.safetensors.index.fp16.json", "generation_config.json"]
    for n in names:
        (src / n).write_text(n)
    assert copy_part_files(src, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["config.json", "model.safetensors", "diffusion_pytorch_model-00001-of-00002.safetensors",
         "diffusion_pytorch_model.safetensors.index.json", "generation_config.json"])
    for n in ("model.safetensors", "diffusion_pytorch_model-00001-of-00002.safetensors",
              "diffusion_pytorch_model.safetensors.index.json"):
        (src / n).unlink()
    assert not copy_part_files(src, tmp_path / "none") and not (tmp_path / "none").exists()


def test_sample_from_final_in_bfloat16(flux, tmp_path, monkeypatch):
    """``dsfast sample --dtype bfloat16`` on a pipeline folder: every part of the pipeline runs in bf16."""
    from dsfast.train import sample

    seen = {}
    real = sample.run_pipeline
    monkeypatch.setattr(sample, "run_pipeline", lambda pipe, *a, **k: seen.update(
        {n: m.dtype for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}) or real(pipe, *a, **k))
    imgs = sample.sample_images(flux, 1, prompt="a sks dog", num_inference_steps=2, device="cpu", dtype=torch.bfloat16)
    assert imgs.shape[:2] == (1, 3) and bool(torch.isfinite(imgs).all())
    assert set(seen) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert set(seen.values()) == {torch.bfloat16}


def test_sample_an_unconditional_pipeline_in_bfloat16():
    """A DDPMPipeline in bfloat16 (``dsfast sample --dtype bfloat16``, and a bf16 run's sample grids): its images come
    back as float32 in [0, 1] (its numpy output failed on bfloat16), near the float32 pipeline's."""
    from dsfast.train import sample

    folder = Path(__file__).resolve().parents[1] / "assets" / "source_model"
    full = sample.sample_images(folder, 2, num_inference_steps=3, device="cpu")
    half = sample.sample_images(folder, 2, num_inference_steps=3, device="cpu", dtype=torch.bfloat16)
    assert half.dtype == torch.float32 and half.shape == full.shape == (2, 3, 16, 16)
    assert 0 <= float(half.min()) and float(half.max()) <= 1
    assert float((half - full).abs().max()) < 0.1


@pytest.mark.parametrize("flat", [True, False], ids=["fused", "unfused"])
def test_zero0_masters_follow_the_trained_parameters(flat):
    """The ZeRO-0 16-bit optimizers' float32 copies, per parameter in the engine's order; other parameters than
    the optimizer holds are an error, not weights put in the wrong places."""
    from dsfast.train.errors import TrainingError
    from dsfast.train.models import zero0_masters

    params = [torch.zeros(2, 3), torch.zeros(4), torch.zeros(5)]
    values = torch.arange(15.0)
    state = ({"fp32_groups_flat": [values[:10], values[10:]]} if flat
             else {"fp32_groups": [[values[:6].view(2, 3), values[6:10]], [values[10:]]]})
    got = zero0_masters(state, params)
    assert [g.shape for g in got] == [p.shape for p in params]
    assert torch.equal(torch.cat([g.flatten() for g in got]), values)
    wrong = [params[:2], [*params, torch.zeros(1)]]
    if not flat:  # a flat group has no shapes of its own to check against
        wrong.append([torch.zeros(3, 2), *params[1:]])
    for other in wrong:
        with pytest.raises(TrainingError, match="other parameters"):
            zero0_masters(state, other)
