"""Short training runs through the user's entry points: a quiet 6-step run with honest timings,
`dsfast sample` from a run's checkpoints, and `dsfast dreambooth` on a tiny SD pipeline."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from dsfast.train.testing import (
    sd_run_inputs,
    subprocess_env,
    tiny_config,
    unconditional_run_inputs,
)

pytestmark = pytest.mark.slow  # trainer launches


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return unconditional_run_inputs(tmp_path_factory.mktemp("cli_runs"))


def _train(cfg, tmp_path, env=None):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "dsfast.cli", "train", "--config", str(f)], env=env or subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return p, [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_six_step_run_is_quiet_and_times_steps_alone(assets, tmp_path):
    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", train__max_steps=6, sample_every=3,
                      checkpoint_every=3, sample__num=4, sample__num_inference_steps=20)
    env = subprocess_env()
    del env["PYTHONWARNINGS"]  # what a user sees
    p, m = _train(cfg, tmp_path, env)
    lines = [x for x in p.stderr.replace("\r", "\n").splitlines() if x.strip()]
    noise = [x for x in lines if not x.startswith(("domainstudio:", "dsfast:"))]  # the bar, dsfast notes
    assert noise == [], noise
    assert p.stdout.strip().splitlines()[-1].startswith("dsfast train: done")
    # sec_per_step is the training step alone: the step after a sample grid does not include it
    assert "sample_sec" in m[2] and "checkpoint_sec" in m[2] and "sample_sec" not in m[3]
    assert m[3]["sec_per_step"] < m[2]["sample_sec"], (m[3], m[2])
    assert "checkpoint_sec" in m[5] and (tmp_path / "run" / "samples" / "step_00000006.png").is_file()


def test_sample_from_checkpoints_and_errors(assets, tmp_path, capsys):
    from dsfast.train.sample import main, sample_images

    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", train__max_steps=2, checkpoint_every=1,
                      keep_last=0)  # EMA on (the unconditional default): checkpoints hold it as final/ does
    _train(cfg, tmp_path)
    run = tmp_path / "run"
    want = sample_images(run, 2, num_inference_steps=3)
    os.rename(run / "final", tmp_path / "final_moved")  # as a run that was stopped
    assert main(["--run", str(run), "--num", "2", "--steps", "3", "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no final/" in err and "--checkpoint latest" in err
    assert "step_00000001, step_00000002" in err
    torch.testing.assert_close(sample_images(run, 2, num_inference_steps=3, checkpoint="latest"), want)
    torch.testing.assert_close(sample_images(run, 2, num_inference_steps=3, checkpoint="step_2"), want)
    step1 = sample_images(run, 2, num_inference_steps=3, checkpoint="step_1")
    assert not torch.allclose(step1, want)
    assert main(["--run", str(run), "--checkpoint", "step_1", "--num", "2", "--steps", "3",
                 "--out", str(tmp_path / "g.png")]) == 0 and (tmp_path / "g.png").is_file()
    assert main(["--run", str(run), "--checkpoint", "step_9"]) == 1
    assert "usable ones: step_00000001, step_00000002" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sd_assets(tmp_path_factory):
    return sd_run_inputs(tmp_path_factory.mktemp("sd_cli"))


@pytest.mark.parametrize("method_flags, terms", [
    (["--with_prior_preservation", "--train_batch_size", "1"], {"instance", "prior"}),
    (["--method", "domainstudio", "--lambda_img", "10", "--lambda_hf", "10", "--lambda_hfmse", "0.1",
      "--train_batch_size", "2", "--gradient_accumulation_steps", "2"], {"instance", "image", "hf", "hfmse"}),
], ids=["dreambooth", "domainstudio"])
def test_dsfast_dreambooth_runs(sd_assets, tmp_path, method_flags, terms):
    out = tmp_path / "run"
    argv = ["--pretrained_model_name_or_path", str(sd_assets / "model"), "--instance_data_dir",
            str(sd_assets / "imgs"), "--instance_prompt", "a sks dog", "--class_prompt", "a dog",
            "--class_data_dir", str(sd_assets / "class"), "--num_class_images", "3", "--resolution", "16",
            "--max_train_steps", "2", "--learning_rate", "1e-4", "--output_dir", str(out), "--seed", "1",
            *method_flags, "deepspeed.zero_stage=0", "sample.num_inference_steps=2", "checkpoint_every=0"]
    p = subprocess.run([sys.executable, "-m", "dsfast.cli", "dreambooth", *argv], env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    written = yaml.safe_load((out / "dreambooth.yaml").read_text())
    assert written["data"]["instance_prompt"] == "a sks dog" and written["deepspeed"]["zero_stage"] == 0
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == [1, 2] and terms <= set(m[-1])
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 1e-4 and (out / "final" / "model_index.json").is_file()
