"""Fine-tuning, DreamBooth and DomainStudio on tiny SDXL, SD3 (with and without T5) and FLUX.1 pipelines:
2 steps each through ``dsfast.train.train``, full and LoRA, with ``final/`` loaded and sampled by diffusers
(tests/family_runs.py runs them all in one process); and the exact global-batch gradient on sdxl and flux."""
import sys
from pathlib import Path

import pytest
import torch

from dsfast.train import methods
from dsfast.train.config import family_options, load_config, resolve
from dsfast.train.data import Draws, load_images
from dsfast.train.engine import run_step
from dsfast.train.models import describe, load
from dsfast.train.testing import make_flux_pipeline, make_sdxl_pipeline, run_script, tiny_config, write_images

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).parent))
from family_runs import CASES, OPTIONS  # noqa: E402

PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "sd3-no-t5": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TERMS = {"finetune": {"instance"}, "dreambooth": {"instance", "prior"},
         "domainstudio": {"instance", "prior", "image", "hf", "hfmse"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return run_script(Path(__file__).parent / "family_runs.py", root, timeout=900)[0]


CASE_KEYS = {f"{f}-{m}-{'lora' if r else 'full'}": (f"{f}-{m}-{r}", f, m, r) for f, m, r in CASES}
CASE_KEYS.update({k: (k, f, m, r) for k, (f, m, r, _) in OPTIONS.items()})


@pytest.mark.parametrize("case", list(CASE_KEYS))
def test_family_trains_and_diffusers_loads_the_result(runs, case):
    key, family, method, rank = CASE_KEYS[case]
    r = runs[key]
    assert "error" not in r, r.get("error")
    assert r["pipeline"] == PIPELINES[family]  # final/ is the family's own pipeline
    assert r["steps"] == [1, 2] and TERMS[method] <= set(r["terms"]) and r["grid"]
    assert r["finite"] and r["shape"] == [1, 16, 16, 3]
    assert r["checkpoint_sample"] == [1, 3, 16, 16]  # dsfast sample --checkpoint latest, at the run's resolution
    assert r["weights_moved"] > 0 and r["final_vs_base"] > 1e-4  # the trained weights are in final/
    if rank:
        # final/lora/ in the unquantised pretrained pipeline gives final/'s (fused) images
        assert r["lora_modules"] > 0
        assert r["lora_vs_final"] < 1e-5 and r["lora_vs_final"] < r["final_vs_base"] / 50


# ----------------------------------------------------------------------------- exact global-batch gradient

BATCH, STEP = 4, 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gb")
    make_sdxl_pipeline(root / "sdxl")
    make_flux_pipeline(root / "flux")
    write_images(root / "imgs", 4, size=16)
    write_images(root / "class", 4, size=16, seed=1)
    return root


def _grads(root, family, micro, lambdas=1.0):
    """run_step's gradient and logs (1 rank, global batch 4 in micro-batches of ``micro``) of text-to-image
    DomainStudio with the frozen source, on weights moved off the pretrained ones."""
    torch.set_num_threads(1)
    cfg = tiny_config(root / "run", root / family, root / "imgs", train__batch_size=BATCH, data__instance_prompt="a sks dog",
                      data__class_prompt="a dog", data__class_dir=str(root / "class"), data__num_class_images=4,
                      loss__source="frozen", loss__image=1000.0 * lambdas, loss__hf=1000.0 * lambdas)
    info = describe(str(root / family))
    cfg = resolve(load_config(cfg), info.family, down_factor=info.down_factor)
    bundle = load(info, str(root / family), dtype=torch.float32, lora=None, frozen_source=True, device=torch.device("cpu"),
                  options=family_options(cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in bundle.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    proc = bundle.family.process
    draws = Draws(seed=0, batch_size=BATCH, num_timesteps=proc.num_timesteps, random_flip=True, sample_t=proc.draw)
    method = methods.get("domainstudio", info.family)(
        bundle=bundle, images=load_images(root / "imgs", 16), draws=draws, loss=cfg.loss, data=cfg.data,
        sample=cfg.sample, dtype=torch.float32, device=torch.device("cpu"))
    model = bundle.unet.train()
    mbs = [method.micro_batch(STEP, list(range(i, i + micro))) for i in range(0, BATCH, micro)]
    logs = run_step(method, model, mbs, lambda loss: (loss / len(mbs)).backward(), step=STEP, device=torch.device("cpu"))
    return {n: p.grad.clone() for n, p in model.named_parameters()}, logs


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_two_micro_batches_give_the_global_batch_gradient(models, family):
    ref, ref_logs = _grads(models, family, BATCH)
    got, logs = _grads(models, family, 2)
    scale = max(v.abs().max().item() for v in ref.values())
    assert max((ref[n] - got[n]).abs().max().item() for n in ref) <= 1e-5 * scale
    for k in ("loss", "instance", "hfmse", "image", "hf"):
        assert logs[k] == pytest.approx(ref_logs[k], rel=1e-4), k
    # the pairwise terms carry a sizeable part of that gradient (else the comparison proves little)
    plain, _ = _grads(models, family, BATCH, lambdas=0.0)
    num = sum((ref[n] - plain[n]).pow(2).sum() for n in ref).sqrt()
    den = sum(ref[n].pow(2).sum() for n in ref).sqrt()
    assert num / den > 0.05, float(num / den)
