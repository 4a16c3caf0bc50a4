"""Two processes on CPU (gloo) launched with torchrun: ZeRO-2 / ZeRO-3 with CPU offload train,
checkpoint (every rank writes its shard), resume, and match a one-process run of the same config."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsfast.train.distributed import free_port
from dsfast.train.testing import (
    HF_ZERO2_JSON,
    subprocess_env,
    tiny_config,
    unconditional_run_inputs,
)

pytestmark = pytest.mark.slow


def _run(cmd, timeout=400):
    p = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return unconditional_run_inputs(tmp_path_factory.mktemp("mp"))


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    wd = tmp_path_factory.mktemp("single")
    cfg = tiny_config(wd, assets / "model", assets / "imgs", train__max_steps=2, train__micro_batch_size=4,
                      train__ema=0.0)
    (wd / "run.yaml").write_text(yaml.safe_dump(cfg))
    _run([sys.executable, "-m", "dsfast.train", "--config", str(wd / "run.yaml")])
    return wd / "run"


@pytest.mark.parametrize("over", [
    ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"],
    ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu", "deepspeed.offload_param=cpu"],
], ids=["zero2_offload", "zero3_offload"])
def test_two_ranks_torchrun(assets, single, tmp_path, over):
    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", train__max_steps=2, train__micro_batch_size=1,
                      checkpoint_every=2, train__ema=0.0)
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(cfg))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(free_port()), "-m", "dsfast.train", "--config", str(f), *over]
    _run(launch)
    run = tmp_path / "run"
    ck = run / "checkpoints" / "step_00000002"
    shards = sorted(p.name for p in ck.iterdir() if "optim_states" in p.name)
    assert len(shards) == 2, shards  # both ranks wrote their optimizer shard
    assert (ck / "rng_rank0.pt").is_file() and (ck / "rng_rank1.pt").is_file() and (ck / "COMPLETE").is_file()
    # global batch of 4 = 2 ranks x 2 micro-batches of 1: same losses as one process with one batch of 4
    got, want = _metrics(run), _metrics(single)
    for a, b in zip(got, want):
        for k in ("loss", "simple", "image", "hf", "hfmse"):
            assert a[k] == pytest.approx(b[k], rel=2e-4, abs=1e-9), (a["step"], k)
    # resume the 2-rank checkpoint on 2 ranks for one more step
    launch[launch.index("--master_port") + 1] = str(free_port())
    p = _run(launch + ["train.max_steps=3"])
    assert "resumed from" in p.stdout
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]
    from diffusers import DiffusionPipeline

    DiffusionPipeline.from_pretrained(str(run / "final"))


def test_stock_hf_zero2_json_under_the_deepspeed_launcher(assets, tmp_path):
    """The transformers/accelerate ds_config_zero2.json ("auto" values, AdamW + WarmupLR sections, ZeRO-2 with
    CPU optimizer offload) as deepspeed.config, 2 CPU ranks launched by `deepspeed`, trains to the end."""
    ds = tmp_path / "ds_config_zero2.json"
    ds.write_text(json.dumps(HF_ZERO2_JSON))
    cfg = tiny_config(tmp_path, assets / "model", assets / "imgs", train__max_steps=2, train__warmup_steps=4,
                      train__ema=0.0, deepspeed={"config": str(ds)})  # the JSON sets the ZeRO stage
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(cfg))
    launcher = Path(sys.executable).with_name("deepspeed")
    _run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "dsfast.train",
          "--config", str(f)])
    run = tmp_path / "run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["deepspeed"]["zero_stage"] == 2 and resolved["deepspeed"]["offload_optimizer"] == "cpu"
    m = _metrics(run)
    assert [r["step"] for r in m] == [1, 2] and [r["lr"] for r in m] == pytest.approx([5e-5, 7.5e-5])  # linear warm-up (lr of the next step)
    assert (run / "final" / "model_index.json").is_file()
