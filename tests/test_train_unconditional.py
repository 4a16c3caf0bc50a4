"""End-to-end DomainStudio / finetune on a tiny pretrained UNet2DModel through the DeepSpeed engine (CPU).

DeepSpeed caches its process group, so every training run is a subprocess.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsfast.train.testing import make_unconditional_pipeline, subprocess_env, tiny_config, unconditional_run_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = unconditional_run_inputs(tmp_path_factory.mktemp("uncond"))
    make_unconditional_pipeline(root / "model_sigma", learned_sigma=True)
    return root


def run_train(cfg: dict, workdir: Path, *args, env=None, check=True):
    workdir.mkdir(parents=True, exist_ok=True)
    f = workdir / "run.yaml"
    f.write_text(yaml.safe_dump(cfg))
    e = subprocess_env()
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "dsfast.train", "--config", str(f), *args], env=e,
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.drift
def test_domainstudio_run_folder(assets, tmp_path):
    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", checkpoint_every=1, keep_last=2, sample_every=2,
                      train__max_steps=3, train__final_raw=True)
    p = run_train(cfg, tmp_path, "train.seed=1")  # CLI override
    run = tmp_path / "run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["seed"] == 1 and resolved["loss"]["image"] == 4.0 and resolved["train"]["lr"] == 1e-4
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3]
    for key in ("loss", "simple", "image", "hf", "hfmse", "lr", "sec_per_step"):
        assert key in m[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in m)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "samples" / "step_00000002.png").is_file()
    ck = run / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000003"
    assert sorted(x.name for x in ck.iterdir() if x.is_dir()) == ["step_00000002", "step_00000003"]  # keep_last
    assert "it/s" in p.stderr  # tqdm bar
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(run / "final"))
    assert type(pipe).__name__ == "DDPMPipeline"
    # final = EMA weights, which differ from the pretrained ones
    from diffusers import UNet2DModel

    before = UNet2DModel.from_pretrained(str(assets / "model"), subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), pipe.unet.state_dict().values()))
    # train.final_raw: final/raw/ holds the trained weights, which differ from the EMA's
    raw = UNet2DModel.from_pretrained(str(run / "final" / "raw"), subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(raw.state_dict().values(), pipe.unet.state_dict().values()))

    from dsfast.train.sample import main as sample_main
    from dsfast.train.sample import sample_images

    imgs = sample_images(run, 3, num_inference_steps=2)
    assert imgs.shape == (3, 3, 16, 16) and 0 <= imgs.min() and imgs.max() <= 1
    again = sample_images(run, 2, num_inference_steps=2)
    torch.testing.assert_close(imgs[:2], again, rtol=0, atol=1e-5)  # fixed seeds per image (batch-size float noise)
    assert sample_main(["--run", str(run), "--num", "4", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (32, 32)


@pytest.mark.parametrize("over", [
    ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu", "train.mixed_precision=bf16"],
    ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu", "deepspeed.offload_param=cpu",
     "train.micro_batch_size=2", "train.gradient_checkpointing=true"],
], ids=["zero2_offload_bf16", "zero3_offload_accum_ckpt"])
def test_zero_stages(assets, tmp_path, over):
    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", checkpoint_every=2, train__max_steps=2)
    run_train(cfg, tmp_path, *over)
    run = tmp_path / "run"
    m = metrics(run)
    assert len(m) == 2 and all(r["loss"] == r["loss"] for r in m)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(run / "final"))
    assert all(torch.isfinite(v).all() for v in pipe.unet.state_dict().values())
    assert (run / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


@pytest.mark.drift
def test_finetune_learned_sigma(assets, tmp_path):
    cfg = tiny_config(tmp_path, assets / "model_sigma", assets / "imgs", method="finetune", train__max_steps=2)
    run_train(cfg, tmp_path)
    m = metrics(tmp_path / "run")
    assert "vlb" in m[-1] and "image" not in m[-1] and m[-1]["vlb"] > 0


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory):
    wd = tmp_path_factory.mktemp("baseline")
    cfg = tiny_config(wd, assets / "model", assets / "imgs", checkpoint_every=2, keep_last=0, train__max_steps=5,
                      train__micro_batch_size=2)
    run_train(cfg, wd)
    return wd / "run"


@pytest.mark.parametrize("kill", ["step:3", "save:4"])
def test_kill_and_resume_is_exact(assets, baseline, tmp_path, kill):
    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", checkpoint_every=2, keep_last=0,
                      train__max_steps=5, train__micro_batch_size=2)
    p = run_train(cfg, tmp_path, env={"DSFAST_TEST_KILL": kill}, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    run = tmp_path / "run"
    ck = run / "checkpoints"
    expect_latest = "step_00000002"
    assert (ck / "latest").read_text() == expect_latest and (ck / expect_latest / "COMPLETE").is_file()
    if kill == "save:4":
        assert (ck / "step_00000004").is_dir() and not (ck / "step_00000004" / "COMPLETE").exists()
    p = run_train(cfg, tmp_path, "--resume", "latest")
    assert "resumed from" in p.stdout
    got, want = metrics(run), metrics(baseline)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(got, want):
        for k in ("loss", "simple", "image", "hf", "hfmse"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-12), (a["step"], k)
    from safetensors.torch import load_file

    fa = load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    fb = load_file(baseline / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    for k in fb:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-6, atol=1e-7)


def test_nonfinite_loss_stops_and_keeps_checkpoint(assets, tmp_path):
    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", checkpoint_every=1, train__max_steps=6,
                      train__lr=1e30, train__max_grad_norm=0.0)
    p = run_train(cfg, tmp_path, check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    lines = [x for x in p.stderr.strip().splitlines() if x.strip() and "%|" not in x]  # all but the progress bar
    assert len(lines) == 1 and "non-finite" in lines[0] and "last good checkpoint" in lines[0], p.stderr[-2000:]
    # lr=1e30 wrecks the first update: nothing it produced is kept as a good checkpoint
    assert lines[0].endswith("(none saved yet)"), lines[0]
    ck = tmp_path / "run" / "checkpoints"
    assert not (ck / "latest").exists() and not any((d / "COMPLETE").exists() for d in ck.iterdir())
    assert not (tmp_path / "run" / "final").exists()


def test_second_run_in_the_same_output_dir_is_refused(assets, tmp_path):
    """A run holds its output_dir: a second ``dsfast train`` there stops with one line before writing anything."""
    from dsfast.train.checkpoint import LOCK_NAME, lock_output_dir

    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", train__max_steps=1)
    run = tmp_path / "run"
    held = lock_output_dir(run)  # as a running `dsfast train` holds it (another open file: flock conflicts)
    try:
        p = run_train(cfg, tmp_path, check=False)
    finally:
        held.close()
    assert p.returncode == 1
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "is in use by another dsfast train" in lines[0] and LOCK_NAME in lines[0], p.stderr[-2000:]
    assert sorted(x.name for x in run.iterdir()) == [LOCK_NAME]  # no config.yaml, metrics, checkpoints
    run_train(cfg, tmp_path)  # released: the same run now goes through
    assert (run / "config.yaml").is_file() and (run / "final").is_dir()


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "legacy_marker"])
@pytest.mark.parametrize("missing", ["ema.pt", "rng_rank0.pt"])
def test_resume_refuses_a_checkpoint_without_its_ema_or_rng(assets, baseline, tmp_path, missing, listed):
    """A resume that cannot continue exactly (the EMA or the random state is gone) stops with one line, before
    training a step, instead of restarting the EMA from the pretrained weights in silence: found by the file
    list in COMPLETE, or, for a checkpoint whose COMPLETE holds only the step (written before the list), when
    it is loaded."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    ckpt = run / "checkpoints" / "step_00000004"
    (ckpt / missing).unlink()
    if not listed:
        (ckpt / "COMPLETE").write_text("4")
    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", checkpoint_every=2, keep_last=0,
                      train__max_steps=6, train__micro_batch_size=2)
    before = (run / "metrics.jsonl").read_text()
    p = run_train(cfg, tmp_path, "--resume", str(ckpt), check=False)
    assert p.returncode == 1
    lines = [x for x in p.stderr.strip().splitlines() if x.strip() and "%|" not in x]
    expect = f"{missing} is missing" if listed else f"has no {missing}"
    assert len(lines) == 1 and expect in lines[0], p.stderr[-2000:]
    assert (run / "metrics.jsonl").read_text() == before and not (run / "checkpoints" / "step_00000006").exists()


