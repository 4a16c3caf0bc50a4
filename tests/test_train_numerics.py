"""Numerical checks of the trainer through its public API only: ``dsfast.train.train(config, overrides)``,
the README's config keys, ``metrics.jsonl`` and ``final/`` loaded with diffusers, on tiny models built here.

Adam normalises the gradient, which would hide a mis-scaled gradient; these runs use
``train.adam_eps`` far above every gradient element (1e4) with ``train.lr=100``, which makes the
update lr·g/(|g| + eps) ≈ 1e-2·g: plain SGD, linear in the gradient to ~1e-4. No clipping
(``train.max_grad_norm=0``), no EMA, float32.

Every run is a subprocess: DeepSpeed keeps its process group for the life of a process.
"""
import json
import subprocess
import sys

import pytest
import torch

from dsfast.train.testing import make_sd_pipeline, make_unconditional_pipeline, subprocess_env, tiny_config, write_images

pytestmark = pytest.mark.slow

SGD_LIKE = dict(train__lr=100.0, train__adam_eps=1e4, train__max_grad_norm=0.0, train__ema=0.0)
RUN = "import json, sys; from dsfast.train import train; train(json.loads(sys.argv[1]), sys.argv[2:])"


def train(cfg: dict, *overrides):
    """``dsfast.train.train`` in a fresh process; returns the run folder."""
    p = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg), *overrides], env=subprocess_env(),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    return cfg["output_dir"]


def metrics(run) -> list[dict]:
    with open(f"{run}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def unet_weights(path) -> dict:
    from diffusers import DiffusionPipeline

    return {k: v.double() for k, v in DiffusionPipeline.from_pretrained(str(path)).unet.state_dict().items()}


def update(run, pretrained) -> dict:
    """final/ minus the pretrained weights, per tensor."""
    before = unet_weights(pretrained)
    return {k: v - before[k] for k, v in unet_weights(f"{run}/final").items()}


def rel_diff(a: dict, b: dict) -> float:
    """max |a - b| over max |b|, over all tensors."""
    num = max(float((a[k] - b[k]).abs().max()) for k in b)
    return num / max(float(v.abs().max()) for v in b.values())


# -- ZeRO stages ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uncond(tmp_path_factory):
    root = tmp_path_factory.mktemp("numerics_u")
    make_unconditional_pipeline(root / "model")
    write_images(root / "imgs", 5)
    cfg = tiny_config(root / "zero0", root / "model", root / "imgs", train__max_steps=2, **SGD_LIKE)
    return root, update(train(cfg), root / "model")


@pytest.mark.parametrize("over", [
    ["deepspeed.zero_stage=1"],
    ["deepspeed.zero_stage=2"],
    ["deepspeed.zero_stage=3"],
    ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"],
], ids=["zero1", "zero2", "zero3", "zero2_offload"])
def test_zero_stages_match_zero0(uncond, tmp_path, over):
    """Two optimizer steps under each ZeRO stage give ZeRO-0's parameter update to 1e-5 of its size."""
    root, want = uncond
    cfg = tiny_config(tmp_path, root / "model", root / "imgs", train__max_steps=2, **SGD_LIKE)
    got = update(train(cfg, *over), root / "model")
    assert max(float(v.abs().max()) for v in want.values()) > 1e-4  # the steps moved the weights
    assert rel_diff(got, want) <= 1e-5, rel_diff(got, want)