def _zero_masters(ckpt: Path, stage: int, names: list[str]) -> dict:
    """What DeepSpeed's optimizer holds as the float32 weights in checkpoint ``ckpt`` (read with DeepSpeed's own
    tools: zero_to_fp32, or the ZeRO-0 16-bit optimizer's per-parameter copies in the order it was given them)."""
    if stage:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    groups = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]["fp32_groups"]
    return dict(zip(names, (m for g in groups for m in g), strict=True))


@pytest.mark.parametrize("stage,ema", [(0, 0.0), (2, 0.0), (3, 0.0), (2, 0.9)],
                         ids=["zero0", "zero2", "zero3", "zero2_ema"])
def test_bf16_full_finetune_exports_the_float32_master_weights(assets, tmp_path, stage, ema):
    """A bf16 full fine-tune: final/ (and ``dsfast sample --checkpoint``'s weights) hold DeepSpeed's float32
    master weights, not the module's bf16 copies; an EMA averages the masters."""
    from diffusers import UNet2DModel

    from dsfast.train.checkpoint import read_weights
    from dsfast.train.models import EMA

    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", method="finetune", checkpoint_every=1,
                      keep_last=0, train__max_steps=2, train__lr=1e-3, train__ema=ema, train__ema_warmup=True,
                      train__mixed_precision="bf16", deepspeed__zero_stage=stage)
    run_train(cfg, tmp_path)
    run = tmp_path / "run"
    final = UNet2DModel.from_pretrained(str(run / "final"), subfolder="unet").state_dict()
    names = list(final)
    masters = [_zero_masters(run / "checkpoints" / f"step_0000000{s}", stage, names) for s in (1, 2)]
    if ema:
        avg = EMA(UNet2DModel.from_pretrained(str(assets / "model"), subfolder="unet").named_parameters(), ema, True)
        for step, m in enumerate(masters):
            avg.update(m.items(), step)
        want = avg.params
    else:
        want = masters[1]
    assert sorted(want) == sorted(final)
    for k, v in final.items():
        assert v.dtype == torch.float32 and torch.equal(v, want[k]), k
    # the weights are not what a bf16 copy could hold
    assert any(not torch.equal(v, v.bfloat16().float()) for v in final.values())
    trained = list(UNet2DModel.from_pretrained(str(assets / "model"), subfolder="unet").named_parameters())
    ckpt = read_weights(run / "checkpoints" / "step_00000002", stage, trained)
    for k, v in final.items():
        assert torch.equal(ckpt[k], v), k
    # dsfast sample --checkpoint latest --dtype bfloat16: those weights, rounded once, in a bf16 pipeline
    from dsfast.train.sample import checkpoint_pipeline

    pipe = checkpoint_pipeline(run, "latest", torch.device("cpu"), torch.bfloat16)
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, final[k].bfloat16()), k
